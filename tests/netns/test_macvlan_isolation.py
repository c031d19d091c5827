"""Isolation of macvlan networks on a real kernel: the modes, relations, rules,
anti-spoofing and a LAN host, with every network a macvlan of ONE parent interface.

A host is a namespace made by the ``netns`` fixture, with a parent interface ``up0``
(a veth whose other end is in a "LAN" namespace: a host of the parent's L2 segment,
address 10.88.200.1, outside every network: external). The sub-interfaces come from
the existing :class:`Reconciler`; the policy engine's macvlan tables
(:func:`vnet.core.mvpolicy.compile_macvlan`) are applied in each container namespace by
:class:`MacvlanEnforcer` BEFORE the sub-interfaces exist (protected from the first
frame). Every container gets an on-link route for 10.88.0.0/16, so frames between
the networks and to the LAN host are switched inside the parent device (the path the
host namespace's firewall never sees). Probes: the agent of ``isolation_lab.py``.

Expected results are written out in each test (never computed by the engine), except
in the property test, whose point is that ``explain`` equals the kernel.
"""

from __future__ import annotations

import itertools
import subprocess
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings

from tests.conftest import requires_root
from tests.netns.conftest import ip_json
from tests.netns.isolation_lab import (
    AGENT,
    PEPS,
    PNETS,
    Agent,
    Ep,
    Net,
    Scenario,
    assert_forgeries_dropped,
    probe_pairs,
    scenarios,
    set_scenario,
)
from vnet.adapters.mvnft import MacvlanEnforcer
from vnet.core import mvpolicy as mvp
from vnet.core.dataplane_model import EpDesired, NetDesired, NodeDesired
from vnet.core.model import DriverType, IsolationMode
from vnet.core.policy import AllowRule, Policy, PolicyEndpoint, PortSpec, Selector
from vnet.svc.node.reconcile import Reconciler

pytestmark = [pytest.mark.netns, requires_root]

FULL, PEER, MESH, NONE = IsolationMode.FULL, IsolationMode.PEER_ONLY, IsolationMode.MESH_ONLY, IsolationMode.NONE
PARENT = "up0"
LAN = "10.88.200.1"
CHECKS: list[tuple[str, int | None]] = [("tcp", 80), ("icmp", None)]


# A drop in the sender's own namespace makes sendto() fail (EPERM, ENOBUFS) instead of the
# probe timing out: the agent answers "not reached" then.
MV_AGENT = AGENT.replace("for line in sys.stdin:\n    threading.Thread(target=handle,", """def safe(cmd):
    try:
        handle(cmd)
    except OSError:
        with out_lock:
            sys.stdout.write(json.dumps({"id": cmd["id"], "r": False}) + "\\n"); sys.stdout.flush()
for line in sys.stdin:
    threading.Thread(target=safe,""")
assert MV_AGENT != AGENT


class MvAgent(Agent):
    """The probe agent of ``isolation_lab.py``, answering False when the send itself is refused."""

    SCRIPT = MV_AGENT


class MvLab:
    """One host namespace with a parent interface, a LAN host on its segment, a container
    per endpoint (macvlan sub-interface), the reconciler and the macvlan enforcer."""

    def __init__(self, netns: Callable[[str], str], nets: list[Net], eps: list[Ep]) -> None:
        self.nets = {n.id: n for n in nets}
        self.eps = {e.id: e for e in eps}
        self.rules: list[AllowRule] = []
        self.host = netns("h1")
        self.lan = netns("lan")
        subprocess.run(["ip", "-n", self.host, "link", "add", PARENT, "type", "veth", "peer", "name", "lan0",
                        "netns", self.lan], check=True)
        subprocess.run(["ip", "-n", self.lan, "addr", "add", f"{LAN}/16", "dev", "lan0"], check=True)
        subprocess.run(["ip", "-n", self.lan, "link", "set", "lan0", "up"], check=True)
        self.ns = {e.id: netns(f"c-{e.id}") for e in eps}
        self.enf = MacvlanEnforcer()
        self.apply()  # before the sub-interfaces exist: protected from the first frame
        self.rec = Reconciler(self.host)
        nd = NodeDesired(
            networks=[NetDesired(id=n.id, driver=DriverType.MACVLAN, parent=PARENT, mode="bridge") for n in nets],
            endpoints=[EpDesired(id=e.id, network_id=e.net, netns=self.ns[e.id], mac=e.mac, ipv4=e.ip)
                       for e in eps])
        r = self.rec.reconcile(nd)
        assert r.errors == [], r.errors
        for e in eps:  # every network and the LAN host on-link: switched inside the parent
            subprocess.run(["ip", "-n", self.ns[e.id], "route", "add", "10.88.0.0/16", "dev", "eth0"], check=True)
        self.agents: dict[str, Agent] = {}
        try:
            for e in eps:
                self.agents[e.id] = MvAgent(self.ns[e.id])
            self.agents["lan"] = MvAgent(self.lan)
        except BaseException:
            self.close()
            raise

    def policy(self) -> Policy:
        eps = [PolicyEndpoint(id=e.id, network=e.net, ips=(e.addr,), mac=e.mac, labels=dict(e.labels), node="h1")
               for e in self.eps.values()]
        return Policy([n.policy() for n in self.nets.values()], eps, self.rules)

    def locals_(self) -> dict[str, mvp.MvLocal]:
        return {e.id: mvp.MvLocal(e.id, e.net, self.ns[e.id], "eth0", e.mac, (e.addr,)) for e in self.eps.values()}

    def apply(self, *, check: bool = False) -> mvp.MvPolicy | None:
        pol = self.policy()
        mv = mvp.compile_macvlan(pol, "h1", self.nets)
        res = self.enf.sync(mv, pol.compile("h1"), self.locals_(), check=check)
        assert res.errors == {}, res.errors
        self.last = res
        return mv

    def addr(self, party: str) -> str:
        return LAN if party == "lan" else self.eps[party].addr

    def probe(self, pairs: list[tuple[str, str]], checks: list[tuple[str, int | None]] = CHECKS,
              ) -> dict[str, set[str]]:
        return probe_pairs(self.agents, self.addr, pairs, checks)

    def close(self) -> None:
        for a in getattr(self, "agents", {}).values():
            a.close()
        if hasattr(self, "rec"):
            self.rec.close()
        self.enf.close()


@pytest.fixture
def mvlab(netns: Callable[[str], str]) -> Iterator[Callable[[list[Net], list[Ep]], MvLab]]:
    made: list[MvLab] = []

    def make(nets: list[Net], eps: list[Ep]) -> MvLab:
        lb = MvLab(netns, nets, eps)
        made.append(lb)
        return lb

    yield make
    for lb in made:
        lb.close()


def both(*pairs: str) -> set[str]:
    out: set[str] = set()
    for p in pairs:
        a, b = p.split("-")
        out |= {f"{a}>{b}", f"{b}>{a}"}
    return out


# --------------------------------------------------------------------------- the matrix

COMBOS = [(FULL, FULL), (PEER, PEER), (MESH, MESH), (NONE, NONE), (PEER, MESH), (MESH, NONE), (FULL, MESH),
          (PEER, NONE)]


def test_two_macvlan_networks_on_one_parent_every_mode(mvlab: Callable[[list[Net], list[Ep]], MvLab]) -> None:
    """Per combination: networks a<k> and b<k> (modes as given) connected, two endpoints
    each, all sixteen networks macvlans of the same parent. Written-out expectation: same
    network allowed iff the mode is not Full; across the connection iff both are MeshOnly
    or None; the LAN host (external) both ways iff the endpoint's network is None;
    unrelated networks never."""
    nets: list[Net] = []
    eps: list[Ep] = []
    for k, (ma, mb) in enumerate(COMBOS):
        a, b = f"a{k}", f"b{k}"
        nets += [Net(a, ma, f"10.88.{2 * k + 1}.1/24", connected=(b,)),
                 Net(b, mb, f"10.88.{2 * k + 2}.1/24", connected=(a,))]
        for net, m in ((a, 2 * k + 1), (b, 2 * k + 2)):
            eps += [Ep(f"{net}x", net, f"10.88.{m}.10/24"), Ep(f"{net}y", net, f"10.88.{m}.20/24")]
    lb = mvlab(nets, eps)
    relaxed = (MESH, NONE)
    pairs: list[tuple[str, str]] = []
    want: set[str] = set()
    for k, (ma, mb) in enumerate(COMBOS):
        group = [f"a{k}x", f"a{k}y", f"b{k}x", f"b{k}y"]
        mode = {f"a{k}": ma, f"b{k}": mb}
        for s, d in itertools.permutations(group, 2):
            pairs.append((s, d))
            same = s[:2] == d[:2]
            if (same and mode[s[:2]] != FULL) or (not same and mode[s[:2]] in relaxed and mode[d[:2]] in relaxed):
                want.add(f"{s}>{d}")
        for e in group:
            pairs += [(e, "lan"), ("lan", e)]
            if mode[e[:2]] == NONE:
                want |= {f"{e}>lan", f"lan>{e}"}
    # unrelated networks on the same parent: None with None, MeshOnly with MeshOnly: never
    pairs += [("a3x", "b5x"), ("b5x", "a3x"), ("a2x", "b4x"), ("b4x", "a2x"), ("a3x", "a7x"), ("a7x", "a3x")]
    seen = lb.probe(pairs)
    for key, got in seen.items():
        assert got == want, f"{key}: unexpected {sorted(got - want)}, missing {sorted(want - got)}"
    # converged: a second sync writes nothing, and a resync that reads every table back neither
    lb.apply()
    assert lb.last.writes == 0
    lb.apply(check=True)
    assert lb.last.writes == 0
    # a restarted worker (a new enforcer, no memory) adopts every intact pair: no write; the
    # tables of an endpoint removed while no worker ran (left in a container that lives on)
    # are deleted: they would govern the next interface of that name
    subprocess.run(["ip", "netns", "exec", lb.ns["a1x"], "nft", "-f", "-"], check=True, text=True,
                   input="table inet vnetm_0123456789ab {\n chain input {\n type filter hook input priority 0;"
                         " policy accept;\n iifname \"eth0\" drop\n }\n}\n")
    pol = lb.policy()
    fresh = MacvlanEnforcer()
    try:
        res = fresh.sync(mvp.compile_macvlan(pol, "h1", lb.nets), pol.compile("h1"), lb.locals_(), check=True)
        assert (res.writes, res.removed, res.adopted, res.errors) == (1, 1, len(eps), {})
        res = fresh.sync(mvp.compile_macvlan(pol, "h1", lb.nets), pol.compile("h1"), lb.locals_(), check=True)
        assert (res.writes, res.adopted) == (0, 0)
    finally:
        fresh.close()
    tables = subprocess.run(["ip", "netns", "exec", lb.ns["a1x"], "nft", "list", "tables"], check=True,
                            capture_output=True, text=True).stdout
    assert "vnetm_0123456789ab" not in tables and mvp.table_name("a1x") in tables, tables
    # Control: without the tables of a0x and a0y (Full), the same probes pass (the checks can fail)
    for e in ("a0x", "a0y"):
        t = mvp.table_name(e)
        subprocess.run(["ip", "netns", "exec", lb.ns[e], "nft", "-f", "-"], check=True, text=True,
                       input=f"delete table inet {t}\ndelete table netdev {t}\n")
    assert lb.probe([("a0x", "a0y"), ("a0x", "lan")]) == {"tcp/80": {"a0x>a0y", "a0x>lan"},
                                                          "icmp": {"a0x>a0y", "a0x>lan"}}
    # ... and the resync restores them (drift): exactly those two pairs written whole
    lb.apply(check=True)
    assert (lb.last.writes, lb.last.wholes) == (2, 2)
    assert lb.probe([("a0x", "a0y"), ("a0x", "lan")]) == {"tcp/80": set(), "icmp": set()}


def test_mode_change_and_rules_reach_the_macvlan_tables(mvlab: Callable[[list[Net], list[Ep]], MvLab]) -> None:
    nets = [Net("p", PEER, "10.88.31.1/24", connected=("q",)), Net("q", PEER, "10.88.32.1/24", connected=("p",))]
    eps = [Ep("p1", "p", "10.88.31.10/24"), Ep("q1", "q", "10.88.32.10/24")]
    lb = mvlab(nets, eps)
    pair = [("p1", "q1"), ("q1", "p1")]
    assert lb.probe(pair) == {"tcp/80": set(), "icmp": set()}
    # both MeshOnly: a mode change is an element delta (one per table), no whole write
    lb.nets["p"].mode = MESH
    lb.nets["q"].mode = MESH
    lb.apply()
    assert (lb.last.writes, lb.last.wholes) == (2, 0)
    assert lb.probe(pair) == {"tcp/80": both("p1-q1"), "icmp": both("p1-q1")}
    # back to PeerOnly, with a rule p1 -> q1 tcp/80: only that flow (a rule is a structure change)
    lb.nets["p"].mode = PEER
    lb.nets["q"].mode = PEER
    lb.rules = [AllowRule(id="pq", from_=[Selector(endpoint="p1")], to=[Selector(endpoint="q1")],
                          ports=[PortSpec(protocol="tcp", port=80)])]
    lb.apply()
    assert lb.last.wholes == 2
    assert lb.probe(pair) == {"tcp/80": {"p1>q1"}, "icmp": set()}
    # elements added by hand (p1 may send anything to q1, q1 take anything from p1): the
    # resync's readback repairs both tables with a delta each
    for e, s_, a in (("q1", "peer4", "10.88.31.10"), ("p1", "reach4", "10.88.32.10")):
        subprocess.run(["ip", "netns", "exec", lb.ns[e], "nft", "add", "element", "inet", mvp.table_name(e), s_,
                        f"{{ {a} }}"], check=True)
    assert lb.probe([("p1", "q1")], [("icmp", None)]) == {"icmp": {"p1>q1"}}
    lb.apply(check=True)
    assert (lb.last.writes, lb.last.deltas) == (2, 2)
    assert lb.probe([("p1", "q1")], [("icmp", None)]) == {"icmp": set()}


# --------------------------------------------------------------------------- anti-spoofing


@pytest.mark.parametrize("mode", [FULL, PEER, MESH, NONE], ids=lambda m: m.value)
def test_macvlan_anti_spoofing(mvlab: Callable[[list[Net], list[Ep]], MvLab], mode: IsolationMode) -> None:
    nets = [Net("s", mode, "10.88.41.1/24")]
    eps = [Ep("att", "s", "10.88.41.10/24"), Ep("vic", "s", "10.88.41.20/24"), Ep("peer", "s", "10.88.41.30/24")]
    lb = mvlab(nets, eps)
    # inside the network everything is allowed by a rule, in every mode: only anti-spoofing can drop
    lb.rules = [AllowRule(id="open", from_=[Selector(network="s")], to=[Selector(network="s")])]
    lb.apply()
    # sent_ok=False: the egress filter on the container's macvlan may refuse a forged frame at send
    assert_forgeries_dropped(lb.agents["att"], lb.agents["vic"], lb.eps, lb.ns["vic"], sent_ok=False)
    a, v, peer = lb.eps["att"], lb.eps["vic"], lb.eps["peer"]
    # the container changes its own address to the peer's (a root container could): dropped
    subprocess.run(["ip", "-n", lb.ns["att"], "addr", "add", f"{peer.addr}/24", "dev", "eth0"], check=True)
    r = subprocess.run(["ip", "netns", "exec", lb.ns["att"], "ping", "-c1", "-W1", "-I", peer.addr, v.addr],
                       capture_output=True)
    assert r.returncode != 0, "a packet from an address the container gave itself got through"
    subprocess.run(["ip", "-n", lb.ns["att"], "addr", "del", f"{peer.addr}/24", "dev", "eth0"], check=True)
    # ... and a MAC it gives itself: nothing it sends gets out
    subprocess.run(["ip", "-n", lb.ns["att"], "link", "set", "eth0", "address", "02:de:ad:be:ef:02"], check=True)
    assert lb.probe([("att", "vic")]) == {"tcp/80": set(), "icmp": set()}
    subprocess.run(["ip", "-n", lb.ns["att"], "link", "set", "eth0", "address", a.mac], check=True)
    subprocess.run(["ip", "-n", lb.ns["vic"], "neigh", "flush", "all"], check=True)
    # the attacker's own traffic still passes through the kernel's stack
    assert lb.probe([("att", "vic")]) == {"tcp/80": {"att>vic"}, "icmp": {"att>vic"}}
    assert any(x.get("ifname") == "eth0" for x in ip_json("link", "show", ns=lb.ns["att"]))


# --------------------------------------------------------------------------- property


@pytest.fixture
def prop_mvlab(mvlab: Callable[[list[Net], list[Ep]], MvLab]) -> MvLab:
    nets = [Net(n, FULL, f"10.88.{50 + k}.1/24") for k, n in enumerate(PNETS)]
    eps = [Ep(e, n, f"10.88.{50 + PNETS.index(n)}.{10 + i}/24") for i, (e, n) in enumerate(PEPS)]
    return mvlab(nets, eps)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sc=scenarios())
def test_macvlan_explain_equals_observed(prop_mvlab: MvLab, sc: Scenario) -> None:
    """The property of ``test_isolation_property.py`` on macvlan networks (one parent), the LAN
    host included as a party both ways: every probe result equals ``verdict``."""
    lb = prop_mvlab
    set_scenario(lb, sc)
    parties = [e for e, _ in PEPS] + ["lan"]
    pairs = [(a, b) for a, b in itertools.permutations(parties, 2)]
    seen = lb.probe(pairs)
    pol = lb.policy()
    want: dict[str, set[str]] = {"tcp/80": set(), "icmp": set()}
    for a, b in pairs:
        src, dst = lb.addr(a) if a == "lan" else a, lb.addr(b) if b == "lan" else b
        if pol.verdict(src, dst, "tcp", 80).allowed:
            want["tcp/80"].add(f"{a}>{b}")
        if pol.verdict(src, dst, "icmp").allowed:
            want["icmp"].add(f"{a}>{b}")
    if seen != want:  # once seen (p0>p3 icmp allowed) and not reproduced: what the kernel had then
        wrong = {k: sorted(seen[k] ^ want[k]) for k in want if seen[k] != want[k]}
        again = lb.probe(sorted({(p.split(">")[0], p.split(">")[1]) for k in wrong for p in wrong[k]}))
        tables = {e: subprocess.run(["ip", "netns", "exec", lb.ns[e], "nft", "list", "ruleset"],
                                    capture_output=True, text=True).stdout
                  for e in sorted({x for k in wrong for p in wrong[k] for x in p.split(">")} - {"lan"})}
        raise AssertionError(f"{sc}\nprobes that differ from the verdicts: {wrong}\nprobed again at once: "
                             f"{again}\nrulesets:\n" + "\n".join(f"--- {e}\n{t}" for e, t in tables.items()))


def test_dual_stack_tables_are_accepted_and_read_back_equal(netns: Callable[[str], str]) -> None:
    """IPv6 sets (addresses, ranges with the gateways cut out) as the kernel takes and lists
    them: written once, then a read-back resync and a fresh enforcer both write nothing."""
    from vnet.core.policy import PolicyNetwork
    nets = [PolicyNetwork(id="a", mode=MESH, cidrs=("10.88.60.0/24", "fd00:88:60::/64"),
                          gateways=("10.88.60.1", "fd00:88:60::1"), connected=("b",)),
            PolicyNetwork(id="b", mode=MESH, cidrs=("fd00:88:61::/64",), gateways=("fd00:88:61::1",),
                          connected=("a",))]
    eps = [PolicyEndpoint(id="d1", network="a", ips=("10.88.60.10", "fd00:88:60::10"), mac="02:00:00:88:60:10",
                          node="h1"),
           PolicyEndpoint(id="d2", network="b", ips=("fd00:88:61::10",), mac="02:00:00:88:61:10", node="h1")]
    pol = Policy(nets, eps, [AllowRule(id="v6", from_=[Selector(cidr="fd00:88::/32")], to=[Selector(endpoint="d1")],
                                       ports=[PortSpec(protocol="tcp", port=443)])])
    ns = {e.id: netns(f"d6-{e.id}") for e in eps}
    locs = {e.id: mvp.MvLocal(e.id, e.network, ns[e.id], "eth0", e.mac, e.ips) for e in eps}
    mv, rs = mvp.compile_macvlan(pol, "h1", {"a", "b"}), pol.compile("h1")
    assert mv is not None and mv.net("a") is not None and mv.net("a").reach6  # type: ignore[union-attr]
    enf, fresh = MacvlanEnforcer(), MacvlanEnforcer()
    try:
        res = enf.sync(mv, rs, locs)
        assert (res.writes, res.wholes, res.errors) == (2, 2, {})
        res = enf.sync(mv, rs, locs, check=True)
        assert (res.writes, res.errors) == (0, {})
        res = fresh.sync(mv, rs, locs, check=True)
        assert (res.writes, res.adopted, res.errors) == (0, 2, {})
    finally:
        enf.close()
        fresh.close()
    out = subprocess.run(["ip", "netns", "exec", ns["d1"], "nft", "list", "set", "inet", mvp.table_name("d1"),
                          "reach6"], check=True, capture_output=True, text=True).stdout
    assert "fd00:88:61::2-fd00:88:61:0:ffff:ffff:ffff:ffff" in out, out  # the gateway ::1 cut out


def test_pair_refused_leaves_isolation_and_is_retried(netns: Callable[[str], str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel before 6.16 refuses a netdev chain for an interface that does not exist yet:
    simulated by a pair the kernel refuses. The inet table (isolation) is written alone, the
    endpoint is reported, and the next sync writes the pair."""
    from vnet.core.policy import PolicyNetwork
    pol = Policy([PolicyNetwork(id="a", mode=PEER, cidrs=("10.88.70.0/24",))],
                 [PolicyEndpoint(id="r1", network="a", ips=("10.88.70.10",), mac="02:00:00:88:70:10", node="h1")])
    ns = netns("rf-r1")
    locs = {"r1": mvp.MvLocal("r1", "a", ns, "eth0", "02:00:00:88:70:10", ("10.88.70.10",))}
    mv, rs = mvp.compile_macvlan(pol, "h1", {"a"}), pol.compile("h1")
    real = mvp.render
    monkeypatch.setattr(mvp, "render", lambda *a: real(*a) + "add rule netdev vnetm_nowhere egress drop\n")
    enf = MacvlanEnforcer()
    try:
        res = enf.sync(mv, rs, locs)
        assert "isolation in place, anti-spoofing not yet" in res.errors.get("r1", ""), res
        tables = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "tables"], check=True,
                                capture_output=True, text=True).stdout.split("\n")
        assert f"table inet {mvp.table_name('r1')}" in tables
        assert f"table netdev {mvp.table_name('r1')}" not in tables
        monkeypatch.setattr(mvp, "render", real)
        res = enf.sync(mv, rs, locs)
        assert (res.writes, res.wholes, res.errors) == (1, 1, {})
        assert enf.sync(mv, rs, locs, check=True).writes == 0
    finally:
        enf.close()
