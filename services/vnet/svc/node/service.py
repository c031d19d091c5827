"""The node worker as a service: health and registration now; reconcile comes with endpoints.

It holds no Redis credentials (``uses_redis=False``); its subjects carry its node id.
"""

from __future__ import annotations

import logging
import os

import msgspec

from vnet.contracts import subjects
from vnet.runtime.service import Runtime, ServiceDef

log = logging.getLogger(__name__)

SERVICE = ServiceDef(
    "node",
    "Node worker: applies networks and endpoints to this host's kernel",
    uses_redis=False,
    health_subject=subjects.NODE_HEALTH,
)


class NodeRegistered(msgspec.Struct, kw_only=True):
    node: str
    instance: str
    host_netns: str | None
    privileged: bool


def _netns_check(rt: Runtime) -> str:
    ns = rt.config.host_netns
    if ns is None:
        return "ok"
    path = ns if ns.startswith("/") else f"/run/netns/{ns}"
    return "ok" if os.path.exists(path) else f"host namespace {path} is missing"


@SERVICE.starting
async def _register(rt: Runtime) -> None:
    node = rt.params["node"]
    if os.geteuid() != 0:
        log.warning("not root: this node worker cannot change the kernel; it will answer health and "
                    "report itself unprivileged")
    status = _netns_check(rt)
    if status != "ok":
        log.warning("%s", status)
    await rt.publish_event("node", "registered", node, NodeRegistered(
        node=node, instance=rt.instance, host_netns=rt.config.host_netns, privileged=os.geteuid() == 0))


async def _health_check(rt: Runtime) -> tuple[str, str]:
    return "host_netns", _netns_check(rt)


SERVICE.health_checks.append(_health_check)
