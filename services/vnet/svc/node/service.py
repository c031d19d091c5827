"""The node worker as a service: health, host routes, and the control loop of ``worker.py``.

It holds no Redis credentials (``uses_redis=False``); its subjects carry its node id.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import msgspec

from vnet.contracts import subjects
from vnet.contracts.endpoint import (
    NetnsCheck,
    NetnsCheckReply,
    NodeStats,
    ResyncRequest,
    TeardownReply,
    TeardownRequest,
)
from vnet.contracts.messages import Empty
from vnet.contracts.network import HostRoutesReply, HostRoutesReport
from vnet.contracts.node import DriftReply, DriftRequest
from vnet.core import errors as E
from vnet.runtime.service import Ctx, Runtime, ServiceDef
from vnet.svc.node import routewatch
from vnet.svc.node.worker import NodeWorker

log = logging.getLogger(__name__)

SERVICE = ServiceDef(
    "node",
    "Node worker: applies networks and endpoints to this host's kernel",
    uses_redis=False,
    health_subject=subjects.NODE_HEALTH,
)


class NodeRegistered(msgspec.Struct, kw_only=True):
    node: str
    instance: str
    host_netns: str | None
    privileged: bool


def _netns_check(rt: Runtime) -> str:
    ns = rt.config.host_netns
    if ns is None:
        return "ok"
    path = ns if ns.startswith("/") else f"/run/netns/{ns}"
    return "ok" if os.path.exists(path) else f"host namespace {path} is missing"


@SERVICE.starting
async def _register(rt: Runtime) -> None:
    node = rt.params["node"]
    if os.geteuid() != 0:
        log.warning("not root: this node worker cannot change the kernel; it will answer health and "
                    "report itself unprivileged")
    status = _netns_check(rt)
    if status != "ok":
        log.warning("%s", status)
    await rt.publish_event("node", "registered", node, NodeRegistered(
        node=node, instance=rt.instance, host_netns=rt.config.host_netns, privileged=os.geteuid() == 0))


async def _health_check(rt: Runtime) -> tuple[str, str]:
    return "host_netns", _netns_check(rt)


SERVICE.health_checks.append(_health_check)


async def _isolation_check(rt: Runtime) -> tuple[str, str]:
    """Stateful filtering (nftables + br_netfilter) in the host namespace, and the last policy sync."""
    w: NodeWorker | None = rt.state.get("worker")
    if w is None:
        return "isolation", "starting"
    if not w.isolation.available:
        return "isolation", w.isolation.reason or "unavailable"
    if w.policy is not None and w.policy.last_error:
        return "isolation", f"last ruleset sync failed (the previous ruleset stays): {w.policy.last_error}"
    return "isolation", "ok"


SERVICE.health_checks.append(_isolation_check)


# --- host routes (read only): the network service's carving skips them -------------------------
# Added by the network service. The worker never changes anything here: it dumps the
# routes and interface addresses of its host namespace and reports their prefixes, every
# HOST_ROUTES_INTERVAL_S and at once when they change (routewatch.RouteWatch).

HOST_ROUTES_INTERVAL_S = 60.0
HOST_ROUTES_RETRY_S = 5.0  # after a failed report (the network service not up yet)


async def report_host_routes(rt: Runtime) -> HostRoutesReply:
    # with the prefixes that are not VNet's own: a new one overlapping a network is an event
    prefixes, foreign = await asyncio.to_thread(routewatch.read_host_routes, rt.config.host_netns)
    report = HostRoutesReport(node=rt.params["node"], prefixes=prefixes, interval_s=HOST_ROUTES_INTERVAL_S,
                              foreign=foreign)
    reply, _ = await rt.adapters.request(subjects.NETWORK_HOSTROUTES_REPORT, report, HostRoutesReply,
                                         params={"node": rt.params["node"]},
                                         timeout=rt.config.request_timeout_s)
    return reply


async def _host_routes_loop(rt: Runtime) -> None:
    while True:
        try:
            rep = await report_host_routes(rt)
            log.debug("reported %d host prefixes", rep.accepted)
            delay = HOST_ROUTES_INTERVAL_S
        except Exception as exc:
            log.info("could not report host routes (retrying in %.0fs): %s", HOST_ROUTES_RETRY_S, exc)
            delay = HOST_ROUTES_RETRY_S
        await asyncio.sleep(delay)


@SERVICE.starting
async def _start_host_routes(rt: Runtime) -> None:
    rt.spawn(_host_routes_loop(rt), "host-routes")
    # and at once on every route or address change of the host (routewatch.py)
    watch = routewatch.RouteWatch(rt.config.host_netns, lambda: report_host_routes(rt))
    try:
        await asyncio.to_thread(watch.open)
    except Exception as exc:  # no namespace yet, not privileged: the periodic report still runs
        log.info("no route watch on %s (routes are reported every %.0fs): %s", rt.config.host_netns or "this host",
                 HOST_ROUTES_INTERVAL_S, exc)
        return
    watch.attach(asyncio.get_running_loop())
    rt.state["route_watch"] = watch


@SERVICE.stopping
async def _stop_route_watch(rt: Runtime) -> None:
    watch: routewatch.RouteWatch | None = rt.state.pop("route_watch", None)
    if watch is not None:
        watch.close()


# --- the control loop: desired state -> kernel (added by the endpoints issue) --------------------
# The worker (worker.py) registers the node, follows endpoint/network events and
# reconciles; these ops let the endpoint service, tools and tests ask it things.

@SERVICE.starting
async def _start_worker(rt: Runtime) -> None:
    worker = NodeWorker(rt)
    rt.state["worker"] = worker
    try:
        await worker.start()
    except BaseException:  # the runtime does not call stop hooks after a failed start
        rt.state.pop("worker", None)
        await worker.stop()
        raise


@SERVICE.stopping
async def _stop_worker(rt: Runtime) -> None:
    worker = rt.state.pop("worker", None)
    if worker is not None:
        await worker.stop()


def _worker(ctx: Ctx) -> NodeWorker:
    w: NodeWorker | None = ctx.rt.state.get("worker")
    if w is None:
        raise E.make(E.UNAVAILABLE, f"node {ctx.rt.params.get('node')} is starting or stopping; retry")
    return w


def check_netns_path(ref: str) -> NetnsCheckReply:
    """Blocking: whether ``ref`` (a name under /run/netns or a path) is a network namespace here."""
    if any(ord(c) < 0x20 or c == "\x7f" for c in ref):  # a NUL would reach stat() and raise (a 500)
        raise E.make(E.INVALID_NETNS, f"namespace {ref!r} contains a control character (NUL, newline, ...); give a "
                     "name under /run/netns or an absolute path", netns=ref)
    path = ref if ref.startswith("/") else f"/run/netns/{ref}"
    if not ref.startswith("/") and ("/" in ref or ref in (".", "..")):
        return NetnsCheckReply(netns=ref, path=path, exists=False, reason="not a namespace name")
    try:
        st = os.stat(path)
    except OSError as exc:
        return NetnsCheckReply(netns=ref, path=path, exists=False, reason=f"{path}: {exc.strerror}")
    # A name under /run/netns is a bind mount of an nsfs inode; a plain file left behind is not.
    if path.startswith("/run/netns/") and (st.st_size != 0 or not os.path.ismount(path)):
        return NetnsCheckReply(netns=ref, path=path, exists=False,
                               reason=f"{path} exists but is not a mounted network namespace")
    return NetnsCheckReply(netns=ref, path=path, exists=True)


@SERVICE.op("netns.check", subjects.NODE_NETNS_CHECK, NetnsCheck)
async def netns_check(ctx: Ctx, req: NetnsCheck) -> NetnsCheckReply:
    """Does this network namespace (a name under /run/netns or a path) exist on this node?"""
    w: NodeWorker | None = ctx.rt.state.get("worker")
    rec = w.rec if w is not None else None
    # A stat and a mount check: answered here, not from a thread (the hop to a thread and back,
    # on a node busy with the previous attach, delayed the answer the attach waits for); the
    # socket is opened after the answer is out.
    rep = check_netns_path(req.netns)
    if rep.exists and rec is not None:
        ctx.rt.after_reply(asyncio.to_thread(_open, req.netns, rec.ctx), "netns socket")
    return rep


def _open(ref: str, namespaces: Any) -> None:  # the reconciler's NsContext
    """The namespace's netlink socket opened in the reconciler's cache after the check is
    answered, while the endpoint service waits for its address anyway: the attach that follows
    finds it open (opening it, in the namespace's thread, cost ~0.25 ms of the attach's kernel
    step). A failure is the attach's to see."""
    try:
        namespaces.sock(ref)
    except OSError as exc:
        log.debug("could not open a netlink socket in %s ahead of its attach: %s", ref, exc)


@SERVICE.op("stats", subjects.NODE_STATS, Empty)
async def stats(ctx: Ctx, req: Empty) -> NodeStats:
    """What the worker did: reconciles, kernel writes (the reconciler's counter), the last full resync."""
    return _worker(ctx).stats()


@SERVICE.op("drift.list", subjects.NODE_DRIFT, DriftRequest)
async def drift_list(ctx: Ctx, req: DriftRequest) -> DriftReply:
    """The drift this worker repaired, newest first: what changed, when, how long the repair
    took and which process made the change when the kernel names it (svc/node/drift.py)."""
    w = _worker(ctx)
    if w.drift is None:
        return DriftReply(node=w.node, watching=False, reason="starting")
    return w.drift.reply(req.limit)


@SERVICE.op("resync", subjects.NODE_RESYNC, ResyncRequest)
async def resync(ctx: Ctx, req: ResyncRequest) -> NodeStats:
    """Run a full resync now (fetch the desired state, reconcile the whole host); the stats after it."""
    return await _worker(ctx).request_resync(fetch=req.fetch)


@SERVICE.op("teardown", subjects.NODE_TEARDOWN, TeardownRequest)
async def teardown(ctx: Ctx, req: TeardownRequest) -> TeardownReply:
    """Stop reconciling and remove everything this node made (interfaces, macvlan endpoints,
    nftables tables, wireguard-go); every error is in the reply (it goes on past them). The
    worker stays up, torn down, until its process is stopped (svc/node/lifecycle.py)."""
    return await _worker(ctx).teardown(deregister=req.deregister)


async def _teardown_check(rt: Runtime) -> tuple[str, str]:
    w: NodeWorker | None = rt.state.get("worker")
    if w is not None and w.torn_down:
        return "teardown", "torn down: nothing is reconciled; stop this worker (or restart it to rebuild)"
    return "teardown", "ok"


SERVICE.health_checks.append(_teardown_check)


# --- the node's resolver (dns.py): names that follow isolation, opt-in (`dns=on`) -------------

@SERVICE.starting
async def _start_dns(rt: Runtime) -> None:
    from vnet.svc.node.dns import NodeDns, enabled

    if enabled(rt):
        resolver = NodeDns(rt)
        rt.state["dns"] = resolver
        await resolver.start()


@SERVICE.stopping
async def _stop_dns(rt: Runtime) -> None:
    resolver = rt.state.pop("dns", None)
    if resolver is not None:
        await resolver.stop()


# --- the CNI plugin's socket (cni.py): a container runtime's calls, opt-in (`cni=on`) ----------

@SERVICE.starting
async def _start_cni(rt: Runtime) -> None:
    from vnet.svc.node.cni import CniServer, enabled

    if enabled(rt):
        server = CniServer(rt)
        await server.start()
        rt.state["cni"] = server


@SERVICE.stopping
async def _stop_cni(rt: Runtime) -> None:
    server = rt.state.pop("cni", None)
    if server is not None:
        await server.stop()
