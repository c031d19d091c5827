"""Set and map element deltas written to the kernel as one nfnetlink batch.

::

    sock = NfnlSocket.open(ns, worker)            # NETLINK_NETFILTER, in namespace ``ns``
    msgs = element_batch(changes, meta)           # Unsupported: a type this encoder does not know
    sock.send(msgs)                               # one transaction; NfnlError: nothing changed

Why not libnftables for these: an attach's delta is five ``add element`` lines, and
libnftables spends most of its call parsing them and filling its cache of our tables from
the kernel before it writes (``bench_attach_nft``: 0.33-0.51 ms per attach's delta, growing
with the table, against 0.03-0.04 ms here; in the whole stack its call was 0.53 ms of an
attach, run on a namespace thread beside the attach's netlink work). The batch here is
what nft itself sends for those lines (``nft --debug=netlink`` prints the same element
bytes; ``tests/unit/test_nfnl.py`` holds them): ``NFT_MSG_DELSETELEM`` then
``NFT_MSG_NEWSETELEM`` messages between ``NFNL_MSG_BATCH_BEGIN`` and ``NFNL_MSG_BATCH_END``,
which the kernel applies as one transaction (any refusal aborts all of it).

Only what the element path writes is encoded: exact elements (no interval sets: their
ranges are libnftables' job) of the types of our tables (``ifname``, ``ether_addr``,
``ipv4_addr``, ``ipv6_addr``, ``inet_proto``, ``inet_service`` and concatenations of them;
verdicts as map values). Anything else raises :class:`Unsupported`, and the caller writes
that delta through libnftables. Whole rulesets and every read stay with libnftables.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Mapping
from typing import Protocol

from vnet.adapters.netlink.nsctx import Netns, NsWorker, check_socket_netns, ext_ack_message, nla, nla_str

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN = 0x10
NFNL_MSG_BATCH_END = 0x11
NFT_MSG_NEWSETELEM = 12
NFT_MSG_DELSETELEM = 14
NFTA_SET_ELEM_LIST_TABLE = 1
NFTA_SET_ELEM_LIST_SET = 2
NFTA_SET_ELEM_LIST_ELEMENTS = 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY = 1
NFTA_SET_ELEM_DATA = 2
NFTA_DATA_VALUE = 1
NFTA_DATA_VERDICT = 2
NFTA_VERDICT_CODE = 1
NFTA_VERDICT_CHAIN = 2
NLA_F_NESTED = 0x8000
NLM_F_REQUEST = 0x01
NLM_F_ACK = 0x04
NLM_F_CREATE = 0x400
NLMSG_ERROR = 2
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
FAMILIES = {"ip": socket.AF_INET, "ip6": socket.AF_INET6, "inet": 1, "bridge": socket.AF_BRIDGE, "arp": 3,
            "netdev": 5}
VERDICTS = {"drop": 0, "accept": 1, "continue": -1, "return": -5}
JUMPS = {"jump": -3, "goto": -4}
PROTOS = {"icmp": 1, "igmp": 2, "tcp": 6, "udp": 17, "dccp": 33, "ipv6-icmp": 58, "icmpv6": 58, "sctp": 132,
          "udplite": 136}
IFNAMSIZ = 16
BATCH_MAX = 1 << 16  # a delta larger than this (a resync's, not an attach's) goes through libnftables

_HDR = struct.Struct("=IHHII")
_NFGEN = struct.Struct("=BBH")  # family, version, res_id (big-endian: packed by hand)
_MAX_ELEMENTS = 512  # per message: ~20-50 KiB, well inside one netlink message


class Unsupported(ValueError):
    """An element of a type (or a set kind) this encoder does not write."""


class NfnlError(OSError):
    """The kernel refused the batch (nothing of it was applied): ``errno`` and its message."""


class SetMeta(Protocol):
    """What the encoder needs of a set's declaration (``vnet.core.nft.SetDecl``)."""

    @property
    def family(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def key(self) -> tuple[str, ...]: ...
    @property
    def value(self) -> tuple[str, ...] | None: ...
    @property
    def interval(self) -> bool: ...


def _field(kind: str, text: str) -> bytes:
    """One component's bytes as nft writes them (unpadded)."""
    try:
        if kind == "ifname":
            raw = text.encode()
            if not raw or len(raw) >= IFNAMSIZ or b"\0" in raw or text.endswith("*"):
                raise Unsupported(f"interface name {text!r}")
            return raw.ljust(IFNAMSIZ, b"\0")
        if kind == "ether_addr":
            mac = bytes.fromhex(text.replace(":", ""))
            if len(mac) != 6:
                raise Unsupported(f"MAC address {text!r}")
            return mac
        if kind == "ipv4_addr":
            return ipaddress.IPv4Address(text).packed
        if kind == "ipv6_addr":
            return ipaddress.IPv6Address(text).packed
        if kind == "inet_proto":
            n = int(text) if text.isdigit() else PROTOS[text]
            if not 0 <= n <= 255:
                raise Unsupported(f"protocol {text!r}")
            return bytes([n])
        if kind == "inet_service":
            return int(text).to_bytes(2, "big")
    except (ValueError, KeyError, OverflowError) as exc:
        if isinstance(exc, Unsupported):
            raise
        raise Unsupported(f"{kind} {text!r}: {exc}") from None
    raise Unsupported(f"type {kind}")


def data_value(types: tuple[str, ...], text: str) -> bytes:
    """A key or a map value: one component as it is, a concatenation with each component
    padded to 4 bytes (the kernel's register layout)."""
    parts = text.split(" . ")
    if len(parts) != len(types):
        raise Unsupported(f"{text!r} does not have the {len(types)} components of {' . '.join(types)}")
    if len(types) == 1:
        return _field(types[0], parts[0])
    out = b""
    for kind, part in zip(types, parts, strict=True):
        f = _field(kind, part)
        out += f + b"\0" * (-len(f) % 4)
    return out


def _verdict(text: str) -> bytes:
    word, _, chain = text.partition(" ")
    if word in VERDICTS and not chain:
        return nla(NFTA_VERDICT_CODE, struct.pack(">i", VERDICTS[word]))
    if word in JUMPS and chain and " " not in chain:
        return nla(NFTA_VERDICT_CODE, struct.pack(">i", JUMPS[word])) + nla_str(NFTA_VERDICT_CHAIN, chain)
    raise Unsupported(f"verdict {text!r}")


def _nest(atype: int, payload: bytes) -> bytes:
    return nla(atype | NLA_F_NESTED, payload)


def element(meta: SetMeta, canonical: str, *, key_only: bool = False) -> bytes:
    """One ``NFTA_LIST_ELEM``: the key (and the map value unless ``key_only``) of an element
    in the canonical form of :func:`vnet.core.nft.canon` (``a . b`` or ``a . b : v``)."""
    key, sep, val = canonical.partition(" : ")
    body = _nest(NFTA_SET_ELEM_KEY, nla(NFTA_DATA_VALUE, data_value(meta.key, key)))
    if meta.value is not None and not key_only:
        if not sep:
            raise Unsupported(f"map element {canonical!r} has no value")
        if meta.value == ("verdict",):
            body += _nest(NFTA_SET_ELEM_DATA, _nest(NFTA_DATA_VERDICT, _verdict(val)))
        else:
            body += _nest(NFTA_SET_ELEM_DATA, nla(NFTA_DATA_VALUE, data_value(meta.value, val)))
    elif meta.value is None and sep:
        raise Unsupported(f"set element {canonical!r} has a value")
    return _nest(NFTA_LIST_ELEM, body)


def _nfgen(family: int, res_id: int = 0) -> bytes:
    return _NFGEN.pack(family, 0, socket.htons(res_id))


Message = tuple[int, int, bytes]  # (type, flags, body after the netlink header)


def element_batch(changes: Mapping[tuple[str, str], tuple[frozenset[str], frozenset[str]]],
                  meta: Mapping[tuple[str, str], SetMeta], table: str = "vnet") -> list[Message]:
    """The element messages of one transaction taking each set ``(family, name)`` from
    removing ``changes[key][0]`` to adding ``changes[key][1]``: every deletion first (an
    element whose map value changes is replaced in the same transaction), sets in the order
    of ``meta``, elements sorted (the order of :func:`vnet.core.nft.delta`'s script).
    Raises :class:`Unsupported` when any element cannot be encoded (write it all with
    libnftables then: a transaction is never split between the two)."""
    dels: list[Message] = []
    adds: list[Message] = []
    size = 0
    for k, m in meta.items():
        if k not in changes:
            continue
        gone, new = changes[k]
        if not gone and not new:
            continue
        if m.interval:
            raise Unsupported(f"set {m.name} holds intervals")
        fam = FAMILIES.get(m.family)
        if fam is None:
            raise Unsupported(f"family {m.family}")
        head = _nfgen(fam) + nla_str(NFTA_SET_ELEM_LIST_TABLE, table) + nla_str(NFTA_SET_ELEM_LIST_SET, m.name)
        for items, kind, flags, out in ((gone, NFT_MSG_DELSETELEM, 0, dels),
                                        (new, NFT_MSG_NEWSETELEM, NLM_F_CREATE, adds)):
            ordered = sorted(items)
            for i in range(0, len(ordered), _MAX_ELEMENTS):
                elems = b"".join(element(m, c, key_only=kind == NFT_MSG_DELSETELEM)
                                 for c in ordered[i:i + _MAX_ELEMENTS])
                body = head + _nest(NFTA_SET_ELEM_LIST_ELEMENTS, elems)
                size += _HDR.size + len(body)
                if size > BATCH_MAX:
                    raise Unsupported(f"a delta of more than {BATCH_MAX} bytes")
                out.append(((NFNL_SUBSYS_NFTABLES << 8) | kind, flags, body))
    return dels + adds


class NfnlSocket:
    """A ``NETLINK_NETFILTER`` socket bound to one namespace; :meth:`send` writes a batch."""

    def __init__(self, sock: socket.socket, label: str, timeout: float = 20.0) -> None:
        self.sock = sock
        self.label = label
        self._seq = 0
        sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
        sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        sock.settimeout(timeout)
        sock.bind((0, 0))
        self.batches = 0

    @classmethod
    def open(cls, ns: Netns, worker: NsWorker, timeout: float = 20.0) -> NfnlSocket:
        """Made in ``ns`` by ``worker`` (a thread that enters it and comes back), checked to
        live there."""
        raw = worker.run(ns, lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                                   NETLINK_NETFILTER))
        try:
            check_socket_netns(raw, ns)
            return cls(raw, ns.path, timeout)
        except BaseException:
            raw.close()
            raise

    def _next(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
        return self._seq

    def send(self, msgs: list[Message]) -> None:
        """One transaction: every message between a batch begin and end, each acknowledged;
        :class:`NfnlError` with the kernel's first refusal (the kernel then applied none)."""
        if not msgs:
            return
        begin = self._next()
        parts = [_HDR.pack(_HDR.size + 4, NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, begin, 0)
                 + _nfgen(socket.AF_UNSPEC, NFNL_SUBSYS_NFTABLES)]
        waiting: set[int] = set()
        for mtype, flags, body in msgs:
            seq = self._next()
            waiting.add(seq)
            parts.append(_HDR.pack(_HDR.size + len(body), mtype, flags | NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body)
        end = self._next()
        parts.append(_HDR.pack(_HDR.size + 4, NFNL_MSG_BATCH_END, NLM_F_REQUEST, end, 0)
                     + _nfgen(socket.AF_UNSPEC, NFNL_SUBSYS_NFTABLES))
        self.sock.send(b"".join(parts))
        self.batches += 1
        first: NfnlError | None = None
        while waiting:
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                raise NfnlError(errno.ETIMEDOUT, f"no answer from nf_tables in {self.label}") from None
            off = 0
            while off + _HDR.size <= len(data):
                length, mtype, flags, seq, _pid = _HDR.unpack_from(data, off)
                if length < _HDR.size:
                    break
                if mtype == NLMSG_ERROR and (seq in waiting or seq in (begin, end)):
                    (code,) = struct.unpack_from("=i", data, off + _HDR.size)
                    if code and first is None:
                        msg = ext_ack_message(data, off, length, flags)
                        first = NfnlError(-code, os.strerror(-code) + (f": {msg}" if msg else ""))
                    waiting.discard(seq)
                    if seq in (begin, end):  # the batch itself was refused: nothing else comes
                        waiting.clear()
                off += (length + 3) & ~3
        if first is not None:
            raise first

    def close(self) -> None:
        self.sock.close()
