"""core/addr.py: parsing, gateways, overlap, the index keys, carving (hypothesis where it pays)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from vnet.core import addr
from vnet.core import errors as E


def err(fn, *a, **kw) -> E.VNetError:
    with pytest.raises(E.VNetError) as ei:
        fn(*a, **kw)
    return ei.value


# --- parse_cidr ---------------------------------------------------------------------------

def test_parse_valid_v4_and_v6() -> None:
    assert addr.parse_cidr("172.20.1.0/24") == ipaddress.ip_network("172.20.1.0/24")
    assert addr.parse_cidr(" 10.0.0.0/8 ") == ipaddress.ip_network("10.0.0.0/8")
    assert addr.parse_cidr("fd00:20:1::/64", family=6) == ipaddress.ip_network("fd00:20:1::/64")


@pytest.mark.parametrize("text", ["banana", "300.1.2.3/24", "10.0.0.0/33", "10.0.0.0/x", "1.2.3/24", "/24"])
def test_syntax_errors_say_what_to_write(text: str) -> None:
    e = err(addr.parse_cidr, text)
    assert e.code == "invalid_cidr" and e.status == 400
    assert repr(text) in e.message and "172.20.1.0/24" in e.message


def test_missing_prefix_length() -> None:
    e = err(addr.parse_cidr, "10.1.0.0")
    assert e.code == "invalid_cidr" and "no prefix length" in e.message


def test_host_bits_set_suggests_the_network_address() -> None:
    e = err(addr.parse_cidr, "10.1.2.3/16")
    assert e.code == "cidr_host_bits"
    assert "host bits" in e.message and "10.1.0.0/16" in e.message
    assert e.details["suggestion"] == "10.1.0.0/16"
    e6 = err(addr.parse_cidr, "fd00::1/64")
    assert e6.code == "cidr_host_bits" and "fd00::/64" in e6.message


def test_wrong_family_and_too_small_and_reserved() -> None:
    e = err(addr.parse_cidr, "fd00::/64", family=4)
    assert e.code == "invalid_cidr" and "cidr_v6" in e.message
    e = err(addr.parse_cidr, "10.0.0.0/31")
    assert e.code == "invalid_cidr" and "/30" in e.message
    for bad, what in (("127.0.0.0/16", "loopback"), ("169.254.0.0/24", "link-local"), ("224.1.0.0/16", "multicast"),
                      ("0.0.0.0/0", "this network"), ("fe80::/64", "link-local")):
        e = err(addr.parse_cidr, bad)
        assert e.code == "invalid_cidr" and what in e.message, (bad, e.message)


# --- gateways -----------------------------------------------------------------------------

def test_default_gateway_is_first_usable() -> None:
    assert str(addr.default_gateway(addr.parse_cidr("172.20.0.0/16"))) == "172.20.0.1"
    assert str(addr.default_gateway(addr.parse_cidr("fd00:1::/64"))) == "fd00:1::1"


def test_gateway_rules() -> None:
    net = addr.parse_cidr("10.0.0.0/24")
    assert str(addr.parse_gateway("10.0.0.254", net)) == "10.0.0.254"
    cases = {
        "10.0.1.1": "outside the subnet",
        "10.0.0.0": "network address",
        "10.0.0.255": "broadcast address",
        "nope": "not an IP address",
        "10.0.0.1/24": "is a prefix",
        "fd00::1": "IPv6",
    }
    for gw, words in cases.items():
        e = err(addr.parse_gateway, gw, net)
        assert e.code == "invalid_gateway" and words in e.message, (gw, e.message)
        assert "10.0.0.1" in e.message  # says what would work


def test_ipv6_has_no_broadcast() -> None:
    net = addr.parse_cidr("fd00::/126")
    assert str(addr.parse_gateway("fd00::3", net)) == "fd00::3"
    assert err(addr.parse_gateway, "fd00::", net).code == "invalid_gateway"


# --- overlap and index --------------------------------------------------------------------

nets_v4 = st.builds(lambda a, p: ipaddress.ip_network((a >> (32 - p) << (32 - p), p)),
                    st.integers(0, 2**32 - 1), st.integers(8, 30))


@given(nets_v4, nets_v4)
def test_overlap_is_symmetric_and_matches_ipaddress(a: addr.IPNet, b: addr.IPNet) -> None:
    assert addr.overlaps(a, b) == addr.overlaps(b, a) == a.overlaps(b)


def test_overlap_never_across_families() -> None:
    assert not addr.overlaps(ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))


@given(nets_v4, nets_v4)
def test_index_order_is_numeric_order(a: addr.IPNet, b: addr.IPNet) -> None:
    ma, mb = addr.index_member(a, "x"), addr.index_member(b, "y")
    assert (ma[:17] < mb[:17]) == (addr.span(a) < addr.span(b))
    assert addr.parse_index_member(ma) == (*addr.span(a), "x")


def test_index_member_widths() -> None:
    assert addr.index_member(ipaddress.ip_network("10.0.0.0/24"), "n1") == "0a000000:0a0000ff:n1"
    m6 = addr.index_member(ipaddress.ip_network("fd00::/64"), "n2")
    lo, hi, ident = m6.split(":")
    assert len(lo) == len(hi) == 32 and ident == "n2"


# --- carving ------------------------------------------------------------------------------

def test_find_free_skips_taken_and_aligns() -> None:
    pool = addr.parse_cidr("10.0.0.0/16")
    taken = [ipaddress.ip_network("10.0.0.0/24"), ipaddress.ip_network("10.0.1.128/25")]
    assert str(addr.find_free(pool, 24, taken)) == "10.0.2.0/24"
    assert str(addr.find_free(pool, 25, taken)) == "10.0.1.0/25"
    # A host route covering part of the pool is skipped like a network.
    assert str(addr.find_free(pool, 24, [ipaddress.ip_network("10.0.0.0/20")])) == "10.0.16.0/24"
    # lo/hi bound the search (next-fit from a cursor).
    assert str(addr.find_free(pool, 24, taken, lo=int(ipaddress.ip_address("10.0.7.9")))) == "10.0.8.0/24"
    assert addr.find_free(pool, 24, taken, hi=int(ipaddress.ip_address("10.0.1.255"))) is None


def test_find_free_exhaustion_and_capacity() -> None:
    pool = addr.parse_cidr("10.0.0.0/22")
    assert addr.capacity(pool, 24) == 4
    taken: list[addr.IPNet] = []
    for _ in range(4):
        n = addr.find_free(pool, 24, taken)
        assert n is not None
        taken.append(n)
    assert addr.find_free(pool, 24, taken) is None
    assert err(addr.find_free, pool, 22, []).code == "invalid_request"  # not smaller than the pool


def test_find_free_v6() -> None:
    pool = addr.parse_cidr("fd00:20::/48")
    got = addr.find_free(pool, 64, [ipaddress.ip_network("fd00:20::/64")])
    assert str(got) == "fd00:20:0:1::/64"


@settings(max_examples=300)
@given(st.integers(16, 24), st.integers(0, 8),
       st.lists(st.tuples(st.integers(0, 2**16 - 1), st.integers(18, 30)), max_size=30))
def test_carving_never_overlaps(pool_len: int, extra: int, raw: list[tuple[int, int]]) -> None:
    pool = ipaddress.ip_network((int(ipaddress.ip_address("10.0.0.0")), pool_len))
    plen = min(30, pool_len + extra)
    assume(plen > pool_len)
    base = int(pool.network_address)
    taken = [ipaddress.ip_network(((base + off) >> (32 - p) << (32 - p), p)) for off, p in raw]
    got = addr.find_free(pool, plen, taken)
    if got is None:
        # Exhausted: then every aligned block overlaps something.
        size = 1 << (32 - plen)
        for start in range(base, base + pool.num_addresses, size):
            blk = ipaddress.ip_network((start, plen))
            assert any(blk.overlaps(t) for t in taken)
    else:
        assert got.prefixlen == plen and got.subnet_of(pool)
        assert not any(got.overlaps(t) for t in taken)
        # First fit: no free aligned block before it.
        size = 1 << (32 - plen)
        for start in range(base, int(got.network_address), size):
            blk = ipaddress.ip_network((start, plen))
            assert any(blk.overlaps(t) for t in taken)


@given(st.lists(st.integers(22, 28), min_size=1, max_size=40))
def test_repeated_carving_yields_disjoint_subnets(sizes: list[int]) -> None:
    pool = addr.parse_cidr("172.20.0.0/20")
    taken: list[addr.IPNet] = []
    for p in sizes:
        got = addr.find_free(pool, p, taken)
        if got is None:
            continue
        assert not any(addr.overlaps(got, t) for t in taken)
        taken.append(got)


# --- host prefixes ------------------------------------------------------------------------

def test_host_prefixes_filters_and_normalises() -> None:
    got = addr.host_prefixes(["0.0.0.0/0", "::/0", "10.0.2.15/24", "10.0.2.0/24", "127.0.0.1/8", "169.254.1.1/16",
                              "fe80::1/64", "ff00::/8", "fd00::2/64", "192.168.5.0/24", "junk", "224.0.0.0/4"])
    assert [str(n) for n in got] == ["10.0.2.0/24", "192.168.5.0/24", "fd00::/64"]
