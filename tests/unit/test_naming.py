"""Deterministic interface names and MACs (vnet.core.naming)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vnet.core import naming


def test_shapes_and_lengths() -> None:
    b = naming.bridge_name("net-1")
    v = naming.veth_name("ep-1")
    assert b.startswith("vnb-") and len(b) == 14
    assert v.startswith("vne") and len(v) == 15
    assert naming.is_our_bridge(b) and not naming.is_our_veth(b)
    assert naming.is_our_veth(v) and not naming.is_our_bridge(v)
    assert naming.check_ifname(b) == b and naming.check_ifname(v) == v


def test_deterministic_and_distinct() -> None:
    assert naming.veth_name("ep-1") == naming.veth_name("ep-1")
    assert naming.veth_name("ep-1") != naming.veth_name("ep-2")
    # an endpoint and a network with the same id get unrelated hashes
    assert naming.bridge_name("x")[4:] != naming.veth_name("x")[3:13]


def test_no_collisions_in_100k_ids() -> None:
    names = {naming.veth_name(f"endpoint-{i}") for i in range(100_000)}
    assert len(names) == 100_000


def test_others_names_are_not_ours() -> None:
    for name in ("eth0", "lo", "docker0", "vnb-", "vnb-xyz", "vnb-0123456789a", "vnb-ABCDEF0123", "vne12345",
                 "vne0123456789abc", "cali0123456789a", "vne0123456789aZ"):
        assert not naming.is_ours(name), name


@given(st.text(min_size=1, max_size=200))
def test_any_id_gives_valid_names(ident: str) -> None:
    for name in (naming.bridge_name(ident), naming.veth_name(ident)):
        assert len(name.encode()) <= naming.MAX_IFNAME
        assert naming.is_ours(name)
        naming.check_ifname(name)


def test_empty_id_rejected() -> None:
    with pytest.raises(naming.InvalidName):
        naming.veth_name("")


def test_bridge_mac_is_stable_local_unicast() -> None:
    mac = naming.bridge_mac("net-1")
    assert mac == naming.bridge_mac("net-1") != naming.bridge_mac("net-2")
    first = int(mac[:2], 16)
    assert first & 0x02 and not first & 0x01
    assert naming.normalize_mac(mac) == mac


@given(st.binary(min_size=6, max_size=6))
def test_local_mac_always_usable(b: bytes) -> None:
    mac = naming.local_mac(b)
    first = int(mac[:2], 16)
    assert first & 0x02 and not first & 0x01
    assert naming.normalize_mac(mac) == mac


@pytest.mark.parametrize("name", ["", "a" * 16, "eth 0", "eth/0", "a:b", ".", "..", "tab\tx"])
def test_bad_ifnames(name: str) -> None:
    with pytest.raises(naming.InvalidName):
        naming.check_ifname(name)


def test_good_ifnames() -> None:
    for name in ("eth0", "a" * 15, "net1.100", "e-x_y"):
        assert naming.check_ifname(name) == name


def test_mac_normalisation() -> None:
    assert naming.normalize_mac("02-AB-cd-00-00-01") == "02:ab:cd:00:00:01"
    for bad in ("01:00:5e:00:00:01", "00:00:00:00:00:00", "02:00:00:00:00", "zz:00:00:00:00:00", "0200.0000.0001"):
        with pytest.raises(naming.InvalidName):
            naming.normalize_mac(bad)
