"""The isolation lab of the real-kernel tests (``test_isolation_*.py``, and the macvlan,
policy, drift, relation-event, overlay and exposure tests that reuse its probe agent).

A host is a namespace made by the ``netns`` fixture; its bridges and veths come from
the existing :class:`Reconciler`; the policy engine's ruleset is applied in the host
namespace by :class:`NftEnforcer` (one ``nft -f`` transaction). Each container runs a
small probe agent (``ip netns exec <ns> python -c AGENT``) that listens (TCP 80/85/443,
UDP echo 80/85, a UDP log on 7000) and, on command, probes a peer with a TCP connect,
a UDP exchange or an ICMP echo, or sends a hand-made Ethernet frame (raw socket) to
test anti-spoofing. Every address is the test's own, inside its namespaces.

Also here: the forgeries an attacker's agent sends (:func:`assert_forgeries_dropped`) and
the random topologies of the property tests (:func:`scenarios`).
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from hypothesis import strategies as st

from tests.netns.conftest import ip_json, wait_links_ready
from vnet.adapters.nftables import NftEnforcer
from vnet.core import naming, nft
from vnet.core.dataplane_model import EpDesired, NetDesired, NodeDesired
from vnet.core.model import IsolationMode
from vnet.core.policy import AllowRule, Policy, PolicyEndpoint, PolicyNetwork, PortSpec, Published, Selector
from vnet.svc.node.reconcile import Reconciler

FULL, PEER, MESH, NONE = IsolationMode.FULL, IsolationMode.PEER_ONLY, IsolationMode.MESH_ONLY, IsolationMode.NONE
T = 1.0  # probe timeout (s); a dropped probe costs this much, probes run in parallel
T_RETRY = 2.0  # the timeout of the second try of a probe that failed
K = TypeVar("K")

AGENT = r'''
import itertools, json, os, random, socket, struct, sys, threading, time
TCP, UDP, LOG = (80, 85, 443), (80, 85), 7000
seen, out_lock = set(), threading.Lock()
# Each echo of this agent gets an identifier of its own (a counter, not a fresh random draw):
# conntrack keys an echo flow by (source, destination, identifier) and keeps it ~30 s, so a
# new probe that drew the identifier of an earlier, allowed one to the same peer matched
# that flow and passed as "established" under a ruleset that denies it (a false "allowed").
icmp_ids = itertools.count(random.randrange(65534))
# The same for UDP: conntrack keys a UDP flow by its ports and keeps it 30-120 s, and the
# kernel draws ephemeral source ports at random (a repeat among ~100 probes to one peer is
# ~15 % likely), so each UDP probe binds a source port of its own, counted below the
# kernel's ephemeral range (32768-60999) and away from the ports served here.
udp_ports = itertools.count(random.randrange(10000))
def udp_socket():
    for _ in range(100):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.bind(("0.0.0.0", 20000 + next(udp_ports) % 10000)); return s
        except OSError:
            s.close()
    return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
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
    s = udp_socket(); tok = os.urandom(12); end = time.time() + t
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
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP); ident = next(icmp_ids) % 65534 + 1
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


def probe_pairs(agents: dict[str, Agent], addr: Callable[[str], str], pairs: list[tuple[str, str]],
                checks: list[tuple[str, int | None]]) -> dict[str, set[str]]:
    """``{"tcp/80": {"a>b", ...}, ...}``: the pairs whose probe from ``a``'s agent to
    ``addr(b)`` succeeded (every probe in parallel, the failed ones once more)."""
    def send(a: str, b: str, proto: str, port: int | None) -> Callable[[float], Future[Any]]:
        return lambda t: agents[a].send(op=proto, dst=addr(b), port=port, t=t)

    sends = {(f"{proto}/{port}" if port else proto, f"{a}>{b}"): send(a, b, proto, port)
             for a, b in pairs for proto, port in checks}
    out: dict[str, set[str]] = {f"{p}/{q}" if q else p: set() for p, q in checks}
    for key, pair in reached(sends):
        out[key].add(pair)
    return out


class Agent:
    """The probe agent of one container namespace (a process this test started)."""

    SCRIPT = AGENT  # a subclass may run another agent speaking the same lines

    def __init__(self, ns: str) -> None:
        self.ns = ns
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", self.SCRIPT],
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
        return probe_pairs(self.agents, lambda b: self.eps[b].addr, pairs, checks)

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


MODES = [FULL, PEER, MESH, NONE]
PNETS = ["n0", "n1", "n2"]
PEPS = [("p0", "n0"), ("p1", "n0"), ("p2", "n1"), ("p3", "n2")]


Scenario = tuple[list[IsolationMode], set[tuple[str, str, str]], list[AllowRule], dict[str, dict[str, str]]]


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
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


class ScenarioLab(Protocol):
    """What :func:`set_scenario` needs of a lab (the bridge lab here, the macvlan one)."""

    nets: dict[str, Net]
    eps: dict[str, Ep]
    rules: list[AllowRule]

    def apply(self) -> Any: ...


def set_scenario(lb: ScenarioLab, sc: Scenario) -> None:
    """Puts the networks of ``PNETS`` in the modes, relations, rules and labels of ``sc``
    (every relation of the last scenario undone first) and applies them."""
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
