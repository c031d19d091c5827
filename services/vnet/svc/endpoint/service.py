"""Endpoints: containers attached to networks (filled by the endpoints issue)."""

from __future__ import annotations

from vnet.runtime.service import ServiceDef

SERVICE = ServiceDef("endpoint", "Endpoints: attach and detach containers")
