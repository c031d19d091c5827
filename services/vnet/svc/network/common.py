"""What every network operation shares: the store, events, idempotency and the reachability diffs.

The helpers keep their leading underscore: they are private to the network service's package.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec

from vnet.contracts import subjects
from vnet.contracts.endpoint import EndpointList, EndpointPage
from vnet.contracts.network import (
    MeshGroup,
    MeshReply,
    NetworkReply,
)
from vnet.contracts.policy import RuleList, RulePage, policy_endpoint, policy_network
from vnet.core import errors as E
from vnet.core import reach
from vnet.core.model import VirtualNetwork
from vnet.core.policy import AllowRule, Policy, PolicyNetwork
from vnet.runtime.idempotency import run_once
from vnet.runtime.ports import NetworkStorePort, ReplyStorePort
from vnet.runtime.service import Ctx

log = logging.getLogger(__name__)

CARVE_BATCH = 128  # index members read per round trip while carving
CARVE_ATTEMPTS = 16  # retries when a concurrent create took the carved subnet
LOCK_TTL_S = 30.0  # per-parent lock while the parent's pool exclusions change
LOCK_WAIT_S = 10.0
ENDPOINT_DELETE_CONCURRENCY = 16
HOSTROUTES_MIN_TTL_S = 30.0

T = TypeVar("T")


def _store(ctx: Ctx) -> NetworkStorePort:
    st: NetworkStorePort = ctx.rt.state["store"]
    return st


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def _event(ctx: Ctx, event: str, ident: str, payload: Any, msg_id: str | None = None) -> None:
    """Publish; the change is already committed, so a failed publish is logged, not raised."""
    try:
        await ctx.publish_event("network", event, ident, payload, msg_id=msg_id)
    except Exception as exc:
        log.error("could not publish network.%s for %s: %s", event, ident, exc)


def _not_found(ref: str) -> E.VNetError:
    return E.make(E.NETWORK_NOT_FOUND, f"no network has id or name {ref!r}; `vnetctl network ls` lists them",
                  network=ref)


async def _must_get(st: NetworkStorePort, ref: str) -> VirtualNetwork:
    net = await st.get(ref)
    if net is None:
        raise _not_found(ref)
    return net


async def _idempotent(ctx: Ctx, op: str, request_id: str | None, reply_type: type[T],
                      fn: Callable[[], Awaitable[T]]) -> T:
    """Run ``fn`` once per ``request_id``: a repeat gets the first reply, also one that
    arrives while the first still runs (:func:`vnet.runtime.idempotency.run_once`)."""
    if not request_id:
        return await fn()
    replies: ReplyStorePort | None = ctx.rt.state.get("replies")
    if replies is None:
        replies = ctx.rt.state["replies"] = ctx.rt.adapters.reply_store("network")
    return await run_once(replies, f"{op}:{request_id}", reply_type, fn, deadline=ctx.deadline,
                          what=f"network.{op}")


# --- reachability diffs (dry runs, and the diff a real change carries) -------------------

REACH_PAGE = 1000


async def _fabric(ctx: Ctx) -> Policy:
    """The policy engine over the whole fabric as it is now."""
    st = _store(ctx)
    nets: list[VirtualNetwork] = []
    cursor: str | None = None
    while True:
        page, cursor = await st.list_page(labels={}, parent=None, limit=REACH_PAGE, cursor=cursor)
        nets += page
        if cursor is None:
            break
    eps = []
    cursor = None
    while True:
        ep_page = await ctx.request(subjects.ENDPOINT_LIST, EndpointList(limit=REACH_PAGE, cursor=cursor),
                                    EndpointPage)
        eps += ep_page.endpoints
        cursor = ep_page.next_cursor
        if cursor is None:
            break
    rules: list[AllowRule] = []
    cursor = None
    while True:
        rule_page = await ctx.request(subjects.POLICY_RULE_LIST, RuleList(cursor=cursor), RulePage)
        rules += rule_page.rules
        cursor = rule_page.next_cursor
        if cursor is None:
            break
    return Policy([policy_network(n) for n in nets], [policy_endpoint(e) for e in eps], rules)


async def _reach(ctx: Ctx, changed: list[VirtualNetwork], *, must: bool) -> reach.ReachDiff | None:
    """What replacing these networks' records with ``changed`` opens and closes. ``must``
    (a dry run): a failure is the caller's error; otherwise the change goes on without it."""
    try:
        before = await _fabric(ctx)
        after = reach.with_networks(before, [PolicyNetwork.from_record(n) for n in changed])
        # CPU work bounded by the endpoints of the touched networks: off the event loop
        return await asyncio.to_thread(reach.diff, before, after)
    except Exception as exc:
        if must:
            raise
        log.warning("no reachability diff for %s: %s", ", ".join(n.id for n in changed), exc)
        return None


def _net_reply(net: VirtualNetwork, *, dry_run: bool = False, diff: reach.ReachDiff | None = None) -> NetworkReply:
    return NetworkReply(**msgspec.structs.asdict(net), dry_run=dry_run, reach=diff)


def _mesh_reply(m: MeshGroup, *, dry_run: bool = False, diff: reach.ReachDiff | None = None) -> MeshReply:
    return MeshReply(name=m.name, members=list(m.members), created_at=m.created_at, dry_run=dry_run, reach=diff)


def _with_mesh(n: VirtualNetwork, mesh: str, member: bool) -> VirtualNetwork:
    rest = [g for g in n.mesh_groups if g != mesh]
    return msgspec.structs.replace(n, mesh_groups=sorted([*rest, mesh]) if member else rest)


def _with_connection(n: VirtualNetwork, other: str, on: bool) -> VirtualNetwork:
    rest = [c for c in n.connected if c != other]
    return msgspec.structs.replace(n, connected=sorted([*rest, other]) if on else rest)
