"""VNetManager methods of the ipam service."""

from __future__ import annotations

from vnet.client import ClientBase


class IpamAPI(ClientBase):
    pass
