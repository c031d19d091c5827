"""VNetManager methods of the network service."""

from __future__ import annotations

from vnet.client import ClientBase


class NetworkAPI(ClientBase):
    pass
