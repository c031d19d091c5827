"""The IPAM allocator, pure: pool layout (offset math), serial next-free, a reference
model, and the consistency check. No I/O — :mod:`vnet.adapters.ipam_store` runs the
same rules in Redis (Lua) and the tests compare the two.

A pool manages the addresses ``network + offset`` for ``0 <= offset < window``.
``window`` is the size of the subnet, capped at :data:`MAX_WINDOW` (2**24) so a
``/64`` stays a 2 MiB bitmap at most: only the first 16,777,216 addresses of a large
IPv6 subnet are ever handed out (documented in docs/ipam.md).

Offsets that are never handed out ("blocked"): the network address (IPv4; for IPv6
offset 0 is the subnet-router anycast address), the IPv4 broadcast address, the
gateway, ``reserved`` addresses and ``excluded`` child subnets. ``capacity`` is the
number of offsets that are not blocked.

Serial allocation: a dynamic request gets the first free offset *after* the cursor
(the last offset handed out dynamically), wrapping to the start, so a just-released
address is not reused while any other is free.

Block summary: offsets are grouped in blocks of :data:`BLOCK` (1024); the store keeps
one summary bit per block, set while every offset of the block is taken, so the next
free offset is found with one search on the summary and one inside a block — a cost
that does not depend on how full the pool is.
"""

from __future__ import annotations

import bisect
import ipaddress
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from vnet.core import errors as E
from vnet.core.addr import subnet_of

BLOCK = 1024
WINDOW_BITS = 24
MAX_WINDOW = 1 << WINDOW_BITS

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_CHUNK = 4096  # bytes compared at once when diffing bitmaps


def family_name(family: int) -> str:
    return "IPv6" if family == 6 else "IPv4"


def parse_network(cidr: str, what: str = "cidr") -> IPNetwork:
    """A CIDR with no host bits set, or a 400 ``invalid_cidr`` saying what is wrong."""
    text = cidr.strip()
    if "/" not in text:
        raise E.make(E.INVALID_CIDR, f"{what} {cidr!r} has no prefix length; write it as address/len "
                     "(e.g. 10.1.0.0/24)", cidr=cidr)
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise E.make(E.INVALID_CIDR, f"{what} {cidr!r} is not a valid CIDR: {exc}", cidr=cidr) from None
        raise E.make(E.INVALID_CIDR, f"{what} {cidr!r} has host bits set; did you mean {loose}?",
                     cidr=cidr, suggestion=str(loose)) from None


def parse_address(text: str, what: str = "address") -> IPAddress:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        raise E.make(E.INVALID_REQUEST, f"{what} {text!r} is not an IPv4 or IPv6 address", address=text) from None


@dataclass(frozen=True)
class Blocked:
    """A range of offsets that is never handed out, and why."""

    start: int
    end: int  # inclusive
    reason: str


@dataclass(frozen=True)
class PoolLayout:
    """Everything fixed about a pool once it exists (built and validated by :func:`build_layout`)."""

    network_id: str
    network: IPNetwork
    gateway: IPAddress | None
    reserved: tuple[IPAddress, ...]
    excluded: tuple[IPNetwork, ...]
    window: int
    blocked: tuple[Blocked, ...]  # sorted by start; may overlap
    ranges: tuple[tuple[int, int], ...]  # the union of `blocked`, merged and sorted
    capacity: int
    block: int = BLOCK  # offsets per summary bit (smaller only in tests, to exercise many blocks)
    _starts: tuple[int, ...] = field(repr=False, compare=False, default=())

    # -- identity --------------------------------------------------------------------
    @property
    def family(self) -> int:
        return self.network.version

    @property
    def cidr(self) -> str:
        return str(self.network)

    @property
    def prefix_len(self) -> int:
        return self.network.prefixlen

    @property
    def size(self) -> int:
        """Addresses in the subnet (may exceed ``window`` for large IPv6 subnets)."""
        return self.network.num_addresses

    @property
    def truncated(self) -> bool:
        return self.size > self.window

    @property
    def nblocks(self) -> int:
        return (self.window + self.block - 1) // self.block

    def block_size(self, b: int) -> int:
        return min(self.block, self.window - b * self.block)

    def describe(self) -> str:
        return f"the {family_name(self.family)} pool of network {self.network_id} ({self.cidr})"

    def signature(self) -> str:
        """Canonical form of the arguments: creating the same pool twice compares these."""
        return json.dumps({
            "cidr": self.cidr,
            "gateway": str(self.gateway) if self.gateway is not None else None,
            "reserved": sorted({str(a) for a in self.reserved}, key=_addr_key),
            "excluded": sorted({str(n) for n in self.excluded}, key=_net_key),
        }, separators=(",", ":"))

    # -- offsets ---------------------------------------------------------------------
    def address_at(self, offset: int) -> IPAddress:
        if not 0 <= offset < self.window:
            raise ValueError(f"offset {offset} outside the window of {self.window}")
        return self.network.network_address + offset

    def offset_of(self, address: IPAddress) -> int:
        """The offset of an address inside the subnet (may be >= window); ValueError if outside."""
        if address.version != self.family or address not in self.network:
            raise ValueError(f"{address} is not in {self.cidr}")
        return int(address) - int(self.network.network_address)

    def is_blocked(self, offset: int) -> bool:
        i = bisect.bisect_right(self._range_starts(), offset) - 1
        return i >= 0 and self.ranges[i][0] <= offset <= self.ranges[i][1]

    def _range_starts(self) -> tuple[int, ...]:
        return self._starts or tuple(r[0] for r in self.ranges)

    def blocked_reason(self, offset: int) -> str | None:
        for b in self.blocked:
            if b.start > offset:
                break
            if b.start <= offset <= b.end:
                return b.reason
        return None

    def blocked_offsets(self) -> int:
        return sum(e - s + 1 for s, e in self.ranges)

    def static_offset(self, text: str) -> int:
        """The offset of a requested static address, or a 400 saying why it cannot be had."""
        addr = parse_address(text)
        if addr.version != self.family:
            raise E.make(E.ADDRESS_NOT_ASSIGNABLE,
                         f"{addr} is an {family_name(addr.version)} address but {self.describe()} is "
                         f"{family_name(self.family)}", address=str(addr), network_id=self.network_id,
                         cidr=self.cidr)
        if addr not in self.network:
            raise E.make(E.ADDRESS_NOT_ASSIGNABLE, f"{addr} is outside {self.describe()}; ask for an "
                         f"address inside {self.cidr} or omit it for a dynamic one",
                         address=str(addr), network_id=self.network_id, cidr=self.cidr)
        off = self.offset_of(addr)
        if off >= self.window:
            raise E.make(E.ADDRESS_NOT_ASSIGNABLE,
                         f"{addr} is beyond the managed window of {self.describe()}: only the first "
                         f"{self.window} addresses (up to {self.address_at(self.window - 1)}) are handed out",
                         address=str(addr), network_id=self.network_id, cidr=self.cidr, window=self.window)
        reason = self.blocked_reason(off)
        if reason is not None:
            raise E.make(E.ADDRESS_NOT_ASSIGNABLE, f"{addr} is {reason} of {self.describe()} and is never "
                         "handed out; pick another address", address=str(addr), network_id=self.network_id,
                         cidr=self.cidr, reason=reason)
        return off

    # -- expected bitmaps (for the check and the tests) ------------------------------
    def blocked_bitmap(self) -> bytearray:
        """The bitmap of a pool with nothing allocated (Redis bit order: bit 0 = MSB of byte 0)."""
        bits = bytearray((self.window + 7) // 8)
        for s, e in self.ranges:
            set_range(bits, s, e)
        return bits


def _addr_key(s: str) -> tuple[int, int]:
    a = ipaddress.ip_address(s)
    return a.version, int(a)


def _net_key(s: str) -> tuple[int, int, int]:
    n = ipaddress.ip_network(s)
    return n.version, int(n.network_address), n.prefixlen


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1] + 1:
            if e > out[-1][1]:
                out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def subtract_ranges(a: Iterable[tuple[int, int]], b: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of the inclusive ranges ``a`` that are in none of ``b`` (both merged and sorted)."""
    out: list[tuple[int, int]] = []
    bs = merge_ranges(b)
    for s, e in merge_ranges(a):
        cur = s
        for bs_, be in bs:
            if be < cur or bs_ > e:
                continue
            if bs_ > cur:
                out.append((cur, bs_ - 1))
            cur = max(cur, be + 1)
            if cur > e:
                break
        if cur <= e:
            out.append((cur, e))
    return out


def build_layout(network_id: str, cidr: str, gateway: str | None = None,
                 reserved: Iterable[str] = (), excluded: Iterable[str] = (), *, block: int = BLOCK) -> PoolLayout:
    """Validate a pool's arguments and compute its layout (400 errors name the bad value)."""
    if block < 8 or block % 8:
        raise ValueError("block must be a positive multiple of 8")
    net = parse_network(cidr)
    v4 = net.version == 4
    window = min(net.num_addresses, MAX_WINDOW)
    blocked: list[Blocked] = []
    # RFC 3021 (/31) and RFC 6164 (/127): point-to-point, every address usable.
    p2p = net.prefixlen >= (31 if v4 else 127)
    if not p2p:
        blocked.append(Blocked(0, 0, "the network address" if v4 else "the subnet-router anycast address"))
        if v4:
            blocked.append(Blocked(window - 1, window - 1, "the broadcast address"))
    gw: IPAddress | None = None
    if gateway is not None and gateway.strip():
        try:
            gw = ipaddress.ip_address(gateway.strip())
        except ValueError:
            raise E.make(E.INVALID_GATEWAY, f"gateway {gateway!r} is not an IP address", gateway=gateway) from None
        if gw.version != net.version or gw not in net:
            raise E.make(E.INVALID_GATEWAY, f"gateway {gw} is outside the subnet {net}; pick an address inside "
                         "it (usually the first host)", gateway=str(gw), cidr=str(net))
        goff = int(gw) - int(net.network_address)
        if not p2p and goff == 0:
            raise E.make(E.INVALID_GATEWAY, f"gateway {gw} is the network address of {net}; use a host address "
                         f"such as {net.network_address + 1}", gateway=str(gw), cidr=str(net))
        if v4 and not p2p and goff == net.num_addresses - 1:
            raise E.make(E.INVALID_GATEWAY, f"gateway {gw} is the broadcast address of {net}; use a host address",
                         gateway=str(gw), cidr=str(net))
        if goff < window:
            blocked.append(Blocked(goff, goff, "the gateway"))
    res: list[IPAddress] = []
    for text in reserved:
        a = parse_address(text, "reserved address")
        if a.version != net.version or a not in net:
            raise E.make(E.INVALID_REQUEST, f"reserved address {a} is outside the subnet {net}; list only "
                         "addresses of the pool", address=str(a), cidr=str(net))
        res.append(a)
        off = int(a) - int(net.network_address)
        if off < window:
            blocked.append(Blocked(off, off, "a reserved address"))
    exc: list[IPNetwork] = []
    for text in excluded:
        child = parse_network(text, "excluded subnet")
        if not subnet_of(child, net):
            raise E.make(E.INVALID_CIDR, f"excluded subnet {child} is not inside the pool's subnet {net}",
                         cidr=str(child), pool=str(net))
        exc.append(child)
        s = int(child.network_address) - int(net.network_address)
        e = min(s + child.num_addresses - 1, window - 1)
        if s < window:
            blocked.append(Blocked(s, e, f"inside the excluded subnet {child}"))
    blocked.sort(key=lambda b: (b.start, b.end))
    ranges = merge_ranges((b.start, b.end) for b in blocked)
    capacity = window - sum(e - s + 1 for s, e in ranges)
    if capacity <= 0:
        raise E.make(E.INVALID_CIDR, f"the pool {net} of network {network_id} has no assignable address left "
                     "after the network, broadcast, gateway, reserved and excluded addresses; use a larger "
                     "subnet", cidr=str(net), network_id=network_id)
    return PoolLayout(network_id=network_id, network=net, gateway=gw, reserved=tuple(res), excluded=tuple(exc),
                      window=window, blocked=tuple(blocked), ranges=tuple(ranges), capacity=capacity,
                      block=block, _starts=tuple(r[0] for r in ranges))


# --- errors every implementation reports alike ------------------------------------------

def exhausted_error(layout: PoolLayout, used: int) -> E.VNetError:
    extra = (f" (the first {layout.window} addresses of the subnet are managed)" if layout.truncated else "")
    return E.make(E.POOL_EXHAUSTED,
                  f"{layout.describe()} is exhausted: all {layout.capacity} assignable addresses are allocated"
                  f"{extra}; release addresses (`vnetctl ipam gc` collects leaked ones) or give the network a "
                  "larger subnet", network_id=layout.network_id, family=layout.family, cidr=layout.cidr,
                  capacity=layout.capacity, used=used)


def in_use_error(layout: PoolLayout, offset: int, holder: str, allocated_at: float | None = None) -> E.VNetError:
    addr = layout.address_at(offset)
    return E.make(E.ADDRESS_IN_USE,
                  f"{addr} in {layout.describe()} is already allocated to {holder}; release it first "
                  "(`vnetctl ipam release`) or ask for another address",
                  address=str(addr), holder=holder, network_id=layout.network_id, family=layout.family,
                  allocated_at=allocated_at)


def owner_has_other_error(layout: PoolLayout, owner: str, held: int, wanted: int) -> E.VNetError:
    return E.make(E.CONFLICT,
                  f"{owner} already holds {layout.address_at(held)} in {layout.describe()} and asked for "
                  f"{layout.address_at(wanted)}; an owner holds one address per pool: release it first",
                  owner=owner, held=str(layout.address_at(held)), requested=str(layout.address_at(wanted)),
                  network_id=layout.network_id, family=layout.family)


# --- bit helpers (Redis bit order) ------------------------------------------------------

def get_bit(bits: bytes | bytearray, i: int) -> bool:
    j = i >> 3
    return j < len(bits) and bool(bits[j] & (0x80 >> (i & 7)))


def set_bit(bits: bytearray, i: int, value: bool = True) -> None:
    j = i >> 3
    if j >= len(bits):
        bits.extend(b"\0" * (j + 1 - len(bits)))
    if value:
        bits[j] |= 0x80 >> (i & 7)
    else:
        bits[j] &= ~(0x80 >> (i & 7)) & 0xFF


def set_range(bits: bytearray, s: int, e: int) -> None:
    """Set bits s..e inclusive."""
    i = s
    while i <= e and i & 7:
        set_bit(bits, i)
        i += 1
    full = (e + 1 - i) >> 3
    if full > 0:
        j = i >> 3
        if j + full > len(bits):
            bits.extend(b"\0" * (j + full - len(bits)))
        bits[j:j + full] = b"\xff" * full
        i += full * 8
    while i <= e:
        set_bit(bits, i)
        i += 1


def count_bits(bits: bytes | bytearray, s: int, e: int) -> int:
    """Set bits in s..e inclusive."""
    n = 0
    i = s
    while i <= e and i & 7:
        n += get_bit(bits, i)
        i += 1
    j, k = i >> 3, (e + 1) >> 3
    if k > j:
        n += int.from_bytes(bytes(bits[j:k]).ljust(k - j, b"\0"), "big").bit_count()
        i = k << 3
    while i <= e:
        n += get_bit(bits, i)
        i += 1
    return n


def set_offsets(bits: bytes | bytearray, window: int) -> list[int]:
    """Every set bit below ``window`` (cost proportional to set bits + bytes)."""
    out: list[int] = []
    for j, byte in enumerate(bits[: (window + 7) // 8]):
        if byte:
            for k in range(8):
                if byte & (0x80 >> k) and (j << 3) + k < window:
                    out.append((j << 3) + k)
    return out


# --- serial next-free ------------------------------------------------------------------

def next_free(layout: PoolLayout, taken: Mapping[int, Any] | set[int], cursor: int) -> int | None:
    """The first offset after ``cursor`` (wrapping) that is neither blocked nor taken.

    The reference for the Lua script: a plain scan, fine for a model, never for the store.
    """
    n = layout.window
    for k in range(n):
        off = (cursor + 1 + k) % n
        if off not in taken and not layout.is_blocked(off):
            return off
    return None


@dataclass
class PoolModel:
    """An in-memory pool with the exact semantics of the Redis store (the tests' oracle)."""

    layout: PoolLayout
    holders: dict[int, str] = field(default_factory=dict)  # offset -> owner
    owners: dict[str, int] = field(default_factory=dict)  # owner -> offset
    cursor: int = -1  # the last offset handed out dynamically (-1: none yet)
    high: int = -1  # the highest offset ever handed out: one above it is a first use
    first_use: bool = False  # whether the last new allocation was one

    @property
    def used(self) -> int:
        return len(self.owners)

    @property
    def free(self) -> int:
        return self.layout.capacity - self.used

    def allocate(self, owner: str) -> int:
        """A dynamic allocation (the owner's existing address when it already has one)."""
        if owner in self.owners:
            return self.owners[owner]
        off = next_free(self.layout, self.holders, self.cursor)
        if off is None:
            raise exhausted_error(self.layout, self.used)
        self.cursor = off
        self._take(owner, off)
        return off

    def allocate_static(self, owner: str, address: str) -> int:
        off = self.layout.static_offset(address)
        held = self.owners.get(owner)
        if held is not None:
            if held == off:
                return off
            raise owner_has_other_error(self.layout, owner, held, off)
        holder = self.holders.get(off)
        if holder is not None:
            raise in_use_error(self.layout, off, holder)
        self._take(owner, off)
        return off

    def release(self, owner: str) -> int | None:
        off = self.owners.pop(owner, None)
        if off is not None:
            del self.holders[off]
        return off

    def _take(self, owner: str, off: int) -> None:
        self.holders[off] = owner
        self.owners[owner] = off
        self.first_use = off > self.high
        self.high = max(self.high, off)

    def bitmap(self) -> bytearray:
        bits = self.layout.blocked_bitmap()
        for off in self.holders:
            set_bit(bits, off)
        return bits


# --- consistency check -----------------------------------------------------------------

@dataclass(frozen=True)
class Problem:
    """One inconsistency found by :func:`check_pool`."""

    kind: str  # bit_without_owner | owner_without_bit | holder_mismatch | blocked_bit_clear |
    #            blocked_allocated | used_mismatch | summary_wrong | outside_window | bad_record
    message: str
    offset: int | None = None
    owner: str | None = None


def expected_summary(layout: PoolLayout, bits: bytes | bytearray) -> bytearray:
    """One bit per block, set when every offset of the block is taken."""
    blk = layout.block
    out = bytearray((layout.nblocks + 7) // 8)
    full_block = b"\xff" * (blk // 8)
    for b in range(layout.nblocks):
        s = b * blk
        size = layout.block_size(b)
        if size == blk:
            full = bytes(bits[s >> 3:(s >> 3) + blk // 8]) == full_block
        else:
            full = count_bits(bits, s, s + size - 1) == size
        if full:
            set_bit(out, b)
    return out


def check_pool(layout: PoolLayout, bits: bytes, summary: bytes, owners: Mapping[str, int],
               holders: Mapping[int, str], used: int, *, limit: int = 1000) -> list[Problem]:
    """Every inconsistency between a pool's bitmap, summary, records and counter.

    ``owners`` is owner -> offset, ``holders`` offset -> owner (the two record hashes).
    At most ``limit`` problems of each kind are itemised (a count problem says how many more).
    """
    problems: list[Problem] = []
    counts: dict[str, int] = {}

    def add(kind: str, message: str, offset: int | None = None, owner: str | None = None) -> None:
        counts[kind] = counts.get(kind, 0) + 1
        if counts[kind] <= limit:
            problems.append(Problem(kind, message, offset, owner))

    def addr(off: int) -> str:
        return str(layout.address_at(off)) if 0 <= off < layout.window else f"offset {off}"

    for owner, off in owners.items():
        if not 0 <= off < layout.window:
            add("outside_window", f"{owner} holds offset {off}, outside the pool's window of {layout.window}",
                off, owner)
            continue
        if layout.is_blocked(off):
            add("blocked_allocated", f"{owner} holds {addr(off)}, which is {layout.blocked_reason(off)}", off, owner)
        if not get_bit(bits, off):
            add("owner_without_bit", f"{owner} holds {addr(off)} but its bit is clear: it could be handed out "
                "again", off, owner)
        if holders.get(off) != owner:
            add("holder_mismatch", f"{owner} holds {addr(off)} but the address records "
                f"{holders.get(off) or 'no holder'}", off, owner)
    for off, holder in holders.items():
        if owners.get(holder) != off:
            add("holder_mismatch", f"{addr(off)} is recorded as held by {holder}, who holds "
                f"{addr(owners[holder]) if holder in owners else 'nothing'}", off, holder)
    expected = layout.blocked_bitmap()
    for off in owners.values():
        if 0 <= off < layout.window:
            set_bit(expected, off)
    actual = bytes(bits).ljust(len(expected), b"\0")
    for c in range(0, len(expected), _CHUNK):
        if actual[c:c + _CHUNK] == expected[c:c + _CHUNK]:
            continue
        for j in range(c, min(c + _CHUNK, len(expected))):
            diff = actual[j] ^ expected[j]
            if not diff:
                continue
            for k in range(8):
                if not diff & (0x80 >> k):
                    continue
                off = (j << 3) + k
                if off >= layout.window:
                    continue
                if actual[j] & (0x80 >> k):
                    add("bit_without_owner", f"{addr(off)} is marked taken but nobody holds it: it leaks until "
                        "repaired", off)
                elif layout.is_blocked(off):
                    add("blocked_bit_clear", f"{addr(off)} is {layout.blocked_reason(off)} but its bit is clear: "
                        "it could be handed out", off)
                # an owner without a bit was reported above
    if any(actual[len(expected):]):
        add("outside_window", "bits beyond the pool's window are set")
    if used != len(owners):
        add("used_mismatch", f"the used counter says {used} but {len(owners)} addresses have owners")
    exp_sum = expected_summary(layout, bits)
    for b in range(layout.nblocks):
        if get_bit(summary, b) != get_bit(exp_sum, b):
            first = addr(b * layout.block)
            state = "full" if get_bit(exp_sum, b) else "not full"
            add("summary_wrong", f"the summary bit of the block starting at {first} is "
                f"{'set' if get_bit(summary, b) else 'clear'} but the block is {state}", b * layout.block)
    for kind, n in counts.items():
        if n > limit:
            problems.append(Problem(kind, f"... and {n - limit} more {kind} problems"))
    return problems
