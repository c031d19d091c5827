"""A held ``NetlinkWatch`` reads nothing, and on release reads everything that came
meanwhile, in the kernel's order (the drift monitor holds it while the node worker handles
a batch of events: ``DriftMonitor.held``). Namespaces come from the ``netns`` fixture
(per-run prefix, removed at the end)."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable

import pytest

from tests.conftest import requires_root
from vnet.adapters.netlink.watch import Change, LinkChange, NetlinkWatch

pytestmark = [pytest.mark.netns, requires_root]


def ip(ns: str, *args: str) -> None:
    """``ip -n ns ...``, done before the test reads on (nothing else runs on the loop meanwhile)."""
    subprocess.run(["ip", "-n", ns, *args], check=True)


async def test_a_held_watch_reads_nothing_and_on_release_everything_in_order(netns: Callable[[str], str]) -> None:
    ns = netns("wh")
    got: list[Change] = []
    watch = NetlinkWatch(ns, got.extend)
    await asyncio.to_thread(watch.open)
    try:
        watch.attach(asyncio.get_running_loop())
        watch.hold()
        for cmd in (["link", "add", "vnx-held", "type", "veth", "peer", "name", "vnx-peer"],
                    ["link", "set", "vnx-held", "up"], ["link", "del", "vnx-held"]):
            ip(ns, *cmd)
        await asyncio.sleep(0.3)  # the loop runs: a reader still registered would have read them
        assert got == [], got
        watch.release()
        for _ in range(100):
            if any(isinstance(c, LinkChange) and c.deleted for c in got):
                break
            await asyncio.sleep(0.01)
        mine = [c for c in got if isinstance(c, LinkChange) and c.name == "vnx-held"]
        assert mine, got
        assert not mine[0].deleted and not mine[0].up, mine  # the creation first (down) ...
        assert any(c.up and not c.deleted for c in mine), mine  # ... then up ...
        assert mine[-1].deleted, mine  # ... and the deletion last
        watch.hold()
        watch.hold()  # twice is once
        watch.release()
        watch.release()
        ip(ns, "link", "add", "vnx-again", "type", "veth", "peer", "name", "vnx-apeer")
        for _ in range(100):
            if any(isinstance(c, LinkChange) and c.name == "vnx-again" for c in got):
                break
            await asyncio.sleep(0.01)
        assert any(isinstance(c, LinkChange) and c.name == "vnx-again" for c in got), got
    finally:
        await asyncio.to_thread(watch.close)
