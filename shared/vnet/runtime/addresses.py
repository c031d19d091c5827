"""Allocating and releasing addresses: one code path for the IPAM service's ``addr.request``
and ``addr.release`` and for the endpoint service's attach and detach.

Why the endpoint service does not ask the IPAM service over the bus any more (issue 9): an
allocation is one script call on the pool's keys (:class:`vnet.adapters.ipam_store.IpamStore`),
and the IPAM service's handler was a thin shell around it. Asking it cost the attach a round
trip through nats-server and a fourth process (endpoint -> nats -> ipam -> valkey -> ipam ->
nats -> endpoint, against endpoint -> valkey -> endpoint) on a path where every wakeup of a
process costs 0.8-1 ms on a loaded 2-core machine (docs/dataplane.md, "The last runs on main
(4 Dec 22:11-22:59 UTC)"). Calico's CNI plugin allocates from its datastore in-process the same way;
the CNI host-local plugin is a library over its files. The IPAM service keeps its subjects
(other callers, tools, ``nats req``), pools, GC and check; the rules stay in ``vnet.core.ipam``
and the atomicity in the script, whichever process calls it.

Forecast counts (``vnet.adapters.ipam_rates``) are noted by whichever service allocates: added
up in that process and written every :data:`COUNT_FLUSH_S`, a release at once; an allocation
that takes a pool past 80 % or 95 % publishes ``vnet.evt.ipam.pool_fullness.<id>`` once per
crossing.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

from vnet.contracts.ipam import AddrReply, PoolFullness
from vnet.core import errors as E
from vnet.core import forecast as fc
from vnet.core import ipam as core
from vnet.runtime.ports import IpamRatesPort, IpamStorePort
from vnet.runtime.service import Ctx, Runtime
from vnet.telemetry import tracing

log = logging.getLogger(__name__)

_EVENT_TOKEN_BAD = re.compile(r"[^A-Za-z0-9_-]")

# Allocation counts are added up in this process and written together: one pipelined round
# trip per pool every COUNT_FLUSH_S, not one per allocation (an attach cost ~0.4 ms of CPU
# more with a write per allocation: cpu_attach, 4 Dec). Best effort: counts not yet written
# when the service stops are lost (a rate skewed, never an allocation), and a fullness level
# is announced up to COUNT_FLUSH_S later.
COUNT_FLUSH_S = 0.1


async def start(rt: Runtime) -> None:
    """The IPAM store and rates of a service that allocates (its ``starting`` hook calls this)."""
    rt.state["ipam_store"] = rt.adapters.ipam_store(wait_replicas=rt.config.redis_wait_replicas,
                                                    wait_timeout_ms=rt.config.redis_wait_timeout_ms)
    rt.state["ipam_rates"] = rt.adapters.ipam_rates()
    await rt.adapters.load_ipam_scripts()


def store(ctx: Ctx | Runtime) -> IpamStorePort:
    rt = ctx.rt if isinstance(ctx, Ctx) else ctx
    got: IpamStorePort = rt.state["ipam_store"]
    return got


def rates(ctx: Ctx | Runtime) -> IpamRatesPort:
    rt = ctx.rt if isinstance(ctx, Ctx) else ctx
    got: IpamRatesPort = rt.state["ipam_rates"]
    return got


async def allocate(ctx: Ctx, network_id: str, family: int, owner: str, address: str | None = None,
                   request_id: str | None = None) -> AddrReply:
    """Give ``owner`` an address of the network's pool of ``family`` (``address``: that one;
    the family follows it). The errors are the store's: ``address_in_use`` naming the holder,
    ``pool_exhausted``, ``pool_not_found``, ``address_not_assignable``, ``conflict``."""
    if address is not None:
        addr = core.parse_address(address)
        if addr.version == 4 and family == 6:
            raise E.make(E.ADDRESS_NOT_ASSIGNABLE, f"{addr} is an IPv4 address but family 6 was asked; omit "
                         "family (it follows the address) or ask for an IPv6 address", address=str(addr))
        family = addr.version
    with tracing.tracer().start_as_current_span("ipam.allocate",
                                                attributes={"vnet.network": network_id, "vnet.family": family}):
        got = await store(ctx).allocate(network_id, family, owner, address, request_id)
    lay = got.layout
    if not got.existing:  # a retry allocated nothing new
        # counted after the reply, with the others of the last COUNT_FLUSH_S: a forecast's
        # count is not what the caller waits for
        _note_alloc(ctx, network_id, family, lay)
    return AddrReply(network_id=network_id, family=family, address=got.address, prefix_len=lay.prefix_len,
                     gateway=str(lay.gateway) if lay.gateway is not None else None, owner=owner,
                     allocated_at=got.allocated_at, first_use=got.first_use)


async def release(ctx: Ctx, network_id: str, owner: str) -> list[str]:
    """Release what ``owner`` holds in the network's pools (both families); the addresses freed."""
    st = store(ctx)
    with tracing.tracer().start_as_current_span("ipam.release", attributes={"vnet.network": network_id}):
        results = await asyncio.gather(*(st.release(network_id, fam, owner) for fam in (4, 6)))
    for r in results:
        if r is None:
            continue
        try:
            _, layout = await st.layout(network_id, r.family)  # cached: no round trip as a rule
        except E.VNetError:
            continue  # the pool went away meanwhile: nothing left to forecast
        await count(ctx, network_id, r.family, layout, releases=1)
    return [r.address for r in results if r is not None]


async def count(ctx: Ctx, network_id: str, family: int, layout: core.PoolLayout, *, allocs: int = 0,
                releases: int = 0) -> None:
    """Count for the forecast; announce a fullness level the pool reached (best effort)."""
    try:
        rt = rates(ctx)
        now = time.time()
        used = await rt.note(network_id, family, now=now, allocs=allocs, releases=releases)
        levels = await rt.crossings(network_id, family, used, layout.capacity, clear=releases > 0)
        if not levels:
            return
        got = (await rt.buckets([(network_id, family)], now))[0]
        f = fc.forecast(got, now=now, used=used, capacity=layout.capacity)
        ident = event_ident(network_id, family)
        for lv in levels:
            await ctx.publish_event("ipam", "pool_fullness", ident,
                                    PoolFullness(network_id=network_id, family=family, cidr=layout.cidr, level=lv,
                                                 used=used, capacity=layout.capacity, forecast=f))
    except Exception as exc:  # the allocation is done: a lost count must not fail it
        log.warning("could not count or announce for pool %s/%d: %s", network_id, family, exc)


def event_ident(network_id: str, family: int) -> str:
    """The ``<id>`` of a pool's event subjects (a subject token: no dots or wildcards)."""
    return f"{_EVENT_TOKEN_BAD.sub('_', network_id)}_{family}"


def _note_alloc(ctx: Ctx, network_id: str, family: int, layout: core.PoolLayout) -> None:
    state = ctx.rt.state
    pending: dict[tuple[str, int], tuple[int, core.PoolLayout, Ctx]] = state.setdefault("alloc_counts", {})
    n = pending.get((network_id, family), (0, layout, ctx))[0]
    pending[(network_id, family)] = (n + 1, layout, ctx)  # the latest request carries the trace of a write
    if not state.get("alloc_flushing"):
        state["alloc_flushing"] = True
        ctx.rt.after_reply(_flush_allocs(ctx.rt), "forecast counts")


async def _flush_allocs(rt: Runtime) -> None:
    """Write the counts noted since the last flush, every COUNT_FLUSH_S while there are any."""
    try:
        while True:
            await asyncio.sleep(COUNT_FLUSH_S)
            pending: dict[tuple[str, int], tuple[int, core.PoolLayout, Ctx]] = rt.state.pop("alloc_counts", {})
            if not pending:
                return
            await asyncio.gather(*(count(c, nid, fam, lay, allocs=n) for (nid, fam), (n, lay, c) in pending.items()))
    finally:
        rt.state["alloc_flushing"] = False
