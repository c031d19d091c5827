"""Isolation and allow rules, explain (filled by the policy issue)."""

from __future__ import annotations

from vnet.runtime.service import ServiceDef

SERVICE = ServiceDef("policy", "Isolation modes, allow rules, explain")
