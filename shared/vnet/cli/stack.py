"""``vnetctl up`` / ``vnetctl down``: the embedded local stack (placeholder until filled)."""

from __future__ import annotations
