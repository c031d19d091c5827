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
    assert set(drivers.SCHEMAS) == set(DriverType)
