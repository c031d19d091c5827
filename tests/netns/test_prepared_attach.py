"""The veth pair an attach's node makes while IPAM answers (``preparing``, svc/node/intake.py):
used by the attach that follows, removed when the attach fails or never comes, and never in
the way of another endpoint's interface.

The node worker resyncs every 60 s, so only the event path can meet what these tests check.
Every namespace is the ``netns`` fixture's; addresses (10.126.0.0/24) exist only inside them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import nats
import pytest

from tests.conftest import ControlPlane, control_plane, requires_root
from tests.netns.conftest import addrs, links, ping
from vnet.contracts import subjects
from vnet.contracts.endpoint import EndpointEvent, EndpointInfo
from vnet.core import naming
from vnet.core.errors import VNetError
from vnet.runtime.config import VNetConfig
from vnet.runtime.service import Runtime
from vnet.svc.node import intake

pytestmark = [pytest.mark.netns, requires_root]

CIDR, GW = "10.126.0.0/24", "10.126.0.1"


@pytest.fixture
async def cp(config: VNetConfig, netns: Callable[[str], str], start_service: Callable[..., Awaitable[Runtime]],
             run_prefix: str) -> AsyncIterator[ControlPlane]:
    async with control_plane(config, start_service, netns, host="preh", node=f"{run_prefix}-pre",
                             resync_s=60.0) as c:
        yield c


def _prepares(cp: ControlPlane, result: str) -> int:
    """``vnet_node_prepares_total{result}`` as the node worker counted it so far."""
    rt: Any = cp.node_rt
    return int(rt.metrics._counts.get(("vnet_node_prepares", (("node", cp.node), ("result", result))), 0))


async def _until(pred: Callable[[], bool], what: str, deadline_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while not pred():
        assert loop.time() < end, f"not within {deadline_s} s: {what}"
        await asyncio.sleep(0.02)


async def test_an_attach_uses_the_pair_prepared_while_ipam_answered(cp: ControlPlane,
                                                                   netns: Callable[[str], str]) -> None:
    c0, c1 = netns("pa0"), netns("pa1")
    net = await cp.m.create_network("prep", CIDR, GW, "bridge", "none")
    first = await cp.m.create_endpoint(c0, net.id, wait=True)  # makes the bridge: nothing to prepare on
    assert first.status == "ready", first
    made, used = _prepares(cp, "made"), _prepares(cp, "used")
    ep = await cp.m.create_endpoint(c1, net.id, wait=True)
    assert ep.status == "ready", ep
    assert _prepares(cp, "made") == made + 1 and _prepares(cp, "used") == used + 1
    # the kernel holds what the record says: the pair on the bridge, the address, the MAC, up,
    # and no IPv6 link-local address (the prepared pair got the IPv4-only sysctl before its link-up)
    host = links(cp.host)
    hv = naming.veth_name(ep.id)
    assert host[hv].get("master") == naming.bridge_name(net.id)
    inside = links(c1)
    assert inside[ep.interface_name]["address"] == ep.mac_address and "UP" in inside[ep.interface_name]["flags"]
    assert {a for a in addrs(c1) if a[0] == ep.interface_name} == {(ep.interface_name, f"{ep.ip_address}/24")}
    assert await asyncio.to_thread(ping, c1, first.ip_address)
    # a detach removes it as any other
    await cp.m.delete_endpoint(ep.id, wait=True)
    assert hv not in links(cp.host) and ep.interface_name not in links(c1)


async def test_a_failed_attach_leaves_no_prepared_pair(cp: ControlPlane, netns: Callable[[str], str]) -> None:
    c0, c1 = netns("pf0"), netns("pf1")
    net = await cp.m.create_network("prepfail", CIDR, GW, "bridge", "full")
    first = await cp.m.create_endpoint(c0, net.id, wait=True)
    host_before, inside_before = set(links(cp.host)), set(links(c1))
    made, abandoned = _prepares(cp, "made"), _prepares(cp, "abandoned")
    with pytest.raises(VNetError) as err:  # the address is c0's: refused after the node prepared
        await cp.m.create_endpoint(c1, net.id, ip=first.ip_address, wait=True)
    assert err.value.code == "address_in_use"
    # the error came after the node removed the pair: nothing to wait for
    assert set(links(cp.host)) == host_before and set(links(c1)) == inside_before
    assert _prepares(cp, "made") == made + 1 and _prepares(cp, "abandoned") == abandoned + 1


async def test_a_taken_name_is_not_prepared_and_the_commit_picks_the_next(cp: ControlPlane,
                                                                         netns: Callable[[str], str]) -> None:
    c0 = netns("pn0")
    a = await cp.m.create_network("prep-a", CIDR, GW, "bridge", "none")
    b = await cp.m.create_network("prep-b", "10.126.1.0/24", "10.126.1.1", "bridge", "none")
    other = netns("pn1")
    for n in (a, b):  # the bridges
        await cp.m.create_endpoint(other, n.id, wait=True)
    e0 = await cp.m.create_endpoint(c0, a.id, wait=True)
    assert e0.interface_name == "eth0"
    skipped = _prepares(cp, "skipped")
    e1 = await cp.m.create_endpoint(c0, b.id, wait=True)  # eth0 is taken in c0: nothing prepared
    assert e1.status == "ready" and e1.interface_name == "eth1", e1
    await _until(lambda: _prepares(cp, "skipped") == skipped + 1, "the preparation was skipped")
    inside = links(c0)
    assert {"eth0", "eth1"} <= set(inside)
    assert inside["eth0"]["address"] == e0.mac_address and inside["eth1"]["address"] == e1.mac_address


async def _publish(cp: ControlPlane, event: str, info: EndpointInfo, *, wait: bool = False) -> None:
    nc = await nats.connect(cp.cfg.nats_url)
    try:
        subject = subjects.EVT_ENDPOINT_TO_NODE.format(node=cp.node, event=event, id=info.id)
        data = msgspec.json.encode(EndpointEvent(endpoint=info))
        if wait:
            await nc.request(subject, data, timeout=5)
        else:
            await nc.publish(subject, data)
            await nc.flush()
    finally:
        await nc.close()


async def test_a_preparation_without_its_attach_expires_and_an_abandoned_one_goes_at_once(
        cp: ControlPlane, netns: Callable[[str], str], monkeypatch: pytest.MonkeyPatch) -> None:
    """An endpoint service that died between IPAM and its commit never sends the created event
    nor the abandonment: the pair goes after PREPARED_TTL_S. An abandonment is answered once
    the pair is gone."""
    c0, c1, c2 = netns("px0"), netns("px1"), netns("px2")
    net = await cp.m.create_network("prep-exp", CIDR, GW, "bridge", "none")
    await cp.m.create_endpoint(c0, net.id, wait=True)
    monkeypatch.setattr(intake, "PREPARED_TTL_S", 0.5)

    def info(ident: str, ns: str) -> EndpointInfo:
        return EndpointInfo(id=ident, container_id=ns, network_id=net.id, ip_address="", mac_address=naming.local_mac(
            ident.encode()[:6].ljust(6, b"\0")), interface_name="eth0", created_at="", node=cp.node, netns=ns,
            driver=net.driver_type, mtu=1500)

    lost, gone = info("deadbeef00000001", c1), info("deadbeef00000002", c2)
    await _publish(cp, "preparing", lost)
    await _until(lambda: naming.veth_name(lost.id) in links(cp.host) and "eth0" in links(c1), "the pair is made")
    await asyncio.sleep(0.6)
    await _publish(cp, "preparing", gone)  # a later preparation sweeps the expired one
    await _until(lambda: naming.veth_name(lost.id) not in links(cp.host), "the expired pair goes")
    assert "eth0" not in links(c1)
    await _until(lambda: naming.veth_name(gone.id) in links(cp.host), "the second pair is made")
    await _publish(cp, "abandoned", gone, wait=True)
    assert naming.veth_name(gone.id) not in links(cp.host) and "eth0" not in links(c2)
    assert _prepares(cp, "expired") >= 1 and _prepares(cp, "abandoned") >= 1
