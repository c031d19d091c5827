"""The applier's gate: an attach's policy delta is written beside the netlink work, and the
applier waits for it before the first op that could let a packet through.

The ops are the planner's own (vnet.core.plan) for real cases; a recording applier stands in
for the kernel, so the order of ops and the gate is all that is checked here (the netns
isolation tests check the kernel with the gate in place).
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest

from tests.unit.test_plan import NET, converge, empty_actual, ep
from vnet.adapters.netlink.apply import Applier, Once, closed
from vnet.core import plan as P
from vnet.core.dataplane_model import NodeDesired, Scope


class Boom(BaseException):
    pass


class Recording(Applier):
    def __init__(self, fail_on: str | None = None) -> None:
        super().__init__(ctx=None, host_ref=None)  # type: ignore[arg-type]  # no op reaches the kernel
        self.log: list[str] = []
        self.fail_on = fail_on

    def _dispatch(self) -> dict[type[Any], Any]:
        def run(op: P.PlanOp) -> None:
            self.log.append(op.op_name())
            if op.op_name() == self.fail_on:
                raise Boom()
        return {t: run for t in (P.CreateVeth, P.SetSysctl, P.AddAddr, P.SetLink, P.AddRoute, P.EnsureBridge,
                                 P.DeleteLink, P.DelAddr, P.DelRoute, P.CreateSubIf)}

    def gate(self) -> None:
        self.log.append("GATE")


def second_attach() -> P.Plan:
    """ep2 joins a network that ep1 already uses here (the attach on a busy node)."""
    _, k = converge(NodeDesired(networks=[NET], endpoints=[ep(1)]), empty_actual("c1", "c2"))
    d = NodeDesired(networks=[NET], endpoints=[ep(1), ep(2)])
    return P.plan(d, k.a, Scope(endpoints=frozenset({"ep2"}), networks=frozenset()))


def test_attach_makes_its_interfaces_before_the_gate_and_sets_them_up_after() -> None:
    a = Recording()
    a.apply(second_attach(), gate=a.gate)
    assert a.log == ["create_veth", "set_sysctl", "add_addr", "add_addr", "GATE", "set_link", "add_route",
                     "add_route"]


def test_first_attach_of_a_network_waits_before_anything_in_the_host() -> None:
    a = Recording()
    a.apply(P.plan(NodeDesired(networks=[NET], endpoints=[ep(1)]), empty_actual("c1")), gate=a.gate)
    assert a.log[0] == "GATE" and a.log.count("GATE") == 1  # forwarding on comes first: not closed


def test_detach_only_passes_the_gate_at_the_end() -> None:  # deleting opens nothing
    _, k = converge(NodeDesired(networks=[NET], endpoints=[ep(1), ep(2)]), empty_actual("c1", "c2"))
    p = P.plan(NodeDesired(networks=[NET], endpoints=[ep(1)]), k.a, Scope(endpoints=frozenset({"ep2"}),
                                                                        networks=frozenset()))
    assert p.ops and all(isinstance(op, P.DeleteLink) for op in p.ops)
    a = Recording()
    a.apply(p, gate=a.gate)
    assert a.log[-1] == "GATE" and a.log.count("GATE") == 1


def test_gate_is_passed_even_when_an_op_blows_up() -> None:
    a = Recording(fail_on="add_addr")
    with pytest.raises(Boom):
        a.apply(second_attach(), gate=a.gate)
    assert a.log == ["create_veth", "set_sysctl", "add_addr", "GATE"]


def test_no_gate_no_change() -> None:
    a = Recording()
    a.apply(second_attach())
    assert "GATE" not in a.log and len(a.log) == 7


@pytest.mark.parametrize(("op", "expected"), [
    (P.CreateVeth(owner="e", name="v", bridge="b", peer_ns="c", peer_ifname="eth0", peer_mac="02:00:00:00:00:01",
                  mtu=1500), True),
    (P.AddAddr(owner="e", ns="c", ifname="eth0", cidr="10.0.0.2/24"), True),
    (P.AddAddr(owner="n", ifname="br", cidr="10.0.0.1/24"), False),  # the gateway, in the host
    (P.SetSysctl(owner="e", ns="c", settings=(("net/ipv6/conf/eth0/accept_dad", "0"),)), True),
    (P.SetSysctl(owner="node", settings=((P.FORWARD4, "1"),)), False),
    (P.SetLink(owner="e", ns="c", ifname="eth0", up=True), False),
    (P.DeleteLink(owner="e", ifname="v"), True),
    (P.AddRoute(owner="e", ns="c", family=4, ifname="eth0", gateway="10.0.0.1"), False),
    (P.CreateSubIf(owner="e", kind="macvlan", parent="eth0", mode="bridge", peer_ns="c", ifname="eth0", mac=None,
                   mtu=1500), True),
    (P.CreateSubIf(owner="n", kind="macvlan", parent="eth0", mode="bridge", peer_ns=None, ifname="shim", mac=None,
                   mtu=1500), False),  # the host's shim is made up
])
def test_closed(op: P.PlanOp, expected: bool) -> None:
    assert closed(op) is expected


def test_once() -> None:
    calls: list[int] = []
    once = Once(lambda: calls.append(1))
    once()
    once()
    assert calls == [1]
    Once(None)()  # no gate: nothing to call


class _Observer:
    """Hands the reconciler a fixed observation (or fails)."""

    def __init__(self, actual: Any, fail: bool = False) -> None:
        self.actual, self.fail = actual, fail

    def node(self, containers: Any, names: Any = None, tables: Any = None) -> Any:
        if self.fail:
            raise OSError("cannot read the host namespace")
        return self.actual

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


@pytest.mark.parametrize("fail", [False, True])
def test_work_beside_the_kernel_starts_once_planned_and_the_gate_is_passed_once(fail: bool) -> None:
    """The node starts its policy delta when the plan is made (``planned``), before any kernel op,
    and passes the gate once; when the observation fails nothing is planned, and the gate is
    still passed (the delta is written either way)."""
    from vnet.runtime.dataplane import Dataplane
    from vnet.svc.node.reconcile import Reconciler

    applier = Recording()
    ns: Any = type("Ns", (), {"close": lambda self: None, "retain": lambda self, r: 0, "prune": lambda self: 0,
                              "one_pass": lambda self: contextlib.nullcontext()})()
    rec = Reconciler(None, node_name="n1", kernel=Dataplane(namespaces=ns, observer=_Observer(  # type: ignore[arg-type]
        empty_actual("c1"), fail=fail), applier=applier, wireguard=lambda *a: None))  # type: ignore[arg-type]
    try:
        result = rec.reconcile(NodeDesired(networks=[NET], endpoints=[ep(1)]),
                               Scope(endpoints=frozenset({"ep1"}), networks=frozenset()),
                               gate=lambda: applier.log.append("GATE"), planned=lambda: applier.log.append("PLANNED"))
    finally:
        rec.close()
    if fail:
        assert applier.log == ["GATE"] and result.errors
    else:
        assert applier.log[0] == "PLANNED" and applier.log.count("PLANNED") == 1 and applier.log.count("GATE") == 1
        assert applier.log.index("GATE") < applier.log.index("set_link")
