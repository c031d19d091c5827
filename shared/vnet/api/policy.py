"""VNetManager methods of the policy service."""

from __future__ import annotations

from vnet.client import ClientBase


class PolicyAPI(ClientBase):
    pass
