"""Isolation on a real kernel: the four modes alone and in pairs across a connection, mesh
groups, parents and children, allow rules (by endpoint, label, network, ports; updated and
deleted), the time a change takes to be enforced, and an external peer beyond the uplink.

Expected results are written out in each test, never computed by the engine; the hosts,
probe agents and rulesets come from :mod:`tests.netns.isolation_lab`.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import pytest

from tests.conftest import requires_root
from tests.netns.conftest import ping
from tests.netns.isolation_lab import (
    ALL3,
    FULL,
    MESH,
    NONE,
    PEER,
    Agent,
    Ep,
    K,
    Lab,
    Net,
    both,
    expect_all3,
    reached,
)
from vnet.core import naming, nft
from vnet.core.policy import AllowRule, PortSpec, Published, Selector

pytestmark = [pytest.mark.netns, requires_root]


# --------------------------------------------------------------------------- modes


def test_each_mode_alone(lab: Callable[[list[Net], list[Ep]], Lab]) -> None:
    nets = [Net("full", FULL, "10.77.1.1/24"), Net("peer", PEER, "10.77.2.1/24"),
            Net("mesh", MESH, "10.77.3.1/24"), Net("none", NONE, "10.77.4.1/24")]
    eps = [Ep(f"{n.id[0]}{i}", n.id, f"10.77.{k + 1}.{10 + i}/24") for k, n in enumerate(nets) for i in (1, 2)]
    lb = lab(nets, eps)
    seen = lb.probe(ALL3)
    # Full: nothing, same network included; PeerOnly, MeshOnly, None: the peer in the
    # same network both ways; nothing across these unrelated networks.
    expect_all3(seen, both("p1-p2", "m1-m2", "n1-n2"))
    # traffic the host itself starts toward its endpoints is always allowed (health checks), Full included
    assert ping(lb.host, lb.eps["f1"].addr) and ping(lb.host, lb.eps["p2"].addr)
    # the enforcer converged: a second sync with the same script writes nothing
    assert lb.enf.sync(nft.render(lb.policy().compile("h1"))).wrote is False


def test_pairs_of_modes_across_a_connection(lab: Callable[[list[Net], list[Ep]], Lab]) -> None:
    combos = [(FULL, FULL), (FULL, PEER), (FULL, MESH), (FULL, NONE), (PEER, PEER), (PEER, MESH), (PEER, NONE),
              (MESH, MESH), (MESH, NONE), (NONE, NONE)]
    nets: list[Net] = []
    eps: list[Ep] = []
    for k, (ma, mb) in enumerate(combos):
        a, b = f"x{k}", f"y{k}"
        nets += [Net(a, ma, f"10.78.{2 * k}.1/24", connected=(b,)), Net(b, mb, f"10.78.{2 * k + 1}.1/24",
                                                                       connected=(a,))]
        eps += [Ep(f"a{k}", a, f"10.78.{2 * k}.10/24"), Ep(f"b{k}", b, f"10.78.{2 * k + 1}.10/24")]
    lb = lab(nets, eps)
    pairs = [(f"a{k}", f"b{k}") for k in range(len(combos))] + [(f"b{k}", f"a{k}") for k in range(len(combos))]
    # a path through the connection exists for every pair; only MeshOnly/None on BOTH sides use it
    expect_all3(lb.probe(ALL3, pairs), both("a7-b7", "a8-b8", "a9-b9"))
    # relations are not transitive, and unconnected pairs have no path: a sample
    assert lb.probe(ALL3, [("a7", "b8"), ("a9", "a8")]) == {"tcp/80": set(), "udp/80": set(), "icmp": set()}


def test_mesh_group(lab: Callable[[list[Net], list[Ep]], Lab]) -> None:
    nets = [Net("ma", MESH, "10.79.1.1/24", mesh=("g1",)), Net("mb", MESH, "10.79.2.1/24", mesh=("g1",)),
            Net("mc", NONE, "10.79.3.1/24", mesh=("g1", "g2")), Net("md", MESH, "10.79.4.1/24", mesh=("g2",)),
            Net("me", PEER, "10.79.5.1/24", mesh=("g1",)), Net("mf", MESH, "10.79.6.1/24")]
    eps = [Ep(n.id[1], n.id, f"10.79.{k + 1}.10/24") for k, n in enumerate(nets)]
    lb = lab(nets, eps)
    # g1 = {a, b, c(None), e(PeerOnly)}, g2 = {c, d}; f in no group. a-d: not related (no shared group)
    expect_all3(lb.probe(ALL3), both("a-b", "a-c", "b-c", "c-d"))


def test_parent_with_two_children(lab: Callable[[list[Net], list[Ep]], Lab]) -> None:
    nets = [Net("par", MESH, "10.80.0.1/16", children=("ch1", "ch2")),
            Net("ch1", MESH, "10.80.1.1/24", parent="par", children=("gc",)),
            Net("ch2", MESH, "10.80.2.1/24", parent="par"),
            Net("gc", MESH, "10.80.1.129/25", parent="ch1")]
    eps = [Ep("p", "par", "10.80.0.10/16"), Ep("c1", "ch1", "10.80.1.10/24"), Ep("c2", "ch2", "10.80.2.10/24"),
           Ep("g", "gc", "10.80.1.140/25")]
    lb = lab(nets, eps)
    # A child's subnet lies inside its parent's, so the parent's containers see it as
    # on-link and ARP for it on the parent's bridge; the host answers for the child's
    # addresses there: the plan sets proxy ARP (no delay) on every parent's bridge.
    for br, want in (("par", "1"), ("ch1", "1"), ("ch2", "0"), ("gc", "0")):
        b = naming.bridge_name(br)
        got = subprocess.run(["ip", "netns", "exec", lb.host, "sysctl", "-n", f"net.ipv4.conf.{b}.proxy_arp"],
                             check=True, capture_output=True, text=True).stdout.strip()
        assert got == want, (br, got)
    # parent <-> each child, child <-> its own child; siblings and grandparent/grandchild not related
    expect_all3(lb.probe(ALL3), both("p-c1", "p-c2", "c1-g"))


# --------------------------------------------------------------------------- rules


def test_allow_rules_by_endpoint_label_network_ports_update_delete(
        lab: Callable[[list[Net], list[Ep]], Lab]) -> None:
    nets = [Net("f", FULL, "10.81.1.1/24", connected=("g",)), Net("g", PEER, "10.81.2.1/24", connected=("f",)),
            Net("h", FULL, "10.81.3.1/24")]
    eps = [Ep("e1", "f", "10.81.1.11/24", {"role": "web"}), Ep("e2", "f", "10.81.1.12/24", {"role": "db"}),
           Ep("e3", "f", "10.81.1.13/24"), Ep("e4", "f", "10.81.1.14/24", {"role": "db"}),
           Ep("g1", "g", "10.81.2.11/24"), Ep("h1", "h", "10.81.3.11/24")]
    lb = lab(nets, eps)
    by_ep = AllowRule(id="by-endpoint", from_=[Selector(endpoint="e1")], to=[Selector(endpoint="e3")],
                      ports=[PortSpec(protocol="tcp", port=80)])
    by_label = AllowRule(id="by-label", from_=[Selector(labels={"role": "web"})], to=[Selector(labels={"role": "db"})],
                         ports=[PortSpec(protocol="tcp", port=80, end_port=90)])
    by_net = AllowRule(id="by-network", from_=[Selector(network="g")], to=[Selector(endpoint="e3")],
                       ports=[PortSpec(protocol="udp")])
    all_protos = AllowRule(id="all-protocols", from_=[Selector(endpoint="e4")], to=[Selector(endpoint="e1")])
    no_path = AllowRule(id="no-path", from_=[Selector(network="h")], to=[Selector(network="f")])
    lb.set_rules([by_ep, by_label, by_net, all_protos, no_path])
    checks: list[tuple[str, int | None]] = [("tcp", 80), ("tcp", 85), ("tcp", 443), ("udp", 80), ("udp", 85),
                                            ("icmp", None)]
    seen = lb.probe(checks)
    expected = {
        "tcp/80": {"e1>e3", "e1>e2", "e1>e4", "e4>e1"},
        "tcp/85": {"e1>e2", "e1>e4", "e4>e1"},
        "tcp/443": {"e4>e1"},
        "udp/80": {"g1>e3", "e4>e1"},
        "udp/85": {"g1>e3", "e4>e1"},
        "icmp": {"e4>e1"},
    }
    assert seen == expected

    # a label change grants, then revokes
    lb.eps["e3"].labels = {"role": "db"}
    lb.apply()
    assert lb.probe([("tcp", 85)], [("e1", "e3")]) == {"tcp/85": {"e1>e3"}}
    lb.eps["e3"].labels = {}
    lb.apply()
    assert lb.probe([("tcp", 85)], [("e1", "e3")]) == {"tcp/85": set()}

    # an update replaces the rule: by-endpoint now allows udp/80 only
    by_ep2 = AllowRule(id="by-endpoint", from_=[Selector(endpoint="e1")], to=[Selector(endpoint="e3")],
                       ports=[PortSpec(protocol="udp", port=80)])
    lb.set_rules([by_ep2, by_label, by_net, all_protos, no_path])
    pairs = [("e1", "e3"), ("e1", "e2")]
    assert lb.probe([("tcp", 80), ("udp", 80)], pairs) == {"tcp/80": {"e1>e2"}, "udp/80": {"e1>e3"}}
    # delete by-label
    lb.set_rules([by_ep2, by_net, all_protos, no_path])
    assert lb.probe([("tcp", 80), ("udp", 80)], pairs) == {"tcp/80": set(), "udp/80": {"e1>e3"}}


# --------------------------------------------------------------------------- convergence


def test_time_to_enforce(lab: Callable[[list[Net], list[Ep]], Lab]) -> None:
    """From the start of a ruleset change to a new connection reflecting it (grant and revoke)."""
    lb = lab([Net("t", FULL, "10.85.1.1/24")], [Ep("t1", "t", "10.85.1.10/24"), Ep("t2", "t", "10.85.1.20/24")])
    rule = AllowRule(id="t", from_=[Selector(endpoint="t1")], to=[Selector(endpoint="t2")],
                     ports=[PortSpec(protocol="tcp", port=80)])
    agent, dst = lb.agents["t1"], lb.eps["t2"].addr
    times: list[float] = []
    for i in range(16):
        grant = i % 2 == 0
        t0 = time.perf_counter()
        lb.set_rules([rule] if grant else [])
        while agent.send(op="tcp", dst=dst, port=80, t=0.05).result(30) is not grant:
            assert time.perf_counter() - t0 < ENFORCE_LIMIT_S, f"not enforced within {ENFORCE_LIMIT_S} s"
        times.append(time.perf_counter() - t0)
    times.sort()
    p50, p99 = times[len(times) // 2], times[-1]
    # The figure is the benchmark's (printed here, measured in tests/bench); the assertion only
    # says a change takes effect at all, with room for a machine busy with other work.
    print(f"\ntime-to-enforce over {len(times)} changes: p50 {p50 * 1e3:.0f} ms, p99 {p99 * 1e3:.0f} ms")
    assert p99 < ENFORCE_LIMIT_S


ENFORCE_LIMIT_S = 15.0  # quiet machine: tens of ms


# --------------------------------------------------------------------------- external


def test_external_peer(lab: Callable[[list[Net], list[Ep]], Lab], netns: Callable[[str], str]) -> None:
    """An "external" namespace beyond the host's uplink (192.0.2.2, the test's own address).
    It has no route back to the container subnets: egress works only masqueraded."""
    nets = [Net("xn", NONE, "10.86.1.1/24"), Net("xf", FULL, "10.86.2.1/24"), Net("xp", PEER, "10.86.3.1/24"),
            Net("xm", MESH, "10.86.4.1/24")]
    eps = [Ep("n", "xn", "10.86.1.10/24"), Ep("f", "xf", "10.86.2.10/24"), Ep("f2", "xf", "10.86.2.11/24"),
           Ep("p", "xp", "10.86.3.10/24", published=(Published(protocol="tcp", host_port=8080, port=85),)),
           Ep("m", "xm", "10.86.4.10/24"), Ep("n2", "xn", "10.86.1.11/24",
                                              published=(Published(protocol="tcp", host_port=8081, port=80),))]
    lb = lab(nets, eps)
    ext = netns("ext")
    subprocess.run(["ip", "-n", lb.host, "link", "add", "up0", "type", "veth", "peer", "name", "eth0", "netns", ext],
                   check=True)
    subprocess.run(["ip", "-n", lb.host, "addr", "add", "192.0.2.1/24", "dev", "up0"], check=True)
    subprocess.run(["ip", "-n", lb.host, "link", "set", "up0", "up"], check=True)
    subprocess.run(["ip", "-n", ext, "addr", "add", "192.0.2.2/24", "dev", "eth0"], check=True)
    subprocess.run(["ip", "-n", ext, "link", "set", "eth0", "up"], check=True)
    agent = Agent(ext)
    try:
        # f may reach that one external address on tcp/80 by a CIDR rule; f2 may not
        lb.set_rules([AllowRule(id="ext", from_=[Selector(endpoint="f")], to=[Selector(cidr="192.0.2.2/32")],
                                ports=[PortSpec(protocol="tcp", port=80)])])

        def out(checks: list[tuple[str, int | None]]) -> dict[str, set[str]]:
            def send(e: str, p: str, q: int | None) -> Callable[[float], Future[Any]]:
                return lambda t: lb.agents[e].send(op=p, dst="192.0.2.2", port=q, t=t)

            res: dict[str, set[str]] = {f"{p}/{q}" if q else p: set() for p, q in checks}
            for key, e in reached({(f"{p}/{q}" if q else p, e): send(e, p, q) for e in lb.eps for p, q in checks}):
                res[key].add(e)
            return res

        def from_each(op: str, dst: Callable[[str], str], port: int | None = None) -> set[str]:
            """The endpoints whose probe to ``dst(endpoint)`` succeeded."""
            def send(e: str) -> Callable[[float], Future[Any]]:
                return lambda t: lb.agents[e].send(op=op, dst=dst(e), port=port, t=t)
            return reached({e: send(e) for e in lb.eps})

        def from_ext(targets: dict[K, tuple[str, int]]) -> set[K]:
            """The external peer's TCP connects that succeeded."""
            def send(dst: str, port: int) -> Callable[[float], Future[Any]]:
                return lambda t: agent.send(op="tcp", dst=dst, port=port, t=t)
            return reached({k: send(*v) for k, v in targets.items()})

        assert out([("tcp", 80), ("tcp", 443), ("udp", 80), ("icmp", None)]) == {
            "tcp/80": {"n", "f", "n2"}, "tcp/443": {"n", "n2"}, "udp/80": {"n", "n2"}, "icmp": {"n", "n2"}}
        # the host's own address on a network's bridge is external too
        gw = {e: lb.nets[lb.eps[e].net].cidr.split("/")[0] for e in lb.eps}
        assert from_each("icmp", gw.__getitem__) == {"n", "n2"}
        # published ports (DNAT, no proxy): p's tcp/85 as host port 8080 (PeerOnly), n2's tcp/80 as 8081 (None)
        assert from_ext({hp: ("192.0.2.1", hp) for hp in (8080, 8081, 8082)}) == {8080, 8081}
        # hairpin: containers toward a published port on a host address; that is egress (external), so
        # only None networks may (n toward its peer n2 on the same bridge, masqueraded)
        assert from_each("tcp", lambda e: "192.0.2.1", 8080) == {"n", "n2"}
        assert reached({"n": lambda t: lb.agents["n"].send(op="tcp", dst="10.86.1.1", port=8081, t=t)}) == {"n"}
        # inbound: with a route toward the containers, the external peer reaches only the None network
        subprocess.run(["ip", "-n", ext, "route", "add", "10.86.0.0/16", "via", "192.0.2.1"], check=True)
        assert from_ext({e: (lb.eps[e].addr, 80) for e in lb.eps}) == {"n", "n2"}
        # a published container port is reachable routed too (Docker's behaviour); others are not
        assert from_ext({e: (lb.eps[e].addr, 85) for e in lb.eps}) == {"n", "n2", "p"}
    finally:
        agent.close()
