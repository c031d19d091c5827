"""VNetManager methods of the endpoint service."""

from __future__ import annotations

from vnet.client import ClientBase


class EndpointAPI(ClientBase):
    pass
