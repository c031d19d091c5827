"""The pure allocator: offset math, what is never handed out, serial next-free, the
IPv6 window, the check."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vnet.core import errors as E
from vnet.core import ipam as core


def lay(cidr: str, gw: str | None = None, reserved: tuple[str, ...] = (), excluded: tuple[str, ...] = ()
        ) -> core.PoolLayout:
    return core.build_layout("net1", cidr, gw, reserved, excluded)


# --- offsets and blocked addresses ------------------------------------------------------

def test_v4_offsets_and_capacity() -> None:
    p = lay("10.1.0.0/24", "10.1.0.1")
    assert p.window == 256 and p.family == 4 and p.prefix_len == 24
    assert p.capacity == 256 - 3  # network, broadcast, gateway
    assert str(p.address_at(0)) == "10.1.0.0" and str(p.address_at(255)) == "10.1.0.255"
    assert p.offset_of(ipaddress.ip_address("10.1.0.77")) == 77
    assert p.blocked_reason(0) == "the network address"
    assert p.blocked_reason(255) == "the broadcast address"
    assert p.blocked_reason(1) == "the gateway"
    assert p.blocked_reason(2) is None
    assert [o for o in range(256) if p.is_blocked(o)] == [0, 1, 255]
    with pytest.raises(ValueError):
        p.address_at(256)
    with pytest.raises(ValueError):
        p.offset_of(ipaddress.ip_address("10.2.0.1"))


def test_reserved_and_excluded_are_blocked_and_merged() -> None:
    p = lay("10.0.0.0/26", "10.0.0.1", reserved=("10.0.0.2", "10.0.0.9"), excluded=("10.0.0.8/29", "10.0.0.32/28"))
    assert p.ranges == ((0, 2), (8, 15), (32, 47), (63, 63))
    assert p.capacity == 64 - 3 - 8 - 16 - 1
    assert p.blocked_reason(9) == "inside the excluded subnet 10.0.0.8/29"  # first matching reason
    assert p.blocked_offsets() == 64 - p.capacity
    # the blocked bitmap is exactly the union
    bits = p.blocked_bitmap()
    assert [o for o in range(64) if core.get_bit(bits, o)] == [o for o in range(64) if p.is_blocked(o)]


def test_signature_is_canonical() -> None:
    a = lay("10.0.0.0/24", "10.0.0.1", reserved=("10.0.0.9", "10.0.0.3"), excluded=("10.0.0.128/25",))
    b = lay("10.0.0.0/24", "10.0.0.1", reserved=("10.0.0.3", "10.0.0.9", "10.0.0.3"), excluded=("10.0.0.128/25",))
    assert a.signature() == b.signature()
    assert a.signature() != lay("10.0.0.0/24", "10.0.0.1").signature()


def test_point_to_point_prefixes_use_every_address() -> None:
    assert lay("10.0.0.0/31").capacity == 2
    assert lay("10.0.0.7/32").capacity == 1
    assert lay("fd00::/127").capacity == 2


@pytest.mark.parametrize(("cidr", "gw", "reserved", "excluded", "code", "words"), [
    ("10.0.0.0", None, (), (), "invalid_cidr", "no prefix length"),
    ("10.0.0.1/24", None, (), (), "invalid_cidr", "did you mean 10.0.0.0/24"),
    ("10.0.0.0/33", None, (), (), "invalid_cidr", "not a valid CIDR"),
    ("10.0.0.0/24", "10.0.1.1", (), (), "invalid_gateway", "outside the subnet"),
    ("10.0.0.0/24", "10.0.0.0", (), (), "invalid_gateway", "network address"),
    ("10.0.0.0/24", "10.0.0.255", (), (), "invalid_gateway", "broadcast address"),
    ("10.0.0.0/24", "fd00::1", (), (), "invalid_gateway", "outside the subnet"),
    ("10.0.0.0/24", "bogus", (), (), "invalid_gateway", "not an IP address"),
    ("10.0.0.0/24", None, ("10.0.9.9",), (), "invalid_request", "outside the subnet"),
    ("10.0.0.0/24", None, (), ("10.0.1.0/25",), "invalid_cidr", "not inside the pool"),
    ("10.0.0.0/30", "10.0.0.1", ("10.0.0.2",), (), "invalid_cidr", "no assignable address"),
])
def test_bad_pool_arguments(cidr: str, gw: str | None, reserved: tuple[str, ...], excluded: tuple[str, ...],
                            code: str, words: str) -> None:
    with pytest.raises(E.VNetError) as ei:
        lay(cidr, gw, reserved, excluded)
    assert ei.value.code == code
    assert words in ei.value.message


@pytest.mark.parametrize(("address", "words"), [
    ("10.0.0.0", "the network address"),
    ("10.0.0.15", "the broadcast address"),
    ("10.0.0.1", "the gateway"),
    ("10.0.0.5", "a reserved address"),
    ("10.0.0.9", "excluded subnet 10.0.0.8/30"),
    ("10.0.1.3", "outside"),
    ("fd00::3", "IPv6 address"),
])
def test_static_refusals_say_why(address: str, words: str) -> None:
    p = lay("10.0.0.0/28", "10.0.0.1", reserved=("10.0.0.5",), excluded=("10.0.0.8/30",))
    with pytest.raises(E.VNetError) as ei:
        p.static_offset(address)
    assert ei.value.code == "address_not_assignable" and ei.value.status == 400
    assert words in ei.value.message
    assert p.static_offset("10.0.0.6") == 6


def test_static_not_an_address() -> None:
    with pytest.raises(E.VNetError) as ei:
        lay("10.0.0.0/28").static_offset("10.0.0.x")
    assert ei.value.code == "invalid_request"


# --- IPv6 window ------------------------------------------------------------------------

def test_v6_no_broadcast_anycast_blocked() -> None:
    p = lay("fd00:1::/120", "fd00:1::1")
    assert p.window == 256 and p.capacity == 254  # subnet-router anycast ::0 and the gateway
    assert p.blocked_reason(0) == "the subnet-router anycast address"
    assert not p.is_blocked(255)  # no broadcast in IPv6
    assert str(p.address_at(255)) == "fd00:1::ff"


def test_v6_large_subnet_is_capped_to_the_window() -> None:
    p = lay("fd00::/64", "fd00::1", reserved=("fd00::ffff:ffff",), excluded=("fd00::1:0:0/96",))
    assert p.window == core.MAX_WINDOW == 2 ** 24
    assert p.truncated and p.size == 2 ** 64
    assert p.capacity == 2 ** 24 - 2  # the reserved address and the excluded /96 lie past the window
    assert p.nblocks == 2 ** 24 // core.BLOCK
    with pytest.raises(E.VNetError) as ei:
        p.static_offset("fd00::1:0:0:5")
    assert "managed window" in ei.value.message and "fd00::ff:ffff" in ei.value.message
    assert p.static_offset("fd00::ff:ffff") == 2 ** 24 - 1
    # excluded ranges that straddle the window end are clipped
    q = lay("fd00::/64", excluded=("fd00::80:0/105",))  # offsets 2**23 .. 2**24-1
    assert q.capacity == 2 ** 23 - 1


def test_exhausted_error_names_pool_and_size() -> None:
    p = lay("10.9.0.0/26", "10.9.0.1")
    err = core.exhausted_error(p, 61)
    assert err.code == "pool_exhausted" and err.status == 503
    assert "net1" in err.message and "10.9.0.0/26" in err.message and "61" in err.message
    assert err.details["capacity"] == 61 and err.details["cidr"] == "10.9.0.0/26"


# --- serial allocation (the model) -------------------------------------------------------

def test_serial_next_free_wraps_and_skips_blocked() -> None:
    p = lay("10.0.0.0/29", "10.0.0.1")  # assignable offsets 2..6
    m = core.PoolModel(p)
    assert [m.allocate(f"e{i}") for i in range(3)] == [2, 3, 4]
    assert m.release("e0") == 2
    # 2 was just released: serial allocation goes on after the cursor (4) first
    assert m.allocate("e3") == 5
    assert m.allocate("e4") == 6
    assert m.allocate("e5") == 2  # wrapped: only now is 2 reused
    with pytest.raises(E.VNetError) as ei:
        m.allocate("e6")
    assert ei.value.code == "pool_exhausted"
    assert m.allocate("e3") == 5  # the same owner gets its address back
    assert m.used == 5 and m.free == 0


def test_static_allocation_conflicts() -> None:
    p = lay("10.0.0.0/29", "10.0.0.1")
    m = core.PoolModel(p)
    assert m.allocate_static("a", "10.0.0.4") == 4
    assert m.cursor == -1  # static requests do not move the cursor
    assert m.allocate_static("a", "10.0.0.4") == 4  # idempotent
    with pytest.raises(E.VNetError) as ei:
        m.allocate_static("b", "10.0.0.4")
    assert ei.value.code == "address_in_use" and ei.value.details["holder"] == "a" and "a;" in ei.value.message
    with pytest.raises(E.VNetError) as ei:
        m.allocate_static("a", "10.0.0.5")
    assert ei.value.code == "conflict" and "already holds 10.0.0.4" in ei.value.message
    assert m.allocate("b") == 2


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.integers(0, 63), st.sets(st.integers(0, 63)))
def test_next_free_is_first_free_after_cursor(cursor: int, taken: set[int]) -> None:
    p = lay("10.0.0.0/26", "10.0.0.1", reserved=("10.0.0.10",))
    got = core.next_free(p, taken, cursor)
    free = [o for o in range(64) if o not in taken and not p.is_blocked(o)]
    if not free:
        assert got is None
        return
    after = [o for o in free if o > cursor]
    assert got == (after[0] if after else free[0])


# --- bits and the check ------------------------------------------------------------------

@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.integers(0, 200), st.integers(0, 200))
def test_set_range_and_count(a: int, b: int) -> None:
    s, e = min(a, b), max(a, b)
    bits = bytearray()
    core.set_range(bits, s, e)
    assert [i for i in range(210) if core.get_bit(bits, i)] == list(range(s, e + 1))
    assert core.count_bits(bits, 0, 209) == e - s + 1
    assert core.count_bits(bits, s, e) == e - s + 1
    assert core.set_offsets(bits, 300) == list(range(s, e + 1))


def test_expected_summary_marks_full_blocks() -> None:
    p = lay("10.0.0.0/21")  # 2048 offsets: two blocks
    bits = p.blocked_bitmap()
    assert core.expected_summary(p, bits) == bytearray(b"\x00")
    core.set_range(bits, 0, 1023)
    assert core.get_bit(core.expected_summary(p, bits), 0)
    assert not core.get_bit(core.expected_summary(p, bits), 1)
    small = lay("10.0.0.0/29")  # a single partial block of 8
    b2 = small.blocked_bitmap()
    core.set_range(b2, 1, 6)
    assert core.get_bit(core.expected_summary(small, b2), 0)


def test_check_finds_every_kind_of_inconsistency() -> None:
    p = lay("10.0.0.0/28", "10.0.0.1")
    m = core.PoolModel(p)
    for o in ("a", "b", "c"):
        m.allocate(o)  # offsets 2, 3, 4
    bits = m.bitmap()
    summary = core.expected_summary(p, bits)
    owners = dict(m.owners)
    holders = dict(m.holders)
    assert core.check_pool(p, bytes(bits), bytes(summary), owners, holders, m.used) == []

    bad = bytearray(bits)
    core.set_bit(bad, 9)  # bit without owner
    core.set_bit(bad, 3, False)  # b's bit cleared
    core.set_bit(bad, 1, False)  # the gateway's bit cleared
    kinds = {pr.kind for pr in core.check_pool(p, bytes(bad), bytes(summary), owners, holders, m.used)}
    assert kinds == {"bit_without_owner", "owner_without_bit", "blocked_bit_clear"}

    kinds = {pr.kind for pr in core.check_pool(p, bytes(bits), bytes(summary), owners, holders, 7)}
    assert kinds == {"used_mismatch"}

    wrong_sum = bytearray(b"\x80")
    kinds = {pr.kind for pr in core.check_pool(p, bytes(bits), bytes(wrong_sum), owners, holders, m.used)}
    assert kinds == {"summary_wrong"}

    h2 = dict(holders)
    h2[4] = "zed"
    kinds = {pr.kind for pr in core.check_pool(p, bytes(bits), bytes(summary), owners, h2, m.used)}
    assert kinds == {"holder_mismatch"}

    o2 = {**owners, "gw": 1}
    h3 = {**holders, 1: "gw"}
    probs = core.check_pool(p, bytes(bits), bytes(summary), o2, h3, m.used + 1)
    assert {pr.kind for pr in probs} == {"blocked_allocated"}
    assert "the gateway" in probs[0].message


def test_check_itemises_at_most_limit() -> None:
    p = lay("10.0.0.0/24")
    bits = p.blocked_bitmap()
    core.set_range(bits, 1, 100)
    probs = core.check_pool(p, bytes(bits), bytes(core.expected_summary(p, bits)), {}, {}, 0, limit=5)
    assert len(probs) == 6 and probs[-1].message == "... and 95 more bit_without_owner problems"


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.integers(0, 60), st.integers(0, 8)), max_size=5),
       st.lists(st.tuples(st.integers(0, 60), st.integers(0, 8)), max_size=5))
def test_subtract_ranges_is_set_difference(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> None:
    ra = [(s, s + n) for s, n in a]
    rb = [(s, s + n) for s, n in b]
    got = core.subtract_ranges(ra, rb)
    expect = {i for s, e in ra for i in range(s, e + 1)} - {i for s, e in rb for i in range(s, e + 1)}
    assert {i for s, e in got for i in range(s, e + 1)} == expect
    assert got == core.merge_ranges(got)  # disjoint, sorted, merged
