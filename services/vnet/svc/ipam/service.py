"""IPAM: address pools per network, allocation and release (filled by the IPAM issue)."""

from __future__ import annotations

from vnet.runtime.service import ServiceDef

SERVICE = ServiceDef("ipam", "IP address management: pools, allocation, release, GC")
