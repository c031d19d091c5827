"""A node's status report is folded into the endpoint's record once per replica: by the create
that waits for it, and not again by the durable consumer that gets the same report a moment
later (svc/endpoint/events.py, ``claim_fold``). The create claims the report when it arrives,
so a consumer copy that comes while the create's fold is still out waits for that fold rather
than folding a second time. A fake store counts the folds (pure unit: the fold's own behaviour
is tested against Redis in tests/integration/test_endpoint.py)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import msgspec

from vnet.contracts.endpoint import EndpointInfo, EndpointStatusEvent
from vnet.svc.endpoint.events import (
    FOLDED_KEEP,
    HEARD_KEEP,
    _StatusWaiter,
    _wait_status,
    board,
    claim_fold,
    heard,
)
from vnet.svc.endpoint.records import _on_status


class Store:
    def __init__(self, *, fail: bool = False, slow: asyncio.Event | None = None) -> None:
        self.folds: list[tuple[str, int]] = []
        self.fail = fail
        self.slow = slow

    async def set_status(self, ident: str, node: str, status: str, reason: str, code: str, version: int,
                         at: str) -> str:
        if self.slow is not None:
            await self.slow.wait()
        self.folds.append((ident, version))
        if self.fail:
            raise ConnectionError("redis went away")
        return "ok"

    async def get(self, ident: str) -> None:
        return None


def _msg(ev: EndpointStatusEvent) -> Any:
    return SimpleNamespace(subject=f"vnet.evt.endpoint.status.{ev.node}.{ev.endpoint_id}",
                           data=msgspec.json.encode(ev), headers=None)


def _rt(store: Store) -> Any:
    return SimpleNamespace(state={"store": store})


def test_the_consumer_skips_a_report_the_waiting_create_folded() -> None:
    async def go() -> None:
        store = Store()
        rt = _rt(store)
        ready = EndpointStatusEvent(endpoint_id="e1", node="n1", status="ready", version=100)
        claim = claim_fold(rt, ready)
        assert claim is not None
        claim.set_result(True)
        await _on_status(rt, _msg(ready))
        assert store.folds == []
        # once only: the same report again (redelivered) is folded, and so is any other report
        await _on_status(rt, _msg(ready))
        later = EndpointStatusEvent(endpoint_id="e1", node="n1", status="failed", version=101)
        await _on_status(rt, _msg(later))
        assert store.folds == [("e1", 100), ("e1", 101)]
        # a report without a version cannot be told from the next one: never claimed, always folded
        unversioned = EndpointStatusEvent(endpoint_id="e2", node="n1", status="ready")
        assert claim_fold(rt, unversioned) is None
        await _on_status(rt, _msg(unversioned))
        assert store.folds[-1] == ("e2", 0)

    asyncio.run(go())


def test_a_consumer_copy_during_the_fold_waits_for_it_and_does_not_fold_again() -> None:
    async def go() -> None:
        gate = asyncio.Event()
        store = Store(slow=gate)
        rt = _rt(store)
        ready = EndpointStatusEvent(endpoint_id="e1", node="n1", status="ready", version=7)
        waiter = _StatusWaiter(rt, "e1", frozenset({"ready"}), folds=True)
        waiter.node = "n1"
        info = EndpointInfo(id="e1", container_id="c1", network_id="net1", ip_address="10.0.0.2",
                            mac_address="02:00:00:00:00:01", interface_name="eth0", created_at="", node="n1")
        waiting = asyncio.ensure_future(_wait_status(rt, info, waiter, 5.0))
        await asyncio.sleep(0)
        waiter.take(ready)  # the create's copy: claimed at once
        consumer = asyncio.ensure_future(_on_status(rt, _msg(ready)))  # the durable copy, while the fold is out
        await asyncio.sleep(0.01)
        assert not consumer.done()  # it waits for the create's fold
        gate.set()
        got, _ = await asyncio.gather(waiting, consumer)
        await waiter.close()
        assert got is not None and got.status == "ready"
        assert store.folds == [("e1", 7)]

    asyncio.run(go())


def test_a_fold_that_failed_is_left_to_the_consumer() -> None:
    async def go() -> None:
        store = Store(fail=True)
        rt = _rt(store)
        ready = EndpointStatusEvent(endpoint_id="e1", node="n1", status="ready", version=8)
        waiter = _StatusWaiter(rt, "e1", frozenset({"ready"}), folds=True)
        waiter.node = "n1"
        info: Any = SimpleNamespace(id="e1", status="pending")
        waiter.take(ready)
        try:
            await _wait_status(rt, info, waiter, 5.0)
        except ConnectionError:
            pass
        else:
            raise AssertionError("the fold's error was swallowed")
        await waiter.close()
        store.fail = False
        await _on_status(rt, _msg(ready))
        assert store.folds == [("e1", 8), ("e1", 8)]  # the consumer folded it again

    asyncio.run(go())


def test_a_claim_the_wait_never_reached_goes_back_to_the_consumer() -> None:
    async def go() -> None:
        store = Store()
        rt = _rt(store)
        ready = EndpointStatusEvent(endpoint_id="e1", node="n1", status="ready", version=9)
        waiter = _StatusWaiter(rt, "e1", frozenset({"ready"}), folds=True)
        waiter.node = "n1"
        waiter.take(ready)  # claimed, but the create's wait had already ended
        await waiter.close()
        await _on_status(rt, _msg(ready))
        assert store.folds == [("e1", 9)]
        # and a report that reaches a closed waiter is not claimed at all
        late = _StatusWaiter(rt, "e2", frozenset({"ready"}), folds=True)
        late.node = "n1"
        await late.close()
        late.take(EndpointStatusEvent(endpoint_id="e2", node="n1", status="ready", version=1))
        assert "folded" not in rt.state or ("e2", 1) not in rt.state["folded"]

    asyncio.run(go())


def test_the_memory_is_bounded() -> None:
    async def go() -> None:
        rt: Any = SimpleNamespace(state={})
        first = claim_fold(rt, EndpointStatusEvent(endpoint_id="e0", node="n1", status="ready", version=1))
        for i in range(1, FOLDED_KEEP + 10):
            claim_fold(rt, EndpointStatusEvent(endpoint_id=f"e{i}", node="n1", status="ready", version=1))
        assert len(rt.state["folded"]) == FOLDED_KEEP and ("e0", 1) not in rt.state["folded"]
        assert first is not None and first.done() and first.result() is False

    asyncio.run(go())


def test_the_board_hands_reports_to_waiters_and_reads_take_what_it_heard() -> None:
    """One subscription per replica (``StatusBoard``): each report goes to the requests waiting
    for that endpoint, and a read of a record still ``pending`` takes the report heard (the
    node answers a waiting create before any replica folds the report in)."""
    async def go() -> None:
        rt = _rt(Store())
        b = board(rt)
        info = EndpointInfo(id="e1", container_id="c1", network_id="net1", ip_address="10.0.0.2",
                            mac_address="02:00:00:00:00:01", interface_name="eth0", created_at="", node="n1")
        assert heard(rt, info) is info  # nothing heard
        w = _StatusWaiter(rt, "e1", frozenset({"ready"}))
        w.listen("n1")
        other = _StatusWaiter(rt, "e2", frozenset({"ready"}))
        other.listen("n1")
        await b._on(_msg(EndpointStatusEvent(endpoint_id="e1", node="n2", status="ready", version=5)))
        assert not w.got.done()  # another node's word about it counts for nothing
        assert heard(rt, info).status == "pending"
        ready = EndpointStatusEvent(endpoint_id="e1", node="n1", status="ready", version=1_700_000_000_000_000)
        await b._on(_msg(ready))
        assert w.got.done() and w.got.result() == ready and not other.got.done()
        got = heard(rt, info)
        assert (got.status, got.status_at) == ("ready", "2023-11-14T22:13:20.000Z")
        folded = msgspec.structs.replace(info, status="failed", reason="later", status_at="x")
        assert heard(rt, folded) is folded  # the record's own status once folded
        await w.close()
        await other.close()
        assert b.waiters == {}
        for i in range(HEARD_KEEP + 1):  # bounded: the oldest go first
            await b._on(_msg(EndpointStatusEvent(endpoint_id=f"x{i}", node="n1", status="ready", version=1)))
        assert len(b.latest) == HEARD_KEEP and "e1" not in b.latest

    asyncio.run(go())
