"""``endpoint.update`` (labels, published ports) with its reachability diff, and the periodic repair
of the host-port claims.
"""

from __future__ import annotations

import asyncio
import logging

import msgspec

from vnet.contracts import subjects
from vnet.contracts.endpoint import (
    EndpointInfo,
    EndpointUpdate,
    EndpointUpdated,
    EndpointUpdatedEvent,
    PortMapping,
)
from vnet.contracts.network import NetworkList, NetworkPage
from vnet.contracts.policy import RuleList, RulePage, policy_endpoint, policy_network
from vnet.core import drivers, reach
from vnet.core import errors as E
from vnet.core.model import VirtualNetwork
from vnet.core.policy import Policy
from vnet.runtime.idempotency import run_once
from vnet.runtime.ports import EndpointStorePort as EndpointStore
from vnet.runtime.service import Ctx, Runtime
from vnet.svc.endpoint.common import PORT_REPAIR_S, UPDATE_RETRIES, _not_found, _store
from vnet.svc.endpoint.create import _check_ports, _check_ports_free, _port_in_use
from vnet.svc.endpoint.events import _publish_endpoint_event
from vnet.svc.endpoint.records import _replies

log = logging.getLogger(__name__)


# --- update (labels, published ports) ------------------------------------------------------------


def _labels_after(info: EndpointInfo, req: EndpointUpdate) -> dict[str, str]:
    labels = dict(info.labels) if req.labels is None else dict(req.labels)
    labels.update(req.set_labels)
    for k in req.remove_labels:
        labels.pop(k, None)
    return labels


def _port_key(p: PortMapping) -> tuple[str, int, int]:
    return p.protocol, p.host_port, p.container_port


def _changes(before: EndpointInfo, after: EndpointInfo) -> list[str]:
    out = []
    if before.labels != after.labels:
        out.append("labels")
    if sorted(map(_port_key, before.ports)) != sorted(map(_port_key, after.ports)):
        out.append("ports")
    return out


async def _fabric(ctx: Ctx, store: EndpointStore) -> Policy:
    """The policy engine over the whole fabric as it is now: networks and rules from their
    services, endpoints from this store (the same inputs the policy service compiles from)."""
    nets: list[VirtualNetwork] = []
    cursor: str | None = None
    while True:
        page = await ctx.request(subjects.NETWORK_LIST, NetworkList(limit=1000, cursor=cursor), NetworkPage)
        nets += page.networks
        cursor = page.next_cursor
        if cursor is None:
            break
    rules = []
    cursor = None
    while True:
        rp = await ctx.request(subjects.POLICY_RULE_LIST, RuleList(cursor=cursor), RulePage)
        rules += rp.rules
        cursor = rp.next_cursor
        if cursor is None:
            break
    ids = await store.ids()
    eps: list[EndpointInfo] = []
    for i in range(0, len(ids), 500):
        eps += [e for e in await store.get_many(ids[i:i + 500]) if e is not None]
    return Policy([policy_network(n) for n in nets], [policy_endpoint(e) for e in eps], rules)


async def _reach(ctx: Ctx, store: EndpointStore, after: EndpointInfo, *, must: bool) -> reach.ReachDiff | None:
    """What replacing the endpoint's record with ``after`` opens and closes (labels select it
    into rules; published ports admit external flows). ``must`` (a dry run): a failure is the
    caller's error; otherwise the change goes on with ``reach: null``."""
    try:
        before = await _fabric(ctx, store)
        would = reach.with_endpoints(before, [policy_endpoint(after)])
        return await asyncio.to_thread(reach.diff, before, would)  # CPU work: off the event loop
    except Exception as exc:
        if must:
            raise
        log.warning("no reachability diff for the update of endpoint %s: %s", after.id, exc)
        return None


def _would_be(info: EndpointInfo, req: EndpointUpdate) -> EndpointInfo:
    ports = list(info.ports) if req.ports is None else list(req.ports)
    return msgspec.structs.replace(info, labels=_labels_after(info, req), ports=ports)


async def _check_update(ctx: Ctx, store: EndpointStore, info: EndpointInfo, req: EndpointUpdate) -> EndpointInfo:
    if req.expected_revision is not None and req.expected_revision != info.revision:
        raise E.make(E.STALE_REVISION, f"endpoint {info.id} is at revision {info.revision}, not "
                     f"{req.expected_revision}; read it again (`vnetctl endpoint show {info.id}`) and retry",
                     endpoint=info.id, revision=info.revision, expected=req.expected_revision)
    after = _would_be(info, req)
    if len(after.labels) > 64:
        raise E.make(E.INVALID_REQUEST, f"an endpoint has at most 64 labels; this update would leave "
                     f"{len(after.labels)}", endpoint=info.id)
    if req.ports:
        if not drivers.get(info.driver).container_iface:
            raise E.make(E.INVALID_REQUEST, f"endpoint {info.id} uses the {info.driver.value} driver: the container "
                         "shares the host's namespace, so ports do not apply", endpoint=info.id)
        _check_ports(req.ports)
        await _check_ports_free(store, info.node, req.ports, exclude=info.id)
    return after


async def update(ctx: Ctx, req: EndpointUpdate) -> EndpointUpdated:
    """Change labels and/or published ports of a live endpoint (idempotent by request id)."""
    store = _store(ctx)
    if req.dry_run:  # no idempotency record: a dry run changes nothing, repeating it is free
        info = await store.get(req.endpoint_id)
        if info is None:
            raise _not_found(req.endpoint_id)
        after = await _check_update(ctx, store, info, req)
        changes = _changes(info, after)
        diff = await _reach(ctx, store, after, must=True) if changes else reach.ReachDiff()
        return EndpointUpdated(endpoint=after, changes=changes, dry_run=True, reach=diff)
    if not req.request_id:
        return await _update(ctx, store, req)
    # Claimed before the change, so a repeat that overlaps the first waits for its reply
    # instead of applying the update again (vnet.runtime.idempotency).
    return await run_once(_replies(ctx), f"epupd:{req.request_id}", EndpointUpdated,
                          lambda: _update(ctx, store, req), deadline=ctx.deadline, what="endpoint.update")


async def _update(ctx: Ctx, store: EndpointStore, req: EndpointUpdate) -> EndpointUpdated:
    for _ in range(UPDATE_RETRIES):
        info = await store.get(req.endpoint_id)
        if info is None:
            raise _not_found(req.endpoint_id)
        after = await _check_update(ctx, store, info, req)
        changes = _changes(info, after)
        if not changes:
            return EndpointUpdated(endpoint=info)
        diff = await _reach(ctx, store, after, must=False)
        res = await store.update(info, after)
        if res.status == "missing":
            raise _not_found(req.endpoint_id)
        if res.status == "port_in_use":
            raise _port_in_use(info.node, res.claim, res.value, await store.get(res.value))
        if res.status == "stale":  # another writer in between: re-read and re-apply (or refuse)
            continue
        if res.status != "ok":
            raise E.make(E.INTERNAL, f"unexpected answer {res.status!r} from the endpoint update script")
        now = msgspec.structs.replace(after, revision=int(res.value))
        try:
            await _publish_endpoint_event(
                ctx, "updated", now, EndpointUpdatedEvent(endpoint=now, previous=info, changes=changes, reach=diff),
                msg_id=f"endpoint.updated.{now.id}.{now.revision}")
        except Exception as exc:  # committed: every node's next full resync applies it
            log.warning("could not publish endpoint.updated for %s (nodes apply it at their next resync): %s",
                        now.id, exc)
        return EndpointUpdated(endpoint=now, changes=changes, reach=diff)
    raise E.make(E.LOCKED, f"endpoint {req.endpoint_id} kept changing under this update "
                 f"({UPDATE_RETRIES} tries); retry", endpoint=req.endpoint_id)


async def _repair_ports_loop(rt: Runtime) -> None:
    """GC of the host-port claims: every node's claims against its records (a claim left by a
    crash, a record from before claims existed). Once at start, then every PORT_REPAIR_S."""
    store = _store(rt)
    while True:
        try:
            for n in await store.nodes(include_gone=True, counts=False):
                dropped, added = await store.repair_port_claims(n.node)
                if dropped or added:
                    log.info("host-port claims of node %s repaired: %d dropped, %d added", n.node, dropped, added)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.debug("host-port claim repair: %s", exc)
        await asyncio.sleep(PORT_REPAIR_S)
