"""The CNI socket's view of its node's status reports (svc/node/cni.py StatusWatch): an ADD
answers on the worker's report, which may come before the create's reply, so a report seen
before anyone waits must count, a report of another state must not, and every waiter of
one endpoint (an ADD and a CHECK of it) hears it."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

import msgspec
from nats.aio.msg import Msg

from vnet.contracts.endpoint import EndpointStatusEvent
from vnet.svc.node import cni
from vnet.svc.node.cni import StatusWatch

READY_OR_FAILED = frozenset({"ready", "failed"})


def report(eid: str, status: str, version: int = 1) -> Msg:
    ev = EndpointStatusEvent(endpoint_id=eid, node="n1", status=cast(Any, status), version=version)
    return cast(Msg, SimpleNamespace(subject=f"vnet.evt.endpoint.status.n1.{eid}", data=msgspec.json.encode(ev)))


async def test_a_report_before_the_wait_counts() -> None:
    w = StatusWatch()
    w.on_msg(report("e1", "ready"))
    fut = w.expect("e1", READY_OR_FAILED)
    assert fut.done() and fut.result().status == "ready"


async def test_only_the_wanted_states_answer_and_every_waiter_hears() -> None:
    w = StatusWatch()
    add = w.expect("e1", READY_OR_FAILED)
    check = w.expect("e1", READY_OR_FAILED)
    gone = w.expect("e1", frozenset({"deleted"}))
    w.on_msg(report("e1", "pending"))
    w.on_msg(report("e2", "ready"))  # another endpoint
    await asyncio.sleep(0)
    assert not add.done() and not check.done() and not gone.done()
    w.on_msg(report("e1", "failed", 2))
    assert add.result().status == "failed" and check.result().status == "failed"
    assert not gone.done()
    w.done("e1", add)
    w.done("e1", check)
    assert [f for _, f in w.waiting["e1"]] == [gone]
    w.on_msg(report("e1", "deleted", 3))
    assert gone.result().status == "deleted"
    w.done("e1", gone)
    assert "e1" not in w.waiting


async def test_malformed_reports_are_ignored_and_the_memory_is_bounded() -> None:
    w = StatusWatch()
    w.on_msg(cast(Msg, SimpleNamespace(subject="vnet.evt.endpoint.status.n1.x", data=b"{not json")))
    assert not w.seen
    for i in range(cni.SEEN_MAX + 10):
        w.on_msg(report(f"e{i}", "ready"))
    assert len(w.seen) == cni.SEEN_MAX
    assert "e0" not in w.seen and f"e{cni.SEEN_MAX + 9}" in w.seen
    assert not w.expect("e0", READY_OR_FAILED).done()  # forgotten: the caller's record check answers
