"""A node's status report is folded into the endpoint's record once per replica: by the create
that waits for it, and not again by the durable consumer that gets the same report a moment
later (svc/endpoint/events.py, ``note_folded``). A fake store counts the folds (pure unit:
the fold's own behaviour is tested against Redis in tests/integration/test_endpoint.py)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import msgspec

from vnet.contracts.endpoint import EndpointStatusEvent
from vnet.svc.endpoint.events import FOLDED_KEEP, note_folded
from vnet.svc.endpoint.records import _on_status


class Store:
    def __init__(self) -> None:
        self.folds: list[tuple[str, int]] = []

    async def set_status(self, ident: str, node: str, status: str, reason: str, code: str, version: int,
                         at: str) -> str:
        self.folds.append((ident, version))
        return "ok"


def _msg(ev: EndpointStatusEvent) -> Any:
    return SimpleNamespace(subject=f"vnet.evt.endpoint.status.{ev.node}.{ev.endpoint_id}",
                           data=msgspec.json.encode(ev), headers=None)


def test_the_consumer_skips_a_report_the_waiting_create_folded() -> None:
    store = Store()
    rt: Any = SimpleNamespace(state={"store": store})
    ready = EndpointStatusEvent(endpoint_id="e1", node="n1", status="ready", version=100)
    note_folded(rt, ready)
    asyncio.run(_on_status(rt, _msg(ready)))
    assert store.folds == []
    # once only: the same report again (redelivered) is folded, and so is any other report
    asyncio.run(_on_status(rt, _msg(ready)))
    later = EndpointStatusEvent(endpoint_id="e1", node="n1", status="failed", version=101)
    asyncio.run(_on_status(rt, _msg(later)))
    assert store.folds == [("e1", 100), ("e1", 101)]
    # a report without a version cannot be told from the next one: always folded
    unversioned = EndpointStatusEvent(endpoint_id="e2", node="n1", status="ready")
    note_folded(rt, unversioned)
    asyncio.run(_on_status(rt, _msg(unversioned)))
    assert store.folds[-1] == ("e2", 0)


def test_the_memory_is_bounded() -> None:
    rt: Any = SimpleNamespace(state={})
    for i in range(FOLDED_KEEP + 10):
        note_folded(rt, EndpointStatusEvent(endpoint_id=f"e{i}", node="n1", status="ready", version=1))
    assert len(rt.state["folded"]) == FOLDED_KEEP and ("e0", 1) not in rt.state["folded"]
