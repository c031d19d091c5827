"""Isolation on a real kernel: the four modes, relations, allow rules, anti-spoofing.

A host is a namespace made by the ``netns`` fixture; its bridges and veths come from
the existing :class:`Reconciler`; the policy engine's ruleset is applied in the host
namespace by :class:`NftEnforcer` (one ``nft -f`` transaction). Each container runs a
small probe agent (``ip netns exec <ns> python -c AGENT``) that listens (TCP 80/85/443,
UDP echo 80/85, a UDP log on 7000) and, on command, probes a peer with a TCP connect,
a UDP exchange or an ICMP echo, or sends a hand-made Ethernet frame (raw socket) to
test anti-spoofing. Every address is the test's own, inside its namespaces.

Expected results are written out in each test, never computed by the engine.
"""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import requires_root
from tests.netns.conftest import ip_json, ping, wait_links_ready
from vnet.adapters.nftables import NftEnforcer
from vnet.core import naming, nft
from vnet.core.dataplane_model import EpDesired, NetDesired, NodeDesired
from vnet.core.model import IsolationMode
from vnet.core.policy import AllowRule, Policy, PolicyEndpoint, PolicyNetwork, PortSpec, Published, Selector
from vnet.svc.node.reconcile import Reconciler

pytestmark = [pytest.mark.netns, requires_root]

FULL, PEER, MESH, NONE = IsolationMode.FULL, IsolationMode.PEER_ONLY, IsolationMode.MESH_ONLY, IsolationMode.NONE
T = 1.0  # probe timeout (s); a dropped probe costs this much, probes run in parallel
T_RETRY = 2.0  # the timeout of the second try of a probe that failed
K = TypeVar("K")

AGENT = r'''
import json, os, random, socket, struct, sys, threading, time
TCP, UDP, LOG = (80, 85, 443), (80, 85), 7000
seen, out_lock = set(), threading.Lock()
def serve_tcp(p):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", p)); s.listen(256)
    while True:
        c, _ = s.accept(); c.close()
def serve_udp(p, log):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", p))
    while True:
        d, a = s.recvfrom(2048)
        if log:
            seen.add(d.decode(errors="replace"))
        else:
            s.sendto(d, a)
def tcp(dst, port, t):
    try:
        socket.create_connection((dst, port), timeout=t).close(); return True
    except OSError:
        return False
def udp(dst, port, t):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); tok = os.urandom(12); end = time.time() + t
    try:
        s.sendto(tok, (dst, port))
        while time.time() < end:
            s.settimeout(max(0.01, end - time.time()))
            try:
                d, a = s.recvfrom(2048)
            except OSError:
                return False
            if d == tok and a[0] == dst:
                return True
        return False
    finally:
        s.close()
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b)); s = (s >> 16) + (s & 0xFFFF); s += s >> 16
    return ~s & 0xFFFF
def icmp(dst, t):
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP); ident = random.randrange(1, 65535)
    body = os.urandom(16); hdr = struct.pack("!BBHHH", 8, 0, 0, ident, 1)
    pkt = struct.pack("!BBHHH", 8, 0, csum(hdr + body), ident, 1) + body; end = time.time() + t
    try:
        s.sendto(pkt, (dst, 0))
        while time.time() < end:
            s.settimeout(max(0.01, end - time.time()))
            try:
                d, a = s.recvfrom(2048)
            except OSError:
                return False
            ihl = (d[0] & 0xF) * 4
            if a[0] == dst and d[ihl] == 0 and struct.unpack("!H", d[ihl + 4:ihl + 6])[0] == ident:
                return True
        return False
    finally:
        s.close()
def mac(m): return bytes.fromhex(m.replace(":", ""))
def ip4(a): return socket.inet_aton(a)
def raw_udp(ifname, smac, dmac, sip, dip, dport, payload):
    p = payload.encode(); udp_ = struct.pack("!HHHH", 40000, dport, 8 + len(p), 0) + p
    iph = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp_), 1, 0, 64, 17, 0, ip4(sip), ip4(dip))
    iph = iph[:10] + struct.pack("!H", csum(iph)) + iph[12:]
    frame = mac(dmac) + mac(smac) + b"\x08\x00" + iph + udp_
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW); s.bind((ifname, 0)); s.send(frame); s.close(); return True
def raw_arp(ifname, smac, sha, spa, tpa):
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac(sha), ip4(spa), b"\0" * 6, ip4(tpa))
    frame = b"\xff" * 6 + mac(smac) + b"\x08\x06" + arp + b"\0" * 18
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW); s.bind((ifname, 0)); s.send(frame); s.close(); return True
def handle(cmd):
    op = cmd["op"]
    if op == "tcp": r = tcp(cmd["dst"], cmd["port"], cmd["t"])
    elif op == "udp": r = udp(cmd["dst"], cmd["port"], cmd["t"])
    elif op == "icmp": r = icmp(cmd["dst"], cmd["t"])
    elif op == "raw_udp": r = raw_udp(*cmd["args"])
    elif op == "raw_arp": r = raw_arp(*cmd["args"])
    elif op == "seen": r = cmd["token"] in seen
    else: r = None
    with out_lock:
        sys.stdout.write(json.dumps({"id": cmd["id"], "r": r}) + "\n"); sys.stdout.flush()
for p in TCP: threading.Thread(target=serve_tcp, args=(p,), daemon=True).start()
for p in UDP: threading.Thread(target=serve_udp, args=(p, False), daemon=True).start()
threading.Thread(target=serve_udp, args=(LOG, True), daemon=True).start()
time.sleep(0.05)
sys.stdout.write("ready\n"); sys.stdout.flush()
for line in sys.stdin:
    threading.Thread(target=handle, args=(json.loads(line),), daemon=True).start()
'''


def reached(sends: dict[K, Callable[[float], Future[Any]]]) -> set[K]:
    """The keys whose probe succeeded. ``sends[k](t)`` starts probe ``k`` with timeout ``t``.
    All run in parallel; whatever failed runs once more, all together, with a longer timeout:
    a loaded machine must not turn "allowed" into "denied" (a denied probe fails both times)."""
    futs = {k: send(T) for k, send in sends.items()}
    ok = {k for k, f in futs.items() if f.result(timeout=60)}
    again = {k: sends[k](T_RETRY) for k in futs if k not in ok}
    return ok | {k for k, f in again.items() if f.result(timeout=60)}


class Agent:
    """The probe agent of one container namespace (a process this test started)."""

    def __init__(self, ns: str) -> None:
        self.ns = ns
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", AGENT],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self._ids = itertools.count()
        self._pending: dict[int, Future[Any]] = {}
        self._lock = threading.Lock()
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        assert first.strip() == "ready", f"agent in {ns} did not start: {first!r}"
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            msg = json.loads(line)
            with self._lock:
                fut = self._pending.pop(msg["id"], None)
            if fut is not None:
                fut.set_result(msg["r"])

    def send(self, **cmd: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        with self._lock:
            i = next(self._ids)
            self._pending[i] = fut
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"id": i, **cmd}) + "\n")
        self.proc.stdin.flush()
        return fut

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=5)


@dataclass
class Net:
    id: str
    mode: IsolationMode
    cidr: str  # the bridge's gateway as interface CIDR, e.g. "10.77.1.1/24"
    connected: tuple[str, ...] = ()
    parent: str | None = None
    children: tuple[str, ...] = ()
    mesh: tuple[str, ...] = ()

    def policy(self) -> PolicyNetwork:
        gw = self.cidr.split("/")[0]
        import ipaddress
        return PolicyNetwork(id=self.id, mode=self.mode, cidrs=(str(ipaddress.ip_interface(self.cidr).network),),
                             gateways=(gw,), connected=self.connected, parent=self.parent, children=self.children,
                             mesh_groups=self.mesh)


@dataclass
class Ep:
    id: str
    net: str
    ip: str  # interface CIDR inside the container
    labels: dict[str, str] = field(default_factory=dict)
    published: tuple[Published, ...] = ()

    @property
    def addr(self) -> str:
        return self.ip.split("/")[0]

    @property
    def mac(self) -> str:
        return naming.local_mac(bytes.fromhex(naming.veth_name(self.id)[3:]))


class Lab:
    """One host namespace, a container per endpoint, the reconciler and the enforcer."""

    def __init__(self, netns: Callable[[str], str], nets: list[Net], eps: list[Ep]) -> None:
        self.nets = {n.id: n for n in nets}
        self.eps = {e.id: e for e in eps}
        self.host = netns("h1")
        self.ns = {e.id: netns(f"c-{e.id}") for e in eps}
        self.rules: list[AllowRule] = []
        self.enf = NftEnforcer(self.host)
        if not self.enf.support().available:
            self.enf.enable_br_netfilter()
        assert self.enf.support().available, self.enf.support().reason
        self.apply()  # before the interfaces exist: a new endpoint is protected from its first packet
        self.rec = Reconciler(self.host)
        nd = NodeDesired(
            networks=[NetDesired(id=n.id, gateway4=n.cidr) for n in nets],
            endpoints=[EpDesired(id=e.id, network_id=e.net, netns=self.ns[e.id], mac=e.mac, ipv4=e.ip,
                                 gw4=self.nets[e.net].cidr.split("/")[0]) for e in eps])
        r = self.rec.reconcile(nd)
        assert r.errors == [], r.errors
        wait_links_ready(self.host, *self.ns.values())
        self.agents: dict[str, Agent] = {}
        try:
            for e in eps:
                self.agents[e.id] = Agent(self.ns[e.id])
        except BaseException:
            self.close()
            raise

    def policy(self) -> Policy:
        return Policy([n.policy() for n in self.nets.values()],
                      [PolicyEndpoint(id=e.id, network=e.net, ips=(e.addr,), mac=e.mac, labels=dict(e.labels),
                                      node="h1", published=e.published) for e in self.eps.values()], self.rules)

    def apply(self) -> None:
        self.enf.sync(nft.render(self.policy().compile("h1")))

    def set_rules(self, rules: list[AllowRule]) -> None:
        self.rules = list(rules)
        self.apply()

    def probe(self, checks: list[tuple[str, int | None]], pairs: list[tuple[str, str]] | None = None,
              ) -> dict[str, set[str]]:
        """``{"tcp/80": {"a>b", ...}, ...}``: the pairs whose probe succeeded."""
        if pairs is None:
            pairs = [(a, b) for a in self.eps for b in self.eps if a != b]

        def send(a: str, b: str, proto: str, port: int | None) -> Callable[[float], Future[Any]]:
            return lambda t: self.agents[a].send(op=proto, dst=self.eps[b].addr, port=port, t=t)

        sends = {(f"{proto}/{port}" if port else proto, f"{a}>{b}"): send(a, b, proto, port)
                 for a, b in pairs for proto, port in checks}
        out: dict[str, set[str]] = {f"{p}/{q}" if q else p: set() for p, q in checks}
        for key, pair in reached(sends):
            out[key].add(pair)
        return out

    def close(self) -> None:
        for a in getattr(self, "agents", {}).values():
            a.close()
        if hasattr(self, "rec"):
            self.rec.close()


ALL3: list[tuple[str, int | None]] = [("tcp", 80), ("udp", 80), ("icmp", None)]


def both(*pairs: str) -> set[str]:
    """``both("a-b")`` -> {"a>b", "b>a"}."""
    out: set[str] = set()
    for p in pairs:
        a, b = p.split("-")
        out |= {f"{a}>{b}", f"{b}>{a}"}
    return out


def expect_all3(seen: dict[str, set[str]], expected: set[str]) -> None:
    for key, got in seen.items():
        assert got == expected, f"{key}: unexpected {sorted(got - expected)}, missing {sorted(expected - got)}"


@pytest.fixture
def lab(netns: Callable[[str], str]) -> Iterator[Callable[[list[Net], list[Ep]], Lab]]:
    made: list[Lab] = []

    def make(nets: list[Net], eps: list[Ep]) -> Lab:
        lb = Lab(netns, nets, eps)
        made.append(lb)
        return lb

    yield make
    for lb in made:
        lb.close()


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


# --------------------------------------------------------------------------- anti-spoofing


def neigh_mac(ns: str, addr: str) -> str | None:
    for x in ip_json("neigh", "show", addr, ns=ns):
        if x.get("lladdr"):
            return str(x["lladdr"])
    return None


def eventually(cond: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def assert_forgeries_dropped(att: Agent, vic: Agent, eps: dict[str, Ep], vic_ns: str, *,
                             sent_ok: bool = True) -> None:
    """Endpoint ``att`` forges frames and ARP requests toward ``vic`` (another endpoint's
    address, a foreign address, a forged MAC): only its genuine ones arrive. ``sent_ok``:
    every raw send must succeed (false where a forged frame may be refused at the sender)."""
    a, v, peer = eps["att"], eps["vic"], eps["peer"]

    def send(op: str, args: list[Any]) -> None:
        ok = att.send(op=op, args=args).result(30)
        assert ok or not sent_ok, f"{op} {args} could not be sent"

    def udp_from(token: str, smac: str, sip: str) -> None:
        send("raw_udp", ["eth0", smac, v.mac, sip, v.addr, 7000, token])

    # The forged frames first, the genuine one last, on the same path into the victim's one
    # UDP socket: once the genuine one is logged, a forged one that got through would be too
    # (no sleep that a slow machine could outlast).
    udp_from("peer-ip", a.mac, peer.addr)
    udp_from("foreign-ip", a.mac, "10.99.0.99")
    udp_from("forged-mac", "02:de:ad:be:ef:01", a.addr)
    udp_from("forged-mac-and-peer", peer.mac, peer.addr)
    udp_from("own", a.mac, a.addr)
    eventually(lambda: bool(vic.send(op="seen", token="own").result(30)), "the genuine frame never arrived")
    got = {t for t in ("own", "peer-ip", "foreign-ip", "forged-mac", "forged-mac-and-peer")
           if vic.send(op="seen", token=t).result(30)}
    assert got == {"own"}

    # ARP: a request claiming the peer's address is dropped; one with our own passes (sent
    # second, so once it is learnt the forged one has been dealt with too)
    subprocess.run(["ip", "-n", vic_ns, "neigh", "flush", "all"], check=True)
    send("raw_arp", ["eth0", a.mac, a.mac, peer.addr, v.addr])
    send("raw_arp", ["eth0", a.mac, a.mac, a.addr, v.addr])
    eventually(lambda: neigh_mac(vic_ns, a.addr) == a.mac, "the genuine ARP request was not learnt")
    assert neigh_mac(vic_ns, peer.addr) is None


@pytest.mark.parametrize("mode", [FULL, PEER, MESH, NONE], ids=lambda m: m.value)
def test_anti_spoofing(lab: Callable[[list[Net], list[Ep]], Lab], mode: IsolationMode) -> None:
    nets = [Net("s", mode, "10.82.1.1/24")]
    eps = [Ep("att", "s", "10.82.1.10/24"), Ep("vic", "s", "10.82.1.20/24"), Ep("peer", "s", "10.82.1.30/24")]
    lb = lab(nets, eps)
    # inside the network everything is allowed by a rule, in every mode: only anti-spoofing can drop
    lb.set_rules([AllowRule(id="open", from_=[Selector(network="s")], to=[Selector(network="s")])])
    assert_forgeries_dropped(lb.agents["att"], lb.agents["vic"], lb.eps, lb.ns["vic"])
    # and the attacker's own traffic still passes through the kernel's stack
    assert lb.probe(ALL3, [("att", "vic")]) == {"tcp/80": {"att>vic"}, "udp/80": {"att>vic"}, "icmp": {"att>vic"}}


# --------------------------------------------------------------------------- resync


def test_deleted_or_altered_table_is_restored_and_workers_exit_leaves_rules(
        lab: Callable[[list[Net], list[Ep]], Lab]) -> None:
    lb = lab([Net("r", PEER, "10.83.1.1/24")], [Ep("r1", "r", "10.83.1.10/24"), Ep("r2", "r", "10.83.1.20/24"),
                                               Ep("q", "r", "10.83.1.30/24")])
    script = nft.render(lb.policy().compile("h1"))
    subprocess.run(["ip", "netns", "exec", lb.host, "nft", "delete", "table", "bridge", "vnet"], check=True)
    r = lb.enf.sync(script)
    assert (r.wrote, r.reason) == (True, "table missing")
    subprocess.run(["ip", "netns", "exec", lb.host, "nft", "add", "element", "bridge", "vnet", "mac_bind",
                    '{ "vne000000000000" . 02:00:00:00:00:01 }'], check=True)
    r = lb.enf.sync(script)
    assert (r.wrote, r.reason) == (True, "table altered")
    assert lb.enf.sync(script).wrote is False
    # a foreign accept-all table cannot open what ours forbids (Full would forbid r1 -> r2)
    lb.nets["r"].mode = FULL
    lb.apply()
    subprocess.run(["ip", "netns", "exec", lb.host, "nft", "-f", "-"], check=True, text=True,
                   input="table inet foreign {\n chain f {\n type filter hook forward priority -500; policy accept;\n"
                         " counter accept\n }\n}\n")
    blocked: dict[str, set[str]] = {"tcp/80": set(), "udp/80": set(), "icmp": set()}
    assert lb.probe(ALL3, [("r1", "r2")]) == blocked
    # Fail static: a worker process that applied this ruleset and then exits (stopped the way a
    # service manager stops it, or killed) removes nothing: the tables stay, and keep enforcing.
    script = nft.render(lb.policy().compile("h1"))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        worker = subprocess.Popen([sys.executable, "-c", WORKER, lb.host], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert worker.stdin is not None and worker.stdout is not None
            worker.stdin.write(script)
            worker.stdin.close()
            line = worker.stdout.readline()
            assert line.startswith("applied"), f"the worker did not apply the ruleset: {line!r}"
            worker.send_signal(sig)
            rc = worker.wait(timeout=60)
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
        assert rc == -sig, (sig, rc)
        assert our_tables(lb.host) == {"table inet vnet", "table bridge vnet"}, sig
        assert lb.probe(ALL3, [("r1", "r2")]) == blocked, f"not enforced after the worker got {sig!r}"
    # Control: without our tables the same probes pass, so the checks above can fail.
    subprocess.run(["ip", "netns", "exec", lb.host, "nft", "-f", "-"], check=True, text=True,
                   input="delete table inet vnet\ndelete table bridge vnet\n")
    assert lb.probe(ALL3, [("r1", "r2")]) == {"tcp/80": {"r1>r2"}, "udp/80": {"r1>r2"}, "icmp": {"r1>r2"}}


# A node worker's enforcer in a process of its own: it applies the ruleset it reads on stdin,
# says so, and waits to be stopped.
WORKER = r'''
import signal, sys
from vnet.adapters.nftables import NftEnforcer
res = NftEnforcer(sys.argv[1]).sync(sys.stdin.read())
print("applied", res.wrote, res.reason, flush=True)
signal.pause()
'''


def our_tables(ns: str) -> set[str]:
    out = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "tables"], check=True, capture_output=True,
                         text=True).stdout
    return {line.strip() for line in out.splitlines() if line.strip().endswith(" vnet")}


# --------------------------------------------------------------------------- property


MODES = [FULL, PEER, MESH, NONE]
PNETS = ["n0", "n1", "n2"]
PEPS = [("p0", "n0"), ("p1", "n0"), ("p2", "n1"), ("p3", "n2")]


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[IsolationMode], set[tuple[str, str, str]], list[AllowRule],
                                        dict[str, dict[str, str]]]:
    modes = [draw(st.sampled_from(MODES)) for _ in PNETS]
    rels: set[tuple[str, str, str]] = set()
    for a, b in itertools.combinations(PNETS, 2):
        kind = draw(st.sampled_from(["", "", "connected", "mesh", "parent"]))
        if kind:
            rels.add((kind, a, b))
    labels = {e: ({"tier": draw(st.sampled_from(["a", "b"]))}) for e, _ in PEPS}
    rules: list[AllowRule] = []
    for i in range(draw(st.integers(0, 3))):
        def sel() -> Selector:
            k = draw(st.sampled_from(["endpoint", "network", "labels"]))
            if k == "endpoint":
                return Selector(endpoint=draw(st.sampled_from([e for e, _ in PEPS])))
            if k == "network":
                return Selector(network=draw(st.sampled_from(PNETS)))
            return Selector(labels={"tier": draw(st.sampled_from(["a", "b"]))})
        ports = draw(st.sampled_from([None, [PortSpec(protocol="tcp", port=80)],
                                      [PortSpec(protocol="tcp", port=443)], [PortSpec(protocol="icmp")],
                                      [PortSpec(protocol="tcp", port=70, end_port=85)]]))
        rules.append(AllowRule(id=f"r{i}", from_=[sel()], to=[sel()], ports=ports))
    return modes, rels, rules, labels


@pytest.fixture
def prop_lab(lab: Callable[[list[Net], list[Ep]], Lab]) -> Lab:
    nets = [Net(n, FULL, f"10.84.{k}.1/24") for k, n in enumerate(PNETS)]
    eps = [Ep(e, n, f"10.84.{PNETS.index(n)}.{10 + i}/24") for i, (e, n) in enumerate(PEPS)]
    return lab(nets, eps)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sc=scenarios())
def test_explain_equals_observed(prop_lab: Lab, sc: tuple[list[IsolationMode], set[tuple[str, str, str]],
                                                         list[AllowRule], dict[str, dict[str, str]]]) -> None:
    lb = prop_lab
    _set_scenario(lb, sc)
    checks: list[tuple[str, int | None]] = [("tcp", 80), ("icmp", None)]
    seen = lb.probe(checks)
    pol = lb.policy()
    want: dict[str, set[str]] = {"tcp/80": set(), "icmp": set()}
    for a, b in itertools.permutations([e for e, _ in PEPS], 2):
        if pol.verdict(a, b, "tcp", 80).allowed:
            want["tcp/80"].add(f"{a}>{b}")
        if pol.verdict(a, b, "icmp").allowed:
            want["icmp"].add(f"{a}>{b}")
    assert seen == want, sc


Scenario = tuple[list[IsolationMode], set[tuple[str, str, str]], list[AllowRule], dict[str, dict[str, str]]]


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(before=scenarios(), after=scenarios())
def test_reach_diff_equals_the_change_in_probes(prop_lab: Lab, before: Scenario, after: Scenario) -> None:
    """What a dry run answers (vnet.core.reach, the engine behind every ``dry_run``) is what the
    kernel then does: over random pairs of topologies (modes, relations, rules and labels all
    change at once), a probe that changed from denied to allowed is an opened path of the
    diff, the other way a closed one, and an unchanged probe is in no path of the diff."""
    from vnet.core import reach

    lb = prop_lab
    checks: list[tuple[str, int | None]] = [("tcp", 80), ("icmp", None)]
    _set_scenario(lb, before)
    seen_b, pol_b = lb.probe(checks), lb.policy()
    _set_scenario(lb, after)
    seen_a, pol_a = lb.probe(checks), lb.policy()
    paths = reach.paths(pol_b, pol_a)

    def in_diff(src: str, dst: str, proto: str, port: int | None) -> bool | None:
        for p in paths:
            if (p.src, p.dst) == (src, dst) and p.protocol in (proto, "any") and (
                    port is None or p.protocol == "any" or p.lo <= port <= p.hi):
                return p.opened
        return None

    for a, b in itertools.permutations([e for e, _ in PEPS], 2):
        for proto, port in checks:
            key = f"{proto}/{port}" if port else proto
            was, now = f"{a}>{b}" in seen_b[key], f"{a}>{b}" in seen_a[key]
            got = in_diff(a, b, proto, port)
            assert got == (now if was != now else None), (key, a, b, was, now, got, before, after)


def _set_scenario(lb: Lab, sc: Scenario) -> None:
    modes, rels, rules, labels = sc
    for n, m in zip(PNETS, modes, strict=True):
        net = lb.nets[n]
        net.mode, net.connected, net.mesh, net.parent, net.children = m, (), (), None, ()
    for kind, a, b in rels:
        na, nb = lb.nets[a], lb.nets[b]
        if kind == "connected":
            na.connected += (b,)
            nb.connected += (a,)
        elif kind == "mesh":
            na.mesh += (f"{a}{b}",)
            nb.mesh += (f"{a}{b}",)
        else:
            nb.parent, na.children = a, (*na.children, b)
    for e, lab_ in labels.items():
        lb.eps[e].labels = lab_
    lb.rules = rules
    lb.apply()


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
