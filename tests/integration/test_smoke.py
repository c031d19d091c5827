from __future__ import annotations

from vnet.client import VNetManager
from vnet.runtime.config import VNetConfig


async def test_every_service_answers_health(config: VNetConfig, start_service) -> None:
    for name in ("ipam", "network", "endpoint", "policy", "metrics"):
        await start_service(name)
    await start_service("node", params={"node": "n1"})
    async with VNetManager(config) as m:
        for name in ("ipam", "network", "endpoint", "policy", "metrics"):
            h = await m.health(name)
            assert h.service == name and h.status == "ok", h
        h = await m.health("node", node="n1")
        assert h.checks["host_netns"] == "ok"
        names = {s.name for s in await m.services()}
        assert {"ipam", "network", "endpoint", "policy", "metrics", "node"} <= names
