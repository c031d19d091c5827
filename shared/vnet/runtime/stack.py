"""The embedded local stack: servers, services and a node worker under one supervisor."""

from __future__ import annotations

from vnet.runtime.config import VNetConfig


def apply_running_stack(config: VNetConfig, *, explicit_nats: bool = False) -> VNetConfig:
    """Point ``config`` at the running local stack unless the user named servers."""
    return config
