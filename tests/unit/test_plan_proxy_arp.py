"""Parent/child networks on one host: proxy ARP on the parent's bridge (pure plan)."""

from __future__ import annotations

from tests.unit.test_plan import FakeKernel, empty_actual
from vnet.core import naming
from vnet.core import plan as P
from vnet.core.dataplane_model import EpDesired, NetDesired, NodeDesired

PARENT = NetDesired(id="par", gateway4="10.150.0.1/16")
CHILD = NetDesired(id="kid", gateway4="10.150.7.1/24")  # carved from the parent's space
OTHER = NetDesired(id="oth", gateway4="10.151.0.1/24")


def _ep(i: int, net: NetDesired, addr: str) -> EpDesired:
    gw = (net.gateway4 or "").split("/")[0]
    return EpDesired(id=f"e{i}", network_id=net.id, netns=f"c{i}", ifname="eth0",
                     mac=naming.local_mac(bytes([2, 0, 0, 0, 0, i])), ipv4=addr, gw4=gw)


def _proxy(p: P.Plan) -> list[P.SetSysctl]:
    return [op for op in p.ops if isinstance(op, P.SetSysctl) and any("proxy" in k for k, _ in op.settings)]


def test_parent_bridge_gets_proxy_arp_then_converges() -> None:
    d = NodeDesired(networks=[PARENT, CHILD, OTHER],
                    endpoints=[_ep(1, PARENT, "10.150.0.2/16"), _ep(2, CHILD, "10.150.7.2/24"),
                               _ep(3, OTHER, "10.151.0.2/24")])
    actual = empty_actual("c1", "c2", "c3")
    p = P.plan(d, actual)
    assert not p.errors, p.errors
    ops = _proxy(p)
    br = naming.bridge_name("par")
    assert len(ops) == 1 and ops[0].ns is None and ops[0].owner == "net:par"
    assert ops[0].settings == ((f"net/ipv4/conf/{br}/proxy_arp", "1"), (f"net/ipv4/neigh/{br}/proxy_delay", "0"))
    # after the parent's bridge is made (and before its endpoints)
    i_bridge = next(i for i, op in enumerate(p.ops) if isinstance(op, P.EnsureBridge) and op.name == br)
    assert p.ops.index(ops[0]) > i_bridge
    FakeKernel(actual).apply(p)
    assert P.plan(d, actual).ops == []  # converged: nothing more
    # drift: someone switched it off -> exactly that write again
    actual.host.sysctls[f"net/ipv4/conf/{br}/proxy_arp"] = "0"
    again = P.plan(d, actual)
    assert [op.op_name() for op in again.ops] == ["set_sysctl"] and _proxy(again) == ops


def test_no_child_no_proxy_arp() -> None:
    # the parent alone, a sibling-free unrelated network, and a child whose parent is not on this host
    for nets in ([PARENT], [PARENT, OTHER], [CHILD, OTHER]):
        d = NodeDesired(networks=nets, endpoints=[])
        assert _proxy(P.plan(d, empty_actual())) == [], nets
