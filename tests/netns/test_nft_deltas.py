"""Element deltas in a real kernel give exactly the ruleset a whole render gives.

Random sequences of attaches, detaches, rule changes and mode changes are applied to
one host namespace the way the node worker applies them (``NftEnforcer.sync_ruleset``:
element deltas, the whole ruleset only when the structure changes) and, after every
step, rendered from scratch into a second namespace; the two kernels' listings
(structure and every set/map element) must be identical. The deltas are written both
ways the enforcer can write them: as nfnetlink batches built in Python (the default,
:mod:`vnet.adapters.nfnl`) and as ``add``/``delete element`` scripts through
libnftables. Each test makes its own two namespaces (nothing in the root namespace); no
packet is sent.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import requires_root
from vnet.adapters.nftables import NftEnforcer, NftError
from vnet.core import naming, nft
from vnet.core.model import IsolationMode
from vnet.core.policy import AllowRule, Policy, PolicyEndpoint, PolicyNetwork, PortSpec, Published, Selector

pytestmark = [pytest.mark.netns, requires_root]

MODES = [IsolationMode.FULL, IsolationMode.PEER_ONLY, IsolationMode.MESH_ONLY, IsolationMode.NONE]
RULESETS: list[list[AllowRule]] = [
    [],
    [AllowRule(id="web-db", from_=[Selector(labels={"tier": "web"})], to=[Selector(labels={"tier": "db"})],
               ports=[PortSpec(protocol="tcp", port=5432)])],
    # many port rules: dispatched by (protocol . port) to chains of their own (nft.DISPATCH_MIN)
    [AllowRule(id=f"p{k}", from_=[Selector(labels={"tier": "web"})], to=[Selector(network="abc"[k % 3])],
               ports=[PortSpec(protocol="tcp" if k % 4 else "udp", port=1000 + 7 * k, end_port=1010 + 9 * k)])
     for k in range(12)] + [AllowRule(id="out", from_=[Selector(network="b")], to=[Selector(cidr="192.0.2.0/24")],
                                      ports=[PortSpec(protocol="tcp", port=p) for p in range(20, 30)])],
    [AllowRule(id="net", from_=[Selector(network="a")], to=[Selector(network="b")]),
     AllowRule(id="ext", from_=[Selector(network="a"), Selector(cidr="10.6.2.0/25")],
               to=[Selector(cidr="192.0.2.0/24"), Selector(cidr="2001:db8::/32")],
               ports=[PortSpec(protocol="udp", port=53), PortSpec(protocol="icmp")]),
     AllowRule(id="in", from_=[Selector(cidr="198.51.100.0/24")], to=[Selector(endpoint="x3")],
               ports=[PortSpec(protocol="tcp", port=80, end_port=90)])],
]


def _ep(i: int, net: str, tier: str, pub: bool) -> PolicyEndpoint:
    k = "abc".index(net) + 1
    ips = (f"10.6.{k}.{10 + i}",) + ((f"fd00:6:{k}::{10 + i:x}",) if i % 2 else ())
    return PolicyEndpoint(id=f"x{i}", network=net, ips=ips, mac=f"02:00:00:00:06:{i:02x}", node="h",
                          labels={"tier": tier},
                          published=(Published(protocol="tcp", host_port=9000 + i % 3, port=80),) if pub else ())


def _policy(modes: dict[str, IsolationMode], eps: dict[str, PolicyEndpoint], rules: list[AllowRule]) -> Policy:
    nets = [PolicyNetwork(id="a", mode=modes["a"], cidrs=("10.6.1.0/24", "fd00:6:1::/64"), connected=("b",)),
            PolicyNetwork(id="b", mode=modes["b"], cidrs=("10.6.2.0/24", "fd00:6:2::/64"), connected=("a",)),
            PolicyNetwork(id="c", mode=modes["c"], cidrs=("10.6.3.0/24", "fd00:6:3::/64"))]
    return Policy(nets, eps.values(), rules)


@pytest.fixture
def hosts(netns: Callable[[str], str]) -> Iterator[tuple[str, str]]:
    yield netns("nd-delta"), netns("nd-scratch")


def _listing(enf: NftEnforcer) -> tuple[str, nft.Elements]:
    got = enf.listing()
    assert got is not None
    return got


Op = tuple[str, int, str, str, bool, int]
OPS = st.lists(st.tuples(st.sampled_from(["attach", "attach", "attach", "detach", "detach", "rules", "mode"]),
                         st.integers(0, 9), st.sampled_from("abc"), st.sampled_from(["web", "db"]),
                         st.booleans(), st.integers(0, 3)),
               min_size=1, max_size=14)


@pytest.mark.parametrize("path", ["nfnetlink", "script"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_deltas_give_the_kernel_what_a_whole_render_gives(hosts: tuple[str, str], path: str, ops: list[Op]) -> None:
    delta_ns, scratch_ns = hosts
    for ns in hosts:  # every example starts from no table of ours
        subprocess.run(["ip", "netns", "exec", ns, "nft", "delete", "table", "inet", "vnet"], capture_output=True)
        subprocess.run(["ip", "netns", "exec", ns, "nft", "delete", "table", "bridge", "vnet"], capture_output=True)
    enf = NftEnforcer(delta_ns, element_path=path)
    batches = 0
    modes = {"a": IsolationMode.FULL, "b": IsolationMode.PEER_ONLY, "c": IsolationMode.NONE}
    eps: dict[str, PolicyEndpoint] = {"s0": PolicyEndpoint(id="s0", network="a", ips=("10.6.1.250",),
                                                           mac="02:00:00:00:07:00", node="h")}
    rules: list[AllowRule] = RULESETS[1]
    assert enf.sync_ruleset(_policy(modes, eps, rules).compile("h")).whole
    try:
        for kind, i, net, tier, flag, k in ops:
            structural = False
            if kind == "attach" and f"x{i}" not in eps:
                eps[f"x{i}"] = _ep(i, net, tier, flag)
            elif kind == "detach" and f"x{i}" in eps:
                eps.pop(f"x{i}")
            elif kind == "rules":
                structural = rules != RULESETS[k % len(RULESETS)]
                rules = RULESETS[k % len(RULESETS)]
            elif kind == "mode":
                modes[net] = MODES[k]
            rs = _policy(modes, eps, rules).compile("h")
            res = enf.sync_ruleset(rs)
            # only a rule change rewrites the structure; endpoints and modes are elements
            assert res.whole == structural, (kind, res.reason)
            if res.wrote and not res.whole:  # a delta: written the way asked
                now = enf._nfsock.batches if enf._nfsock is not None else 0
                assert (now == batches + 1) == (path == "nfnetlink"), (path, kind)
                batches = now
            scratch = NftEnforcer(scratch_ns)
            try:
                scratch.apply(nft.render(rs))
                want = _listing(scratch)
            finally:
                scratch.close()
            got = _listing(enf)
            assert got[1] == want[1], {k: (sorted(got[1].get(k, ())), sorted(v)) for k, v in want[1].items()
                                       if got[1].get(k) != v}
            assert got[0] == want[0]
            assert got[1] == nft.elements(rs)
        # a resync of unchanged state reads the kernel and writes nothing
        again = enf.sync_ruleset(rs, check=True)
        assert (again.wrote, again.reason) == (False, "unchanged")
    finally:
        enf.close()


def test_drift_is_repaired_and_a_converged_host_costs_no_write(hosts: tuple[str, str]) -> None:
    delta_ns, _ = hosts
    modes = {"a": IsolationMode.FULL, "b": IsolationMode.PEER_ONLY, "c": IsolationMode.NONE}
    eps = {f"x{i}": _ep(i, "abc"[i % 3], "web" if i % 2 else "db", i == 3) for i in range(6)}
    rs = _policy(modes, eps, RULESETS[2]).compile("h")
    enf = NftEnforcer(delta_ns)
    try:
        assert enf.sync_ruleset(rs).whole
        assert enf.sync_ruleset(rs, check=True).wrote is False
        # an element added by hand: found by the readback, removed by a delta
        subprocess.run(["ip", "netns", "exec", delta_ns, "nft", "add", "element", "bridge", "vnet", "mac_bind",
                        '{ "vne000000000000" . 02:00:00:00:00:01 }'], check=True)
        r = enf.sync_ruleset(rs, check=True)
        assert (r.wrote, r.whole, r.reason, r.elements) == (True, False, "table altered", 1)
        # a rule deleted by hand: the structure differs, the whole ruleset is written again
        subprocess.run(["ip", "netns", "exec", delta_ns, "nft", "flush", "chain", "inet", "vnet",
                        "between_endpoints"], check=True)
        r = enf.sync_ruleset(rs, check=True)
        assert (r.wrote, r.whole, r.reason) == (True, True, "table altered")
        # a table deleted by hand
        subprocess.run(["ip", "netns", "exec", delta_ns, "nft", "delete", "table", "bridge", "vnet"], check=True)
        r = enf.sync_ruleset(rs, check=True)
        assert (r.wrote, r.whole, r.reason) == (True, True, "table missing")
        assert enf.sync_ruleset(rs, check=True).wrote is False
        # an attach is one small delta
        eps["x9"] = _ep(9, "a", "web", False)
        r = enf.sync_ruleset(_policy(modes, eps, RULESETS[2]).compile("h"))
        assert r.wrote and not r.whole and r.elements < 12
        assert naming.veth_name("x9") in str(_listing(enf)[1][("bridge", "mac_bind")])
    finally:
        enf.close()


def test_a_refused_batch_changes_nothing_and_the_ruleset_is_written_whole(hosts: tuple[str, str]) -> None:
    """The kernel applies an nfnetlink batch whole or not at all: a deletion of an element
    that is not there (our idea of the kernel was wrong) refuses every message of it, with
    the kernel's reason; the enforcer then writes the whole ruleset."""
    delta_ns, _ = hosts
    modes = {"a": IsolationMode.FULL, "b": IsolationMode.PEER_ONLY, "c": IsolationMode.NONE}
    eps = {f"x{i}": _ep(i, "a", "web", False) for i in range(3)}
    rs = _policy(modes, eps, RULESETS[1]).compile("h")
    enf = NftEnforcer(delta_ns)
    try:
        assert enf.sync_ruleset(rs).whole
        before = _listing(enf)
        meta = {(d.family, d.name): d for d in nft.decls(rs)}
        gone = ("bridge", "mac_bind")
        changes: nft.Changes = {
            ("bridge", "full_ports"): (frozenset(), frozenset({"vne0000000000aa"})),
            gone: (frozenset({"vne0000000000bb . 02:00:00:00:00:bb"}), frozenset()),
        }
        with pytest.raises(NftError, match="No such file or directory"):
            enf.write_elements(changes, meta)
        assert _listing(enf) == before  # the addition in the same batch did not land either
        # the enforcer believes the kernel holds an element it does not: the delta that
        # removes it is refused, and the ruleset is written whole instead
        assert enf._have is not None
        enf._have[gone].add("vne0000000000bb . 02:00:00:00:00:bb")
        assert enf._have_rs is not None
        enf._have_rs = None  # the slow path: the delta from what it believes the kernel holds
        res = enf.sync_ruleset(rs)
        assert (res.wrote, res.whole) == (True, True) and res.reason.startswith("delta refused"), res.reason
        assert _listing(enf) == before
    finally:
        enf.close()


def test_without_an_nfnetlink_socket_the_deltas_go_through_libnftables(
        hosts: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the nfnetlink socket cannot be made, the enforcer says so once and writes its
    deltas as scripts from then on: nothing is lost, nothing is written whole for it."""
    from vnet.adapters import nfnl

    def refused(*_: object, **__: object) -> nfnl.NfnlSocket:
        raise OSError(93, "Protocol not supported")

    monkeypatch.setattr(nfnl.NfnlSocket, "open", refused)
    delta_ns, _ = hosts
    modes = {"a": IsolationMode.FULL, "b": IsolationMode.PEER_ONLY, "c": IsolationMode.NONE}
    eps = {f"x{i}": _ep(i, "a", "web", False) for i in range(2)}
    enf = NftEnforcer(delta_ns)
    try:
        assert enf.sync_ruleset(_policy(modes, eps, RULESETS[1]).compile("h")).whole
        eps["x5"] = _ep(5, "b", "db", True)
        rs = _policy(modes, eps, RULESETS[1]).compile("h")
        res = enf.sync_ruleset(rs)
        assert (res.wrote, res.whole, res.reason) == (True, False, "delta")
        assert enf.element_path == "script" and enf._nfsock is None
        assert _listing(enf)[1] == nft.elements(rs)
    finally:
        enf.close()
