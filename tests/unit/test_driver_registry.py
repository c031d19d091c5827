"""The driver registry: every driver implements the whole interface on both sides, a
driver from a test-only module plugs in without touching another file, and no
``DriverType`` branching is left outside the driver modules."""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

from tests.unit import dummy_driver
from vnet.adapters.netlink import drivers as kernel_drivers
from vnet.adapters.netlink.drivers import KernelDriver
from vnet.adapters.netlink.probe import _drivers as probe_drivers
from vnet.core import drivers, naming
from vnet.core import errors as E
from vnet.core import plan as P
from vnet.core.dataplane_model import LinkState, NetDesired, NodeActual, NodeDesired, NsState, Scope, Support
from vnet.core.drivers import Driver, OptionSpec
from vnet.core.model import DriverType

_SHARED = Path(__file__).resolve().parents[2] / "shared" / "vnet"


# --------------------------------------------------------------------------- the interface

def _abstract(cls: type) -> set[str]:
    return {name for name, member in vars(cls).items() if getattr(member, "__isabstractmethod__", False)}


@pytest.mark.parametrize("name", drivers.names())
def test_every_registered_driver_implements_the_whole_interface(name: str) -> None:
    d = drivers.get(name)
    assert isinstance(d, Driver) and d.name == name
    assert not getattr(type(d), "__abstractmethods__", None), "abstract methods left"
    for method in _abstract(Driver):  # each one overridden by the driver (or a driver base of it)
        impl = getattr(type(d), method)
        assert impl is not getattr(Driver, method), method
        assert inspect.signature(impl).parameters.keys() == inspect.signature(getattr(Driver, method)).parameters.keys()
    assert isinstance(d.description, str) and d.description
    assert all(isinstance(o, OptionSpec) for o in d.options)
    assert d.schema().driver == name and d.schema().names() == sorted(o.name for o in d.options)
    assert isinstance(d.kernel_kinds, tuple) and all(isinstance(k, str) for k in d.kernel_kinds)
    # the kernel half: registered under the same name, complete, and every kind the
    # driver needs is brought by some kernel driver (so the probe tries it)
    k = kernel_drivers.get(name)
    assert isinstance(k, KernelDriver) and k.name == name
    assert not getattr(type(k), "__abstractmethods__", None)
    for kind in d.kernel_kinds:
        assert kernel_drivers.for_kind(kind) is not None, kind
    assert set(k.features) <= set(k.kinds)
    # teardown and observation answer for any network id
    assert all(isinstance(n, str) for n in d.teardown("net-1"))
    assert isinstance(d.observe(NetDesired(id="net-1", driver=cast(DriverType, name)), NodeDesired()), set)


def test_every_wire_driver_is_registered_on_both_sides_in_order() -> None:
    assert drivers.names() == [d.value for d in DriverType]
    assert [k.name for k in kernel_drivers.all_kernel_drivers()] == [d.value for d in DriverType]


def test_mode_maps_agree_between_the_two_halves() -> None:
    """The pure modes are the ones offered; the kernel's map (written once) encodes each."""
    for name, modes in (("macvlan", drivers.MACVLAN_MODES), ("ipvlan", drivers.IPVLAN_MODES)):
        k = kernel_drivers.get(name)
        assert k is not None
        kernel_modes: dict[str, int] = getattr(k, "modes")  # noqa: B009 - SubIfKernel's map
        assert set(modes) <= set(kernel_modes), name
        assert len(set(kernel_modes.values())) == len(kernel_modes), "two names for one kernel mode"


_BRANCH = re.compile(r"DriverType\.[A-Z]+")


@pytest.mark.parametrize("path", ["core/plan.py", "core/planning", "core/drivers", "core/dataplane_model.py",
                                  "core/mvpolicy.py", "adapters/netlink", "../../services/vnet/svc"])
def test_no_driver_branching_outside_the_driver_modules(path: str) -> None:
    """Generic code consults the registry; only a default value may name a member."""
    root = (_SHARED / path).resolve()
    files = [root] if root.is_file() else sorted(root.rglob("*.py"))
    found = []
    for f in files:
        for no, line in enumerate(f.read_text().splitlines(), 1):
            if _BRANCH.search(line) and not re.search(r"driver: DriverType = DriverType\.BRIDGE", line):
                found.append(f"{f}:{no}: {line.strip()}")
    assert not found, found


# --------------------------------------------------------------------------- a driver plugs in

@pytest.fixture
def dummy() -> Iterator[None]:
    """The test-only driver registered on both sides for one test (and only then)."""
    drivers.register(dummy_driver.DRIVER)
    kernel_drivers.register(dummy_driver.KERNEL)
    try:
        yield
    finally:
        drivers.unregister(dummy_driver.NAME)
        kernel_drivers.unregister(dummy_driver.NAME)


def _net(**kw: object) -> NetDesired:
    base: dict[str, object] = {"id": "d1", "driver": dummy_driver.NAME, "gateway4": "10.9.0.1/24"}
    base.update(kw)
    return NetDesired(**base)  # type: ignore[arg-type]


def _host(*links: LinkState) -> NodeActual:
    return NodeActual(host=NsState(links={link.name: link for link in links}))


def test_a_test_only_driver_is_listed_validates_and_plans(dummy: None) -> None:
    # listed
    assert dummy_driver.NAME in drivers.names()
    assert drivers.get(dummy_driver.NAME) is dummy_driver.DRIVER
    assert dummy_driver.NAME in drivers.schemas()
    # its options validated by the generic schema code
    assert drivers.validate_options(dummy_driver.NAME, {"mtu": " 1400"}) == {"mtu": "1400"}
    with pytest.raises(E.VNetError) as ei:
        drivers.validate_options(dummy_driver.NAME, {"parent": "eth0"})
    assert ei.value.code == "invalid_option" and ei.value.details["allowed"] == ["mtu"]
    # planned: its own ops, through the generic planner
    bridge = naming.bridge_name("d1")
    p = P.plan(NodeDesired(networks=[_net()]), _host())
    assert p.errors == []
    assert [type(op) for op in p.ops] == [P.EnsureBridge, P.AddAddr]
    assert p.ops[0].owner == "net:d1" and isinstance(p.ops[1], P.AddAddr) and p.ops[1].cidr == "10.9.0.1/24"
    # converged: nothing to do; its validation refuses what it refuses
    made = LinkState(index=7, name=bridge, kind="bridge", up=True, mtu=1500, addrs=("10.9.0.1/24",))
    assert P.plan(NodeDesired(networks=[_net()]), _host(made)).ops == []
    bad = P.plan(NodeDesired(networks=[_net(mtu=9001)]), _host())
    assert bad.ops == [] and [(e.owner, e.code) for e in bad.errors] == [("net:d1", "invalid_option")]
    # torn down through the registry: by the full sweep, and when a scoped network goes
    gone = P.plan(NodeDesired(), _host(made))
    assert [(type(op), getattr(op, "ifname", None)) for op in gone.ops] == [(P.DeleteLink, bridge)]
    scoped = P.plan(NodeDesired(), _host(made), Scope(networks=frozenset({"d1"})))
    assert [getattr(op, "ifname", None) for op in scoped.ops] == [bridge]
    # listed by the probe with what the kernel said about its kinds
    kinds = {k: Support(available=True, reason="made one") for k in ("bridge", "veth", "vxlan", "macvlan", "ipvlan",
                                                                         "dummy")}
    assert probe_drivers(kinds)[dummy_driver.NAME] == Support(available=True,
                                                                reason="kernel support found by the probe")
    kinds["dummy"] = Support(available=False, reason="the kernel refused to create a link of kind dummy")
    assert probe_drivers(kinds)[dummy_driver.NAME].reason == "the kernel refused to create a link of kind dummy"


def test_the_test_only_driver_is_gone_after_the_test() -> None:
    assert dummy_driver.NAME not in drivers.names()
    assert kernel_drivers.get(dummy_driver.NAME) is None
    with pytest.raises(E.VNetError) as ei:
        drivers.get(dummy_driver.NAME)
    assert ei.value.code == "unknown_driver"


def test_registering_a_name_or_kind_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="registered already"):
        drivers.register(drivers.get("bridge"))
    with pytest.raises(ValueError, match="belongs to kernel driver"):
        kernel_drivers.register(type("Clash", (type(dummy_driver.KERNEL),), {"name": "clash", "kinds": ("vxlan",)})())
