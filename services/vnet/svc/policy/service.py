"""Isolation and allow rules, explain, and the node workers' compiled rulesets.

Operations (subjects in ``contracts/subjects.py``, types in ``contracts/policy.py``):

* ``rule.put`` — create or replace an allow rule (an update replaces the whole rule);
  ``rule.get`` / ``rule.list`` / ``rule.delete``;
* ``explain`` — the verdict for a flow with its reason chain (:meth:`Policy.verdict`); each
  side is an endpoint id, a container name or an address (:func:`_explain_refs`);
* ``ruleset.get`` — node ``node``'s ruleset, rendered to one nft script, with a
  version hash (the node worker applies it when the version changed);
* ``exposure`` — everything reachable from outside the fabric (:func:`vnet.core.reach.exposure`).

``rule.put`` / ``rule.delete`` take ``dry_run``: nothing changes and the reply says what
the change would open and close (``reach``, :func:`vnet.core.reach.diff` over the current
fabric). A real put or delete computes the same diff first (best effort: when the network
or endpoint service does not answer, the rule still changes and ``reach`` is ``null``) and
carries it in its reply and its event.

Isolation modes are changed through the network service (``vnet.network.update``
``isolation``): the mode lives in the network's record, one way only. Networks and
endpoints are read from their services (``vnet.network.list``,
``vnet.endpoint.list``); the rules live in Redis under one hash tag
(``vnet:{policy:global}:rules``). A rule change publishes ``vnet.evt.policy.rules.<id>``;
node workers refetch their ruleset on it and on network / endpoint events.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec

from vnet.contracts import subjects
from vnet.contracts.endpoint import EndpointInfo, EndpointList, EndpointPage
from vnet.contracts.network import NetworkList, NetworkPage
from vnet.contracts.policy import (
    ExplainRequest,
    ExposureReply,
    ExposureRequest,
    RuleDelete,
    RuleDeleted,
    RuleGet,
    RuleList,
    RulePage,
    RulePut,
    RuleReply,
    RulesetReply,
    RulesetRequest,
    policy_endpoint,
    policy_network,
    split_ruleset,
)
from vnet.core import drivers, nft, reach
from vnet.core import errors as E
from vnet.core.model import VirtualNetwork
from vnet.core.mvpolicy import compile_macvlan
from vnet.core.policy import AllowRule, Policy, Verdict, networks_in_play, validate_rule
from vnet.runtime.idempotency import run_once
from vnet.runtime.ports import PolicyStorePort, ReplyStorePort
from vnet.runtime.service import Ctx, ServiceDef

log = logging.getLogger(__name__)

T = TypeVar("T")

SERVICE = ServiceDef("policy", "Isolation modes, allow rules, explain, compiled rulesets")

PAGE = 1000


def _store(ctx: Ctx) -> PolicyStorePort:
    """The rule store the runtime hands this instance (made on first use, then kept)."""
    st: PolicyStorePort | None = ctx.rt.state.get("policy_store")
    if st is None:
        st = ctx.rt.state["policy_store"] = ctx.rt.adapters.policy_store()
    return st


async def _rules(ctx: Ctx) -> list[AllowRule]:
    return await _store(ctx).rules()


async def _event(ctx: Ctx, ident: str, payload: Any) -> None:
    try:
        await ctx.publish_event("policy", "rules", ident, payload)
    except Exception as exc:  # committed already: log, the periodic resync catches up
        log.error("could not publish policy.rules for %s: %s", ident, exc)


async def _once(ctx: Ctx, op: str, request_id: str | None, reply_type: type[T], fn: Callable[[], Awaitable[T]]) -> T:
    """Run ``fn`` once per ``request_id``: a repeat gets the first reply, also one that
    arrives while the first still runs (:func:`vnet.runtime.idempotency.run_once`)."""
    if not request_id:
        return await fn()
    replies: ReplyStorePort | None = ctx.rt.state.get("replies")
    if replies is None:
        replies = ctx.rt.state["replies"] = ctx.rt.adapters.reply_store("policy")
    return await run_once(replies, f"{op}:{request_id}", reply_type, fn, deadline=ctx.deadline,
                          what=f"policy.rule.{op}")


def _rule_reply(rule: AllowRule, *, dry_run: bool, diff: reach.ReachDiff | None) -> RuleReply:
    fields = {f: getattr(rule, f) for f in rule.__struct_fields__}
    return RuleReply(**fields, dry_run=dry_run, reach=diff)


async def _rule_diff(ctx: Ctx, put: AllowRule | None, delete: str | None, *,
                     must: bool) -> reach.ReachDiff | None:
    """What putting ``put`` / deleting ``delete`` opens and closes over the current fabric.
    ``must`` (a dry run): the caller asked for exactly this, so a failure is its error;
    otherwise the change goes ahead without a diff."""
    try:
        pol, _ = await _load(ctx)
        after = reach.with_rule(pol, put, delete=delete)
        # CPU work that grows with the endpoints the rule selects: off the event loop
        return await asyncio.to_thread(reach.diff, pol, after)
    except Exception as exc:
        if must:
            raise
        log.warning("no reachability diff for rule %s: %s", (put.id if put else delete), exc)
        return None


@SERVICE.op("rule.put", subjects.POLICY_RULE_PUT, RulePut)
async def rule_put(ctx: Ctx, req: RulePut) -> RuleReply:
    if req.dry_run:  # no idempotency record: a dry run changes nothing, repeating it is free
        validate_rule(req.rule)
        return _rule_reply(req.rule, dry_run=True, diff=await _rule_diff(ctx, req.rule, None, must=True))
    validate_rule(req.rule)  # an invalid rule is refused before it claims its request_id

    async def go() -> RuleReply:
        diff = await _rule_diff(ctx, req.rule, None, must=False)
        await _store(ctx).put(req.rule)
        reply = _rule_reply(req.rule, dry_run=False, diff=diff)
        await _event(ctx, req.rule.id, reply)
        return reply

    return await _once(ctx, "put", req.request_id, RuleReply, go)


@SERVICE.op("rule.get", subjects.POLICY_RULE_GET, RuleGet)
async def rule_get(ctx: Ctx, req: RuleGet) -> AllowRule:
    rule = await _store(ctx).get(req.id)
    if rule is None:
        raise E.make(E.RULE_NOT_FOUND, f"no allow rule has id {req.id!r}; `vnetctl policy ls` lists them", rule=req.id)
    return rule


@SERVICE.op("rule.list", subjects.POLICY_RULE_LIST, RuleList,
            page_hint="ask for fewer rules per page with `limit` and follow `next_cursor`")
async def rule_list(ctx: Ctx, req: RuleList) -> RulePage:
    rules = await _rules(ctx)  # sorted by id: the cursor is the last id of the page before
    if req.cursor:
        rules = [r for r in rules if r.id > req.cursor]
    page = rules[:req.limit]
    more = len(rules) > req.limit
    return RulePage(rules=page, next_cursor=page[-1].id if more else None)


@SERVICE.op("rule.delete", subjects.POLICY_RULE_DELETE, RuleDelete)
async def rule_delete(ctx: Ctx, req: RuleDelete) -> RuleDeleted:
    if req.dry_run:
        there = await _store(ctx).exists(req.id)
        diff = await _rule_diff(ctx, None, req.id, must=True) if there else reach.ReachDiff()
        return RuleDeleted(id=req.id, deleted=there, dry_run=True, reach=diff)

    async def go() -> RuleDeleted:
        there = await _store(ctx).exists(req.id)
        diff = await _rule_diff(ctx, None, req.id, must=False) if there else None
        n = await _store(ctx).delete(req.id)
        out = RuleDeleted(id=req.id, deleted=bool(n), reach=diff if n else None)
        if n:
            await _event(ctx, req.id, out)
        return out

    return await _once(ctx, "delete", req.request_id, RuleDeleted, go)


async def _pages(ctx: Ctx, subject: Any, req: Any, reply_type: type[Any], attr: str) -> list[Any]:
    """Every page of a listing (``req`` carries the filters; its cursor is set here)."""
    out: list[Any] = []
    cursor: str | None = None
    while True:
        page = await ctx.request(subject, msgspec.structs.replace(req, cursor=cursor), reply_type)
        out += getattr(page, attr)
        cursor = page.next_cursor
        if cursor is None:
            return out


IN_PLAY_READS = 8  # endpoint listings of a node's networks in play at a time


async def _load(ctx: Ctx, node: str | None = None) -> tuple[Policy, list[EndpointInfo]]:
    """The policy, and the endpoint records it was built from (explain resolves names with them).

    Without ``node`` (explain, exposure, a rule's diff): every network and every endpoint.
    With ``node`` (its ruleset): every network (relations need them), but only the endpoints
    :meth:`Policy.compile` of that node can see — the node's own, and those of the networks
    in play on it (:func:`networks_in_play`, the decision compile makes) — so a node's fetch
    reads what its networks hold, not what the cluster holds. The compiled ruleset is the
    same as over everything: compile keeps nothing of another network (set members,
    bridges, pairs), and every endpoint of the node is read, so its published ports are
    owned as before (tests/unit/test_ruleset_reduced_load.py)."""
    nets: list[VirtualNetwork] = await _pages(ctx, subjects.NETWORK_LIST, NetworkList(limit=PAGE), NetworkPage,
                                              "networks")
    pnets = [policy_network(n) for n in nets]
    eps: list[EndpointInfo]
    if node is None:
        eps = await _pages(ctx, subjects.ENDPOINT_LIST, EndpointList(limit=PAGE), EndpointPage, "endpoints")
    else:
        mine: list[EndpointInfo] = await _pages(ctx, subjects.ENDPOINT_LIST, EndpointList(node=node, limit=PAGE),
                                                EndpointPage, "endpoints")
        in_play = networks_in_play({n.id: n for n in pnets}, (e.network_id for e in mine))
        gate = asyncio.Semaphore(IN_PLAY_READS)

        async def of_network(nid: str) -> list[EndpointInfo]:
            async with gate:
                got: list[EndpointInfo] = await _pages(ctx, subjects.ENDPOINT_LIST,
                                                       EndpointList(network=nid, limit=PAGE), EndpointPage,
                                                       "endpoints")
                return got

        byid = {e.id: e for e in mine}
        for got in await asyncio.gather(*(of_network(nid) for nid in sorted(in_play))):
            byid.update((e.id, e) for e in got)
        eps = [byid[k] for k in sorted(byid)]  # id order, as the whole listing
    pol = Policy(pnets, [policy_endpoint(e) for e in eps], await _rules(ctx))
    return pol, eps


def _explain_refs(ref: str, pol: Policy, eps: list[EndpointInfo], side: str) -> list[str]:
    """What ``ref`` stands for: an endpoint id or an address as it is, else a container name:
    the ids of its endpoints (several when it is attached to several networks)."""
    if ref in pol.endpoints:
        return [ref]
    try:
        ipaddress.ip_address(ref)
        return [ref]
    except ValueError:
        pass
    ids = sorted(e.id for e in eps if e.container_id == ref)
    if not ids:
        raise E.make(E.ENDPOINT_NOT_FOUND, f"{side} {ref!r} is neither an endpoint id, a container with an endpoint "
                     "nor an IP address; `vnetctl endpoint ls` lists endpoints and their containers", ref=ref)
    return ids


def _pair_rank(v: Verdict) -> int:
    """Which endpoint pair a flow between two multi-homed containers takes: a shared network
    (the kernel's directly connected route) first, then any related pair, then the rest."""
    if v.src.network is not None and v.src.network == v.dst.network:
        return 0
    return 1 if v.path else 2


@SERVICE.op("explain", subjects.POLICY_EXPLAIN, ExplainRequest)
async def explain(ctx: Ctx, req: ExplainRequest) -> Verdict:
    pol, eps = await _load(ctx)
    srcs = _explain_refs(req.src, pol, eps, "source")
    dsts = _explain_refs(req.dst, pol, eps, "destination")
    pairs = [(a, b) for a in srcs for b in dsts if a != b] or [(srcs[0], dsts[0])]
    verdicts = [pol.verdict(a, b, req.protocol, req.port) for a, b in pairs]
    best = min(verdicts, key=_pair_rank)  # min is stable: the first (by endpoint id) of the best rank
    notes: list[str] = []
    for ref, refs, party in ((req.src, srcs, best.src), (req.dst, dsts, best.dst)):
        if refs != [ref]:  # a container name: say which endpoint stood for it
            where = f" of {len(refs)}" if len(refs) > 1 else ""
            notes.append(f"container {ref}: endpoint {party.endpoint}{where} (network {party.network}, "
                         f"{party.address})")
    if notes:
        best = msgspec.structs.replace(best, reasons=notes + best.reasons)
    return best


EXPOSURE_CHUNK = 5000  # endpoint ids per piece of one entry (~100 KB)
EXPOSURE_PAGE_ENDPOINTS = 20000  # endpoint ids per page (~400 KB): a page of pieces stays below the bus limit

_ExposureKey = tuple[int, int, str, str, str, int]


def _exposure_pieces(got: list[reach.Exposure]) -> list[tuple[_ExposureKey, reach.Exposure]]:
    """Every entry, in its piece(s) of at most :data:`EXPOSURE_CHUNK` endpoints, with its sort
    key: broadest first as :func:`reach.exposure` orders them; ``ports`` names an entry only
    for published ports (a rule or a network is one entry per id)."""
    out: list[tuple[_ExposureKey, reach.Exposure]] = []
    for x in got:
        ports = x.ports if x.kind == "published" else ""
        for i in range(0, max(len(x.endpoints), 1), EXPOSURE_CHUNK):
            piece = x if len(x.endpoints) <= EXPOSURE_CHUNK else msgspec.structs.replace(
                x, endpoints=x.endpoints[i:i + EXPOSURE_CHUNK])
            out.append(((-x.breadth, -len(x.endpoints), x.kind, x.ident, ports, i // EXPOSURE_CHUNK), piece))
    out.sort(key=lambda kp: kp[0])
    return out


def _exposure_cursor(raw: str) -> _ExposureKey:
    try:
        b, n, kind, ident, ports, chunk = msgspec.json.decode(raw, type=tuple[int, int, str, str, str, int])
    except (msgspec.DecodeError, ValueError):
        raise E.make(E.INVALID_REQUEST, "cursor is not one this service gave out; pass a reply's next_cursor "
                     "unchanged, or no cursor for the first page") from None
    return (b, n, kind, ident, ports, chunk)


@SERVICE.op("exposure", subjects.POLICY_EXPOSURE, ExposureRequest,
            page_hint="ask for fewer entries per page with `limit` and follow `next_cursor`")
async def exposure(ctx: Ctx, req: ExposureRequest) -> ExposureReply:
    """One page of the exposure list. The list is computed anew for every page; the cursor
    is the sort key of the last piece sent, so a page goes on after it even when the fabric
    changed in between (an entry that moved in the order may then be missed or repeated,
    as with any cursor over changing data; an unchanged fabric gives each piece once)."""
    after = _exposure_cursor(req.cursor) if req.cursor else None
    pol, _ = await _load(ctx)
    got = await asyncio.to_thread(reach.exposure, pol)
    pieces = _exposure_pieces(got)
    if after is not None:
        pieces = [kp for kp in pieces if kp[0] > after]
    page: list[tuple[_ExposureKey, reach.Exposure]] = []
    size = 0
    for kp in pieces[:req.limit]:
        if page and size + len(kp[1].endpoints) > EXPOSURE_PAGE_ENDPOINTS:
            break
        page.append(kp)
        size += len(kp[1].endpoints)
    more = len(pieces) > len(page)
    return ExposureReply(exposures=[x for _, x in page], endpoints=len({e for x in got for e in x.endpoints}),
                         next_cursor=msgspec.json.encode(list(page[-1][0])).decode() if more else None)


RULESET_PART = 384 * 1024  # JSON bytes per part (512 KiB in base64): far below the bus limit


def compiled_ruleset(pol: Policy, eps: list[EndpointInfo], node: str, *, structured: bool) -> RulesetReply:
    """Node ``node``'s whole ruleset reply over ``pol`` (built from ``eps``), before parts."""
    rs = pol.compile(node)
    if structured:  # the node worker writes element deltas of it
        # macvlan endpoints are enforced in their containers (vnet.core.mvpolicy): same engine
        mv = compile_macvlan(pol, node, {e.network_id for e in eps if drivers.get(e.driver).enforced_in_container})
        return RulesetReply(node=node, version=rs.version(), script="", endpoints=len(rs.ports),
                            rules=len(pol.rules), ruleset=rs, macvlan=mv)
    script = nft.render(rs)
    version = hashlib.sha256(script.encode()).hexdigest()[:16]
    return RulesetReply(node=node, version=version, script=script, endpoints=len(rs.ports), rules=len(pol.rules))


@SERVICE.op("ruleset.get", subjects.POLICY_RULESET, RulesetRequest)
async def ruleset(ctx: Ctx, req: RulesetRequest) -> RulesetReply:
    pol, eps = await _load(ctx, req.node)
    whole = compiled_ruleset(pol, eps, req.node, structured=req.structured)
    try:  # a node with thousands of endpoints: in parts (each part recompiles; the version ties them)
        return await asyncio.to_thread(split_ruleset, whole, req.part, RULESET_PART)
    except ValueError as exc:
        raise E.make(E.INVALID_REQUEST, f"{exc}; start at part 0 and ask for each of its `parts`",
                     part=req.part) from None
