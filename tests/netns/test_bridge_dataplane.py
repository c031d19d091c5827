"""The bridge data plane on a real kernel: hosts and containers are namespaces.

Every namespace is made by the ``netns`` fixture (per-run prefix, deleted at
teardown); addresses are the test's own (10.123.0.0/24, fd00:123::/64) and exist
only inside them. Kernel state is checked through ``ip -j`` — not through the
observer under test.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import subprocess
import time
from collections.abc import Callable, Iterator

import msgspec
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.conftest import requires_root
from tests.netns.conftest import addrs, ip, links, ping, ping_all, routes, sysctl
from vnet.adapters.netlink.nsctx import NsContext, check_socket_netns
from vnet.adapters.netlink.probe import probe
from vnet.core import naming
from vnet.core.dataplane_model import EpDesired, NetDesired, NodeDesired, ReconcileResult, Scope
from vnet.svc.node.reconcile import Reconciler

pytestmark = [pytest.mark.netns, requires_root]

NET = NetDesired(id="net-test", gateway4="10.123.0.1/24", gateway6="fd00:123::1/64")
BRIDGE = naming.bridge_name(NET.id)
MAKE_ONE = 9  # kernel writes to attach one endpoint: veth (made down, its host side without an IPv6
# link-local address, then up), a sysctl (accept_dad), 2 addresses, up, 2 routes


def endpoint(i: int, ns: str) -> EpDesired:
    return EpDesired(id=f"ep-{i}", network_id=NET.id, netns=ns, ifname="eth0",
                     mac=naming.local_mac(bytes([2, 0x12, 0x30, 0, i >> 8, i & 0xFF])),
                     ipv4=f"10.123.0.{i + 10}/24",
                     ipv6=f"fd00:123::{i + 10:x}/64", gw4="10.123.0.1", gw6="fd00:123::1")


def ip4(i: int) -> str:
    return f"10.123.0.{i + 10}"


def ip6(i: int) -> str:
    return f"fd00:123::{i + 10:x}"


World = Callable[[int], tuple[str, list[str], Reconciler]]


@pytest.fixture
def world(netns: Callable[[str], str]) -> Iterator[World]:
    """``world(n)``: a host namespace, n container namespaces and a reconciler for the host."""
    made: list[Reconciler] = []

    def make(n: int) -> tuple[str, list[str], Reconciler]:
        host = netns("h1")
        containers = [netns(f"c{i}") for i in range(n)]
        rec = Reconciler(host)
        made.append(rec)
        return host, containers, rec

    yield make
    for rec in made:
        rec.close()


def desired(containers: list[str]) -> NodeDesired:
    return NodeDesired(networks=[NET], endpoints=[endpoint(i, c) for i, c in enumerate(containers)])


def assert_all_ready(result: ReconcileResult) -> None:
    assert result.errors == [], result.errors
    bad = {k: v for k, v in result.endpoints.items() if v.state != "ready"}
    assert not bad, bad


# --------------------------------------------------------------------------- 1 + 2


def test_twenty_containers_reach_gateway_and_peers_then_teardown_leaves_nothing(world: World) -> None:
    host, cs, rec = world(20)
    d = desired(cs)
    r = rec.reconcile(d)
    assert_all_ready(r)
    assert r.writes == 2 + 3 + 20 * MAKE_ONE  # forwarding x2, bridge + 2 addresses, 9 per endpoint

    # the kernel, seen through `ip`: bridge with the gateway, veths on it, containers wired
    hl = links(host)
    assert hl[BRIDGE]["linkinfo"]["info_kind"] == "bridge" and hl[BRIDGE]["address"] == naming.bridge_mac(NET.id)
    assert {(BRIDGE, "10.123.0.1/24"), (BRIDGE, "fd00:123::1/64")} <= addrs(host)
    for i, c in enumerate(cs):
        hv = hl[naming.veth_name(f"ep-{i}")]
        assert hv["master"] == BRIDGE and "UP" in hv["flags"]
        cl = links(c)["eth0"]
        assert cl["address"] == endpoint(i, c).mac and "UP" in cl["flags"]
        assert {("eth0", f"{ip4(i)}/24"), ("eth0", f"{ip6(i)}/64")} <= addrs(c)
        assert [(x["dst"], x["gateway"]) for x in routes(c) if x["dst"] == "default"] == [("default", "10.123.0.1")]
        assert [(x["dst"], x["gateway"]) for x in routes(c, "-6") if x["dst"] == "default"] == [
            ("default", "fd00:123::1")]
    # a bridge port has no address, not even an IPv6 link-local one (its DAD and MLD reports
    # were floods to every port, its routes a longer IPv6 table walk on every link event)
    assert not {a for a in addrs(host) if naming.is_our_veth(a[0])}, addrs(host)
    assert sysctl(cs[0], "net.ipv4.conf.eth0.arp_notify") == "0"  # announced by the node: see below
    assert sysctl(cs[0], "net.ipv6.conf.eth0.accept_dad") == "0"
    assert sysctl(host, "net.ipv4.ip_forward") == "1"

    # reachability: the gateway and five random peers, IPv4 and IPv6
    rnd = random.Random(4)
    pairs: list[tuple[str, str]] = []
    for i, c in enumerate(cs):
        pairs += [(c, "10.123.0.1"), (c, "fd00:123::1")]
        for j in rnd.sample([k for k in range(20) if k != i], 5):
            pairs += [(c, ip4(j)), (c, ip6(j))]
    assert len(pairs) == 240
    assert ping_all(pairs) == []

    # an identical second reconcile creates nothing
    r2 = rec.reconcile(d)
    assert (r2.ops_planned, r2.writes, r2.errors) == (0, 0, [])

    # 2. remove them all: nothing of ours anywhere
    r3 = rec.reconcile(NodeDesired())
    assert r3.errors == [] and r3.endpoints == {}
    assert r3.writes == 22  # 20 veths and the bridge put in one group (21), and that group deleted (1)
    for ns in (host, *cs):
        assert set(links(ns)) == {"lo"}, ns
        assert {a for a in addrs(ns) if a[0] != "lo"} == set(), ns
        assert routes(ns) == [] and routes(ns, "-6") == [], ns
    assert rec.reconcile(NodeDesired()).writes == 0


# --------------------------------------------------------------------------- 3 drift


def test_announce_refreshes_a_peers_stale_arp_entry(world: World) -> None:
    """An address given to a new container: a peer still holding the previous owner's MAC
    learns the new one from the node's gratuitous ARP (Reconciler.announce, sent once the
    endpoint is reported ready), without sending anything itself. Fails without the frame:
    the stale entry keeps the old MAC."""
    _host, cs, rec = world(2)
    assert_all_ready(rec.reconcile(desired(cs)))
    old_mac = "02:00:00:00:00:99"
    ip("neigh", "replace", ip4(0), "lladdr", old_mac, "dev", "eth0", "nud", "stale", ns=cs[1])

    def lladdr() -> str | None:
        out = subprocess.run(["ip", "-n", cs[1], "-j", "neigh", "show", ip4(0), "dev", "eth0"], check=True,
                             capture_output=True, text=True).stdout
        got = json.loads(out or "[]")
        return got[0].get("lladdr") if got else None

    assert lladdr() == old_mac
    assert rec.announce([endpoint(0, cs[0])]) == []
    deadline = time.monotonic() + 2.0
    while lladdr() != endpoint(0, cs[0]).mac and time.monotonic() < deadline:
        time.sleep(0.02)
    assert lladdr() == endpoint(0, cs[0]).mac
    # an endpoint whose namespace is gone: reported, not raised
    gone = msgspec.structs.replace(endpoint(1, cs[1]), netns=f"{cs[1]}-missing")
    errs = rec.announce([gone])
    assert len(errs) == 1 and "gratuitous ARP" in errs[0], errs


def test_drift_is_repaired_exactly(world: World) -> None:
    host, cs, rec = world(5)
    d = desired(cs)
    assert_all_ready(rec.reconcile(d))

    # a host-side veth deleted by hand: the pair goes; the next reconcile rebuilds exactly it
    ip("link", "del", naming.veth_name("ep-2"), ns=host)
    assert "eth0" not in links(cs[2])
    assert not ping(cs[0], ip4(2), tries=1)
    r = rec.reconcile(d)
    assert_all_ready(r)
    assert r.writes == MAKE_ONE and r.ops_planned == 7
    assert ping(cs[0], ip4(2)) and ping(cs[2], "fd00:123::1") and ping(cs[3], ip6(2))

    # an address removed by hand (the kernel drops the default route with it)
    ip("addr", "del", f"{ip4(3)}/24", "dev", "eth0", ns=cs[3])
    r = rec.reconcile(d)
    assert_all_ready(r)
    assert r.writes == 2  # the address and the IPv4 default route
    assert ("eth0", f"{ip4(3)}/24") in addrs(cs[3])
    assert ping(cs[3], "10.123.0.1")

    # the gateway address removed from the bridge
    ip("addr", "del", "10.123.0.1/24", "dev", BRIDGE, ns=host)
    r = rec.reconcile(d)
    assert r.writes == 1 and ping(cs[1], "10.123.0.1")

    # a container's interface set down, a host veth detached from the bridge
    ip("link", "set", "eth0", "down", ns=cs[4])
    ip("link", "set", naming.veth_name("ep-1"), "nomaster", ns=host)
    r = rec.reconcile(d)
    assert_all_ready(r)
    assert ping(cs[4], ip4(1)) and ping(cs[4], ip6(1)) and ping(cs[1], "10.123.0.1")

    # converged again: nothing to do
    r = rec.reconcile(d)
    assert (r.ops_planned, r.writes) == (0, 0)


def test_resync_of_200_unchanged_endpoints_writes_nothing(world: World) -> None:
    _host, cs, rec = world(200)
    net = NetDesired(id=NET.id, gateway4="10.123.0.1/16", gateway6="fd00:123::1/64")
    eps = [EpDesired(id=f"ep-{i}", network_id=NET.id, netns=c, mac=naming.local_mac(bytes([2, 1, 0, 0, i >> 8,
                                                                                               i & 0xFF])),
                     ipv4=f"10.123.{1 + i // 200}.{i % 200 + 10}/16", ipv6=f"fd00:123::{i + 10:x}/64",
                     gw4="10.123.0.1", gw6="fd00:123::1") for i, c in enumerate(cs)]
    d = NodeDesired(networks=[net], endpoints=eps)
    t0 = time.perf_counter()
    r = rec.reconcile(d)
    first = time.perf_counter() - t0
    assert_all_ready(r)
    assert r.writes == 5 + 200 * MAKE_ONE
    writes_before = rec.writes
    r2 = rec.reconcile(d)
    assert (r2.ops_planned, r2.writes, r2.errors) == (0, 0, [])
    assert rec.writes == writes_before  # the cumulative counter did not move either
    assert all(s.state == "ready" for s in r2.endpoints.values()) and len(r2.endpoints) == 200
    r3 = rec.reconcile(d, Scope(endpoints=frozenset({"ep-7"})))
    assert (r3.ops_planned, r3.writes) == (0, 0)
    print(f"\n200 endpoints: first reconcile {first * 1e3:.0f} ms, zero-write resync {r2.duration * 1e3:.0f} ms "
          f"(observe {r2.observe_s * 1e3:.0f} ms), scoped {r3.duration * 1e3:.1f} ms")
    assert ping(cs[199], "10.123.0.1") and ping(cs[0], eps[199].ipv6.split("/")[0])  # type: ignore[union-attr]


# --------------------------------------------------------------------------- errors, ownership


def test_bad_endpoints_fail_alone_and_nothing_is_half_made(world: World) -> None:
    host, cs, rec = world(3)
    # c1 already has an eth0 that is not ours
    ip("link", "add", "eth0", "type", "veth", "peer", "name", "theirs", ns=cs[1])
    eps = [endpoint(0, cs[0]), endpoint(1, cs[1]), endpoint(2, cs[2]),
           EpDesired(id="ep-ghost", network_id=NET.id, netns=cs[0] + "-does-not-exist", mac="02:00:00:00:0e:01",
                     ipv4="10.123.0.200/24"),
           EpDesired(id="ep-in-host", network_id=NET.id, netns=host, mac="02:00:00:00:0e:02", ipv4="10.123.0.201/24")]
    r = rec.reconcile(NodeDesired(networks=[NET], endpoints=eps))
    assert r.endpoints["ep-0"].state == "ready" and r.endpoints["ep-2"].state == "ready"
    assert r.endpoints["ep-1"].state == "failed" and r.endpoints["ep-1"].code == "conflict"
    assert r.endpoints["ep-ghost"].state == "failed" and r.endpoints["ep-ghost"].code == "netns_not_found"
    assert "does not exist" in r.endpoints["ep-ghost"].reason
    assert r.endpoints["ep-in-host"].state == "failed" and "host namespace" in r.endpoints["ep-in-host"].reason
    hl = links(host)
    assert naming.veth_name("ep-1") not in hl and naming.veth_name("ep-ghost") not in hl
    assert links(cs[1])["eth0"]["linkinfo"]["info_kind"] == "veth"  # theirs, untouched
    assert addrs(cs[1]) - {a for a in addrs(cs[1]) if a[0] == "lo"} == set()
    assert ping(cs[0], ip4(2))


def test_teardown_removes_only_what_we_made(world: World) -> None:
    host, cs, rec = world(2)
    ip("link", "add", "keep0", "type", "veth", "peer", "name", "keep1", ns=host)
    ip("link", "add", "br-keep", "type", "bridge", ns=host)
    ip("link", "add", "vnb-notours", "type", "bridge", ns=host)
    ip("addr", "add", "10.99.0.1/24", "dev", "br-keep", ns=host)
    assert_all_ready(rec.reconcile(desired(cs)))
    r = rec.reconcile(NodeDesired())
    assert r.errors == [] and r.writes == 4  # 2 veths + the bridge grouped, 1 group delete
    assert set(links(host)) == {"lo", "keep0", "keep1", "br-keep", "vnb-notours"}
    assert ("br-keep", "10.99.0.1/24") in addrs(host)


def test_missing_host_namespace_is_reported_not_raised() -> None:
    with Reconciler("vnet-no-such-namespace-here") as rec:
        r = rec.reconcile(NodeDesired(networks=[NET]))
    assert r.networks["net-test"].state == "failed" and r.networks["net-test"].code == "unavailable"
    assert r.writes == 0


# --------------------------------------------------------------------------- 4 probe


def test_probe_reports_this_kernel(netns: Callable[[str], str]) -> None:
    res = probe()  # anonymous scratch namespace: nothing named, nothing to leak
    for kind in ("bridge", "veth", "vxlan", "macvlan"):
        assert res.kinds[kind].available, res.kinds[kind]
    # ipvlan either way (this machine's kernel lacks it); the checks after this hold on both
    ipvlan = res.kinds["ipvlan"]
    if ipvlan.available:
        assert res.drivers["ipvlan"].available, res.drivers["ipvlan"]
    else:
        assert "refused" in ipvlan.reason and ("not supported" in ipvlan.reason.lower() or "Unknown" in ipvlan.reason)
        assert res.drivers["ipvlan"].available is False and res.drivers["ipvlan"].reason
    assert res.drivers["bridge"].available and res.drivers["host"].available
    # the same answers inside a named scratch namespace, which is left as found
    scratch = netns("probe")
    before = set(links(scratch))
    again = probe(scratch=scratch)
    assert {k: v.available for k, v in again.kinds.items()} == {k: v.available for k, v in res.kinds.items()}
    assert set(links(scratch)) == before


# --------------------------------------------------------------------------- sockets, tracing


def test_sockets_live_in_their_namespace_and_follow_recreation(netns: Callable[[str], str]) -> None:
    a = netns("sa")
    ctx = NsContext(max_entries=2)
    try:
        s1 = ctx.sock(a)
        check_socket_netns(s1.sock, ctx.netns(a))
        # a socket made here is NOT in namespace a, and the check says so
        here = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
        with pytest.raises(RuntimeError, match="another namespace"):
            check_socket_netns(here, ctx.netns(a))
        here.close()
        # the namespace is deleted and made again under the same name: a new socket
        ip("netns", "del", a)
        ip("netns", "add", a)
        assert ctx.prune() == 1
        s2 = ctx.sock(a)
        assert s2 is not s1
        check_socket_netns(s2.sock, ctx.netns(a))
        # bounded: a third namespace evicts the least recently used
        b, c = netns("sb"), netns("sc")
        ctx.sock(b)
        ctx.sock(c)
        assert len(ctx) == 2
    finally:
        ctx.close()


def test_spans_nest_under_the_callers_span(world: World, spans: InMemorySpanExporter) -> None:
    _host, cs, rec = world(2)
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("process vnet.node.{node}.endpoint.create") as parent:
        r = asyncio.run(_areconcile(rec, desired(cs)))
    assert_all_ready(r)
    by_name: dict[str, list[ReadableSpan]] = {}
    for s in spans.get_finished_spans():
        by_name.setdefault(s.name, []).append(s)
    (rs,) = by_name["node.reconcile"]
    assert rs.parent is not None and rs.parent.span_id == parent.get_span_context().span_id
    (ap,) = by_name["node.apply"]
    assert ap.parent is not None and ap.parent.span_id == rs.context.span_id
    kernel = [s for s in spans.get_finished_spans() if s.name.startswith("kernel ")]
    assert len(kernel) == r.ops_applied
    assert all(s.parent is not None and s.parent.span_id == ap.context.span_id for s in kernel)
    assert {s.name for s in kernel} >= {"kernel create_veth", "kernel ensure_bridge", "kernel add_route"}
    assert rs.attributes is not None and rs.attributes["vnet.writes"] == r.writes


async def _areconcile(rec: Reconciler, d: NodeDesired) -> ReconcileResult:
    return await rec.areconcile(d)  # from an event loop: runs in a thread, the trace context follows
