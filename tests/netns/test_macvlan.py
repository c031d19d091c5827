"""macvlan endpoints on a real kernel: sub-interfaces of a parent made straight inside
the container namespaces.

The parent is one end of a veth pair inside the host namespace (this kernel has no
dummy driver; a veth with both ends up has carrier). Bridge mode: containers reach
each other, and the host reaches them through the shim (a macvlan of the parent on
the host side, since the kernel forbids parent<->child traffic); private mode: they
do not reach each other.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.conftest import requires_root
from tests.netns.conftest import ip, links, ping, ping_all
from vnet.core import naming
from vnet.core.dataplane_model import EpDesired, NetDesired, NodeDesired, ReconcileResult, Scope
from vnet.core.model import DriverType
from vnet.svc.node.reconcile import Reconciler

pytestmark = [pytest.mark.netns, requires_root]


def ok(r: ReconcileResult) -> None:
    assert r.errors == [], r.errors
    assert all(s.state == "ready" for s in r.endpoints.values()), r.endpoints


def ep(net: str, i: int, ns: str, prefix: str) -> EpDesired:
    return EpDesired(id=f"{net}-e{i}", network_id=net, netns=ns, mac=naming.local_mac(bytes([2, 0x88, 0, 0, 1, i])),
                     ipv4=f"{prefix}.{i + 10}/24")


def test_macvlan_bridge_private_shim_and_teardown(netns: Callable[[str], str]) -> None:
    host = netns("mh")
    for parent in ("par0", "par1"):
        ip("link", "add", parent, "type", "veth", "peer", "name", f"{parent}p", ns=host)
        ip("link", "set", f"{parent}p", "up", ns=host)
    bridge_net = NetDesired(id="mv-b", driver=DriverType.MACVLAN, parent="par0", mode="bridge", mtu=1500,
                            gateway4="10.88.0.1/24", host_shim="10.88.0.254/24")
    private_net = NetDesired(id="mv-p", driver=DriverType.MACVLAN, parent="par1", mode="private",
                             gateway4="10.89.0.1/24")
    b_eps = [ep("mv-b", i, netns(f"mb{i}"), "10.88.0") for i in range(3)]
    p_eps = [ep("mv-p", i, netns(f"mp{i}"), "10.89.0") for i in range(2)]
    desired = NodeDesired(networks=[bridge_net, private_net], endpoints=b_eps + p_eps)
    with Reconciler(host) as rec:
        r = rec.reconcile(desired)
        ok(r)
        # created in place: a macvlan of par0 in the container, with its MAC, address and mode
        for e in b_eps:
            link = links(e.netns)["eth0"]
            assert link["linkinfo"]["info_kind"] == "macvlan"
            assert link["linkinfo"]["info_data"]["mode"] == "bridge"
            assert link["address"] == e.mac
        assert set(links(host)) >= {"par0", "par1", naming.shim_name("mv-b")}
        assert not any(naming.is_our_veth(n) or naming.is_our_bridge(n) for n in links(host))
        # bridge mode: containers reach each other; the host reaches them through the shim, and back
        assert ping_all([(b_eps[0].netns, "10.88.0.11"), (b_eps[1].netns, "10.88.0.12"),
                         (b_eps[2].netns, "10.88.0.10"), (host, "10.88.0.10"), (host, "10.88.0.12"),
                         (b_eps[1].netns, "10.88.0.254")]) == []
        # private mode, as the kernel reports it: the container links are macvlans of par1 in
        # private mode (bridge mode would let them talk; this is what stops them)
        for e in p_eps:
            link = links(e.netns)["eth0"]
            assert link["linkinfo"]["info_kind"] == "macvlan" and link["address"] == e.mac
            assert link["linkinfo"]["info_data"]["mode"] == "private", link["linkinfo"]
        # Positive control: both are up, addressed and reach a peer beyond their parent (par1's
        # other end, given an address in the host namespace for this), so the failing pings
        # below fail because of the mode, not because the endpoints are broken.
        ip("addr", "add", "10.89.0.200/24", "dev", "par1p", ns=host)
        assert ping_all([(p_eps[0].netns, "10.89.0.200"), (p_eps[1].netns, "10.89.0.200")]) == []
        # ... but not each other (one try each: no answer is the expected result)
        assert not ping(p_eps[0].netns, "10.89.0.11", tries=1)
        assert not ping(p_eps[1].netns, "10.89.0.10", tries=1)
        # converged: zero writes
        assert rec.reconcile(desired).writes == 0
        assert rec.reconcile(desired, Scope(endpoints=frozenset({b_eps[0].id}))).writes == 0
        # drift: address removed and link down in a container -> repaired
        ip("addr", "flush", "dev", "eth0", ns=b_eps[0].netns)
        ip("link", "set", "eth0", "down", ns=b_eps[0].netns)
        r = rec.reconcile(desired, Scope(endpoints=frozenset({b_eps[0].id})))
        ok(r)
        assert r.writes == 2
        assert ping(b_eps[1].netns, "10.88.0.10")
        # a foreign eth0 in a container is a conflict, left alone
        other = netns("mx")
        ip("link", "add", "eth0", "type", "veth", "peer", "name", "x1", ns=other)
        r = rec.reconcile(NodeDesired(networks=desired.networks,
                                      endpoints=[*desired.endpoints, ep("mv-b", 7, other, "10.88.0")]))
        assert r.endpoints["mv-b-e7"].code == "conflict"
        # a missing parent fails the network (validated on the node)
        r = rec.reconcile(NodeDesired(networks=[NetDesired(id="mv-x", driver=DriverType.MACVLAN, parent="nope0",
                                                           gateway4="10.90.0.1/24")],
                                      endpoints=[ep("mv-x", 1, netns("mxx"), "10.90.0")]),
                          Scope(networks=frozenset({"mv-x"}), endpoints=frozenset({"mv-x-e1"})))
        assert r.networks["mv-x"].code == "invalid_option" and "nope0" in r.networks["mv-x"].reason
        assert r.endpoints["mv-x-e1"].state == "failed"
        # one endpoint removed (scoped): its interface leaves its container
        gone = b_eps[2]
        d2 = NodeDesired(networks=desired.networks, endpoints=[e for e in desired.endpoints if e is not gone])
        ok(rec.reconcile(d2, Scope(endpoints=frozenset({gone.id}))))
        assert set(links(gone.netns)) == {"lo"}
        # everything removed (full): containers empty, shim gone, parents untouched
        ok(rec.reconcile(NodeDesired()))
        for e in b_eps + p_eps:
            assert set(links(e.netns)) == {"lo"}, e.netns
        assert not any(naming.is_ours(n) for n in links(host))
        assert {"par0", "par1"} <= set(links(host))
