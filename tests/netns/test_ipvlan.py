"""ipvlan endpoints on a real kernel.

This machine's kernel has no ipvlan: creating an endpoint there must fail with
``driver_unavailable`` naming the missing kernel feature and the node, and leave
nothing behind. The positive path runs only where the probe finds ipvlan, and skips
with the probe's reason otherwise — never pretends.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.conftest import requires_root
from tests.netns.conftest import addrs, ip, links, ping_all
from vnet.adapters.netlink.probe import probe
from vnet.core import naming
from vnet.core.dataplane_model import EpDesired, NetDesired, NodeDesired
from vnet.core.model import DriverType
from vnet.svc.node.reconcile import Reconciler

pytestmark = [pytest.mark.netns, requires_root]


@pytest.fixture(scope="module")
def ipvlan_support() -> tuple[bool, str]:
    res = probe()  # anonymous scratch namespace
    return res.kinds["ipvlan"].available, res.kinds["ipvlan"].reason


def global_addrs(ns: str) -> set[tuple[str, str]]:
    return {a for a in addrs(ns) if not a[1].startswith("fe80:")}


def world(netns: Callable[[str], str], mode: str) -> tuple[str, NodeDesired]:
    host = netns("ih")
    ip("link", "add", "par0", "type", "veth", "peer", "name", "par0p", ns=host)
    ip("link", "set", "par0p", "up", ns=host)
    ip("link", "set", "par0", "up", ns=host)
    net = NetDesired(id="ipv", driver=DriverType.IPVLAN, parent="par0", mode=mode, gateway4="10.91.0.1/24")
    eps = [EpDesired(id=f"ipv-e{i}", network_id="ipv", netns=netns(f"ic{i}"),
                     mac=naming.local_mac(bytes([2, 0x91, 0, 0, 0, i])), ipv4=f"10.91.0.{i + 10}/24")
           for i in range(2)]
    return host, NodeDesired(networks=[net], endpoints=eps)


def test_ipvlan_unavailable_is_a_clear_error_and_leaves_nothing(netns: Callable[[str], str],
                                                                ipvlan_support: tuple[bool, str]) -> None:
    available, _reason = ipvlan_support
    if available:
        pytest.skip("this kernel has ipvlan: the unavailable path cannot be shown here")
    host, desired = world(netns, "l2")
    host_before = set(links(host))
    host_addrs = global_addrs(host)
    with Reconciler(host, node_name="node-7") as rec:
        r = rec.reconcile(desired)
        for e in desired.endpoints:
            st = r.endpoints[e.id]
            assert st.state == "failed" and st.code == "driver_unavailable", st
            assert "ipvlan" in st.reason and "node-7" in st.reason and "CONFIG_IPVLAN" in st.reason, st.reason
            assert set(links(e.netns)) == {"lo"}
            assert addrs(e.netns) <= {("lo", "127.0.0.1/8"), ("lo", "::1/128")}
        assert set(links(host)) == host_before and global_addrs(host) == host_addrs
        assert all(err.code == "driver_unavailable" for err in r.errors), r.errors


@pytest.mark.parametrize("mode", ["l2", "l3"])
def test_ipvlan_positive(netns: Callable[[str], str], ipvlan_support: tuple[bool, str], mode: str) -> None:
    available, reason = ipvlan_support
    if not available:
        pytest.skip(f"ipvlan unavailable on this kernel: {reason}")
    host, desired = world(netns, mode)
    with Reconciler(host) as rec:
        r = rec.reconcile(desired)
        assert r.errors == [], r.errors
        assert ping_all([(desired.endpoints[0].netns, "10.91.0.11"), (desired.endpoints[1].netns, "10.91.0.10")]) == []
        assert rec.reconcile(desired).writes == 0
        assert rec.reconcile(NodeDesired()).errors == []
        for e in desired.endpoints:
            assert set(links(e.netns)) == {"lo"}
