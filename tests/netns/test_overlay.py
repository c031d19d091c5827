"""The overlay data plane on a real kernel: hosts are namespaces on an underlay switch.

Three host namespaces (10.250.0.1-3 on a bridge in a fourth namespace), ten container
namespaces each, one overlay network (VNI 4242, 10.77.0.0/24, the same gateway on every
host). Each host gets its own desired state: its endpoints, and the others' as remote
endpoints (static FDB + neighbour entries on its VXLAN device). Then a fourth host
joins and leaves. Kernel state is checked with ``ip``/``bridge`` (not our observer).
"""

from __future__ import annotations

import json
import random
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from tests.conftest import requires_root
from tests.netns.conftest import ip_json, links, ping_all
from tests.netns.overlay_util import UNDERLAY_IF, Sockets, build_underlay, plug, underlay_addr
from vnet.core import naming
from vnet.core.dataplane_model import (
    EpDesired,
    NetDesired,
    NodeDesired,
    PeerHost,
    ReconcileResult,
    RemoteEndpoint,
    Scope,
    Underlay,
)
from vnet.core.model import DriverType
from vnet.svc.node.reconcile import Reconciler

pytestmark = [pytest.mark.netns, requires_root]

NET_ID = "ov-test"
VNI = 4242
VXLAN = naming.vxlan_name(NET_ID)
PER_HOST = 10


@dataclass
class Host:
    k: int
    ns: str
    rec: Reconciler
    eps: list[EpDesired] = field(default_factory=list)


def ep_for(k: int, i: int, ns: str) -> EpDesired:
    n = k * 20 + i + 10
    return EpDesired(id=f"h{k}-e{i}", network_id=NET_ID, netns=ns, mac=naming.local_mac(bytes([2, 0x77, 0, 0, k, i])),
                     ipv4=f"10.77.0.{n}/24", gw4="10.77.0.1")


def ip_of(e: EpDesired) -> str:
    assert e.ipv4 is not None
    return e.ipv4.split("/")[0]


def desired_for(h: Host, hosts: list[Host]) -> NodeDesired:
    others = [o for o in hosts if o.k != h.k]
    remotes = tuple(RemoteEndpoint(mac=e.mac, ipv4=e.ipv4, host=f"h{o.k}") for o in others for e in o.eps)
    net = NetDesired(id=NET_ID, driver=DriverType.OVERLAY, vni=VNI, gateway4="10.77.0.1/24", mtu=1450,
                     remotes=remotes)
    return NodeDesired(networks=[net], endpoints=list(h.eps),
                       underlay=Underlay(address=underlay_addr(h.k), ifname=UNDERLAY_IF),
                       peers=[PeerHost(name=f"h{o.k}", address=underlay_addr(o.k)) for o in others])


def ok(r: ReconcileResult) -> None:
    assert r.errors == [], r.errors
    assert all(s.state == "ready" for s in r.endpoints.values()), r.endpoints


def fdb(ns: str) -> dict[str, str]:
    out = subprocess.run(["bridge", "-n", ns, "-j", "fdb", "show", "dev", VXLAN], capture_output=True, text=True,
                         check=True).stdout
    return {x["mac"]: x["dst"] for x in json.loads(out or "[]") if "dst" in x}


def neigh(ns: str) -> dict[str, str]:
    return {x["dst"]: x.get("lladdr", "") for x in ip_json("neigh", "show", "dev", VXLAN, ns=ns)
            if "PERMANENT" in x.get("state", [])}


@pytest.fixture
def world(netns: Callable[[str], str]) -> Iterator[Callable[[int, int], Host]]:
    ul = build_underlay(netns)
    made: list[Host] = []

    def add_host(k: int, n: int) -> Host:
        hns = netns(f"h{k}")
        plug(ul, hns, k)
        h = Host(k, hns, Reconciler(hns))
        h.eps = [ep_for(k, i, netns(f"h{k}c{i}")) for i in range(n)]
        made.append(h)
        return h

    yield add_host
    for h in made:
        h.rec.close()


def test_three_hosts_ten_containers_each_then_a_fourth_joins_and_leaves(world: Callable[[int, int], Host]) -> None:
    hosts = [world(k, PER_HOST) for k in (1, 2, 3)]
    for h in hosts:
        ok(h.rec.reconcile(desired_for(h, hosts)))

    # the VXLAN device as asked: VNI, local, bound to the underlay, port 4789, nolearning, proxy, on the bridge
    for h in hosts:
        vx = links(h.ns)[VXLAN]
        data = vx["linkinfo"]["info_data"]
        assert data["id"] == VNI and data["local"] == underlay_addr(h.k) and data["port"] == 4789
        assert data["learning"] is False and data["proxy"] is True and data["link"] == UNDERLAY_IF
        assert vx["master"] == naming.bridge_name(NET_ID)
        others = [e for o in hosts if o is not h for e in o.eps]
        assert fdb(h.ns) == {e.mac: underlay_addr(int(e.id[1])) for e in others}
        assert neigh(h.ns) == {ip_of(e): e.mac for e in others}
        # no all-zeros (flooding) entry: unknown destinations and broadcasts are not sent anywhere
        assert "00:00:00:00:00:00" not in fdb(h.ns)

    # every host: a sample of cross-host pairs, ICMP + TCP + UDP; and the local gateway (distributed)
    rnd = random.Random(6)
    every = [(h, e) for h in hosts for e in h.eps]
    pairs = []
    for h in hosts:
        for e in rnd.sample(h.eps, 4):
            _, dst = rnd.choice([(o, x) for o, x in every if o is not h])
            pairs.append((e, dst))
    failed = ping_all([(e.netns, ip_of(d)) for e, d in pairs] + [(e.netns, "10.77.0.1") for _, e in every[::5]])
    assert failed == [], failed
    socks = Sockets()
    try:
        for e, d in pairs[:6]:
            assert socks.tcp(e.netns, d.netns, ip_of(d)), (e.id, d.id)
            assert socks.udp(e.netns, d.netns, ip_of(d)), (e.id, d.id)

        # converged: zero writes, full and network-scoped
        for h in hosts:
            assert h.rec.reconcile(desired_for(h, hosts)).writes == 0
            assert h.rec.reconcile(desired_for(h, hosts), Scope(networks=frozenset({NET_ID}))).writes == 0

        # a fourth host joins with new containers: the others learn it through their desired state
        t0 = time.monotonic()
        h4 = world(4, 3)
        hosts.append(h4)
        ok(h4.rec.reconcile(desired_for(h4, hosts)))
        for h in hosts[:3]:
            r = h.rec.reconcile(desired_for(h, hosts), Scope(networks=frozenset({NET_ID})))
            ok(r)
            assert r.writes == 2 * len(h4.eps)  # one FDB and one neighbour entry per new remote endpoint
        probes = [(e.netns, ip_of(d)) for h in hosts[:3] for e, d in zip(h.eps[:2], h4.eps[:2], strict=True)]
        probes += [(d.netns, ip_of(e)) for h in hosts[:3] for e, d in zip(h.eps[2:3], h4.eps[2:3], strict=True)]
        assert ping_all(probes) == []
        assert socks.tcp(hosts[0].eps[0].netns, h4.eps[0].netns, ip_of(h4.eps[0]))
        assert socks.udp(h4.eps[1].netns, hosts[1].eps[1].netns, ip_of(hosts[1].eps[1]))
        # quiet machine: well under a second (printed); the bound leaves room for a busy one
        join_s = time.monotonic() - t0
        print(f"\na joining host reachable from the others after {join_s:.2f} s")
        assert join_s < 30.0, "a joining host must be reachable (within 30 s)"
    finally:
        socks.close()

    # it leaves: every other host drops exactly its entries
    hosts.remove(h4)
    gone_macs = {e.mac for e in h4.eps}
    for h in hosts:
        r = h.rec.reconcile(desired_for(h, hosts), Scope(networks=frozenset({NET_ID})))
        ok(r)
        assert r.writes == 2 * len(h4.eps)
        assert not gone_macs & set(fdb(h.ns)), fdb(h.ns)
        assert not {ip_of(e) for e in h4.eps} & set(neigh(h.ns))
        assert len(fdb(h.ns)) == 2 * PER_HOST
    failed = ping_all([(hosts[0].eps[0].netns, ip_of(e)) for e in h4.eps[:1]])
    assert failed == [(hosts[0].eps[0].netns, ip_of(h4.eps[0]))]  # unreachable: no entry, no flooding

    # removing the network removes the VXLAN device and the bridge with it
    for h in hosts:
        ok(h.rec.reconcile(NodeDesired(underlay=Underlay(address=underlay_addr(h.k), ifname=UNDERLAY_IF))))
        names = set(links(h.ns))
        assert not any(naming.is_ours(n) for n in names), names
        assert UNDERLAY_IF in names


def test_vxlan_drift_is_repaired_and_missing_underlay_fails_the_network(world: Callable[[int, int], Host]) -> None:
    h1, h2 = world(1, 1), world(2, 1)
    hosts = [h1, h2]
    d1 = desired_for(h1, hosts)
    ok(h1.rec.reconcile(d1))
    ok(h2.rec.reconcile(desired_for(h2, hosts)))
    # drift: an FDB entry deleted by hand and a neighbour changed -> exactly those two repairs
    mac = h2.eps[0].mac
    subprocess.run(["bridge", "-n", h1.ns, "fdb", "del", mac, "dev", VXLAN, "dst", underlay_addr(2)], check=True)
    subprocess.run(["ip", "-n", h1.ns, "neigh", "replace", ip_of(h2.eps[0]), "lladdr", "02:00:00:00:00:99",
                    "dev", VXLAN, "nud", "permanent"], check=True)
    r = h1.rec.reconcile(d1)
    ok(r)
    assert r.writes == 2
    assert fdb(h1.ns) == {mac: underlay_addr(2)} and neigh(h1.ns) == {ip_of(h2.eps[0]): mac}
    assert ping_all([(h1.eps[0].netns, ip_of(h2.eps[0]))]) == []
    # the VXLAN device deleted by hand: rebuilt with its entries
    subprocess.run(["ip", "-n", h1.ns, "link", "del", VXLAN], check=True)
    ok(h1.rec.reconcile(d1))
    assert fdb(h1.ns) == {mac: underlay_addr(2)}
    assert h1.rec.reconcile(d1).writes == 0
    # an underlay interface that does not exist: the network (and its endpoints) fail, clearly
    bad = NodeDesired(networks=d1.networks, endpoints=d1.endpoints,
                      underlay=Underlay(address=underlay_addr(1), ifname="nosuch0"), peers=d1.peers)
    r = h1.rec.reconcile(bad)
    assert r.networks[NET_ID].state == "failed" and r.networks[NET_ID].code == "unavailable"
    assert "nosuch0" in r.networks[NET_ID].reason
    assert r.endpoints[h1.eps[0].id].state == "failed"



def test_two_overlay_networks_route_across_hosts_and_ipv6(world: Callable[[int, int], Host],
                                                          netns: Callable[[str], str]) -> None:
    """Distributed gateways: a container of network A on host 1 reaches a container of
    network B on host 2 through its local gateway (both hosts carry both networks, as
    the control plane arranges for related networks); B is dual-stack and its IPv6
    neighbours are answered by the VXLAN device's proxy too. (Which flows an isolation
    mode allows is the nftables engine's business, not tested here.)"""
    hosts = [world(1, 0), world(2, 0)]
    nets = {"ov-a": ("10.81.0", None, 811), "ov-b": ("10.82.0", "fd00:82:", 812)}
    eps: dict[tuple[str, int], EpDesired] = {}
    for h in hosts:
        for n, (v4, v6, _vni) in nets.items():
            eps[(n, h.k)] = EpDesired(
                id=f"{n}-h{h.k}", network_id=n, netns=netns(f"h{h.k}{n[-1]}"),
                mac=naming.local_mac(bytes([2, 0x79, 0, ord(n[-1]), h.k, 1])), ipv4=f"{v4}.{10 + h.k}/24",
                gw4=f"{v4}.1", ipv6=None if v6 is None else f"{v6}:{10 + h.k:x}/64",
                gw6=None if v6 is None else f"{v6}:1")

    def desired(h: Host) -> NodeDesired:
        o = 2 if h.k == 1 else 1
        networks = []
        for n, (v4, v6, vni) in nets.items():
            r = eps[(n, o)]
            networks.append(NetDesired(id=n, driver=DriverType.OVERLAY, vni=vni, gateway4=f"{v4}.1/24",
                                       gateway6=None if v6 is None else f"{v6}:1/64", mtu=1450,
                                       remotes=(RemoteEndpoint(mac=r.mac, ipv4=r.ipv4, ipv6=r.ipv6, host=f"h{o}"),)))
        return NodeDesired(networks=networks, endpoints=[eps[(n, h.k)] for n in nets],
                           underlay=Underlay(address=underlay_addr(h.k), ifname=UNDERLAY_IF),
                           peers=[PeerHost(name=f"h{o}", address=underlay_addr(o))])

    for h in hosts:
        ok(h.rec.reconcile(desired(h)))
    a1, b2, b1 = eps[("ov-a", 1)], eps[("ov-b", 2)], eps[("ov-b", 1)]
    assert ping_all([(a1.netns, ip_of(b2)), (b2.netns, ip_of(a1))]) == []  # routed across hosts, both ways
    assert b2.ipv6 is not None
    assert ping_all([(b1.netns, b2.ipv6.split("/")[0])]) == []  # IPv6 across, ND answered by the proxy
    for h in hosts:
        assert h.rec.reconcile(desired(h)).writes == 0
