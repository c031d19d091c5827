"""Network lifecycle and topology (filled by the networks issue)."""

from __future__ import annotations

from vnet.runtime.service import ServiceDef

SERVICE = ServiceDef("network", "Networks: create, inspect, update, delete, topology")
