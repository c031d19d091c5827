"""core/drivers.py: every driver's schema, defaults and errors."""

from __future__ import annotations

import pytest

from vnet.core import drivers
from vnet.core import errors as E
from vnet.core.model import DriverType


def err(driver: DriverType, opts: dict[str, str]) -> E.VNetError:
    with pytest.raises(E.VNetError) as ei:
        drivers.validate_options(driver, opts)
    assert ei.value.code == "invalid_option" and ei.value.status == 400
    return ei.value


def test_parse_driver() -> None:
    assert drivers.parse_driver("Bridge") is DriverType.BRIDGE
    assert drivers.parse_driver("ipvlan") is DriverType.IPVLAN
    with pytest.raises(E.VNetError) as ei:
        drivers.parse_driver("token-ring")
    assert ei.value.code == "unknown_driver"
    assert "bridge, overlay, macvlan, ipvlan, host" in ei.value.message


def test_bridge_and_overlay() -> None:
    assert drivers.validate_options(DriverType.BRIDGE, {}) == {}
    assert drivers.validate_options(DriverType.BRIDGE, {"mtu": "1400", "bridge_name": "br-web"}) == {
        "bridge_name": "br-web", "mtu": "1400"}
    assert "must be from 68 to 65535" in err(DriverType.BRIDGE, {"mtu": "9"}).message
    assert "interface name" in err(DriverType.BRIDGE, {"bridge_name": "a-very-long-bridge-name"}).message
    assert drivers.validate_options(DriverType.OVERLAY, {"vni": "42", "encrypted": "YES"}) == {
        "encrypted": "true", "vni": "42"}
    assert drivers.validate_options(DriverType.OVERLAY, {})["encrypted"] == "false"
    assert "true or false" in err(DriverType.OVERLAY, {"encrypted": "maybe"}).message


def test_unknown_option_names_the_allowed_ones() -> None:
    e = err(DriverType.BRIDGE, {"parent": "eth0"})
    assert "unknown option 'parent'" in e.message and "bridge_name, mtu" in e.message
    assert e.details["allowed"] == ["bridge_name", "mtu"]
    e = err(DriverType.HOST, {"mtu": "1500"})
    assert "takes no options" in e.message


def test_macvlan() -> None:
    assert drivers.validate_options(DriverType.MACVLAN, {"parent": "eth0"}) == {"mode": "bridge", "parent": "eth0"}
    for mode in drivers.MACVLAN_MODES:
        assert drivers.validate_options(DriverType.MACVLAN, {"parent": "eth0", "mode": mode})["mode"] == mode
    e = err(DriverType.MACVLAN, {"mode": "bridge"})
    assert "needs option 'parent'" in e.message
    e = err(DriverType.MACVLAN, {"parent": "eth0", "mode": "l2"})
    assert "bridge, private, vepa, passthru" in e.message


def test_ipvlan() -> None:
    assert drivers.validate_options(DriverType.IPVLAN, {"parent": "eth1", "mode": "L3"}) == {
        "mode": "l3", "parent": "eth1"}
    assert drivers.validate_options(DriverType.IPVLAN, {"parent": "eth1"})["mode"] == "l2"
    assert "l2, l3" in err(DriverType.IPVLAN, {"parent": "eth1", "mode": "vepa"}).message
    assert "needs option 'parent'" in err(DriverType.IPVLAN, {}).message


def test_every_driver_has_a_schema() -> None:
    assert set(drivers.names()) == set(DriverType)
    assert set(drivers.schemas()) == set(DriverType)


def test_a_kernel_without_the_driver_is_driver_unavailable_naming_node_and_feature() -> None:
    """How the node words the kernel's EOPNOTSUPP for a sub-interface: this runs on every
    kernel (the real refusal, in tests/netns/test_ipvlan.py, only where ipvlan is missing)."""
    import errno

    from vnet.adapters.netlink.apply import classify
    from vnet.adapters.netlink.nsctx import NetlinkError
    from vnet.core.plan import CreateSubIf

    for kind, feature in (("ipvlan", "CONFIG_IPVLAN"), ("macvlan", "CONFIG_MACVLAN")):
        op = CreateSubIf(owner="ep-1", kind=kind, parent="eth0", mode="l2", peer_ns="c1", ifname="eth0", mac=None,
                         mtu=1500)
        code, message, num = classify(op, NetlinkError(errno.EOPNOTSUPP, "Unknown device type"), node="node-7")
        assert (code, num) == ("driver_unavailable", errno.EOPNOTSUPP)
        assert kind in message and "node-7" in message and feature in message and "Unknown device type" in message
        # any other refusal of the same op is not a missing driver
        code, _, _ = classify(op, NetlinkError(errno.EEXIST), node="node-7")
        assert code != "driver_unavailable"
