"""Every Feed on one NATS client shares one watch of its reconnect counter (a fleet of simulated
nodes shares one connection): one task however many feeds, each feed told of a reconnect, and
the task gone with the last feed. The client is a stand-in holding only the counter and the
subscriptions (the reconnect itself is exercised against a real server in
tests/integration/test_node_feed_gap.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from vnet.adapters.nats import Feed, _ReconnectWatch


class _Sub:
    async def unsubscribe(self) -> None:
        return None


class _Client:
    def __init__(self) -> None:
        self.stats = {"reconnects": 0}

    async def subscribe(self, subject: str, **kw: Any) -> _Sub:
        return _Sub()


def _watch_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "feed-reconnect-watch"]


async def test_one_watch_per_client_tells_every_feed_and_ends_with_the_last() -> None:
    nc: Any = _Client()
    gaps: list[str] = []

    def note(k: int) -> Callable[[str], None]:
        return lambda why: gaps.append(f"{k}: {why}")

    feeds = [Feed(nc, note(k), watch_s=0.01) for k in range(50)]

    async def handler(m: Any) -> None:
        return None

    for f in feeds:
        await f.subscribe("vnet.node.n.evt.endpoint.>", "t", handler)
        await f.subscribe("vnet.node.n.evt.node.>", "t", handler)
    assert len(_watch_tasks()) == 1
    nc.stats["reconnects"] = 1
    for _ in range(100):
        if len(gaps) == 50:
            break
        await asyncio.sleep(0.01)
    assert sorted(gaps) == sorted(f"{k}: the NATS client reconnected" for k in range(50))
    assert all(f.gaps == 1 for f in feeds)
    for f in feeds[:-1]:
        await f.close()
    assert len(_watch_tasks()) == 1  # one feed is still open
    await feeds[-1].close()
    await asyncio.sleep(0)
    assert _watch_tasks() == []
    assert nc not in _ReconnectWatch._of or not _ReconnectWatch._of[nc]
    # a feed opened afterwards gets a watch again
    again = Feed(nc, gaps.append, watch_s=0.01)
    await again.subscribe("vnet.node.n.evt.endpoint.>", "t", handler)
    assert len(_watch_tasks()) == 1
    await again.close()
