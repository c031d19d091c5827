"""The nfnetlink element encoder writes the bytes nft writes (pure; the kernel's side is
``tests/netns/test_nft_deltas.py``)."""

from __future__ import annotations

import struct

import pytest

from vnet.adapters import nfnl
from vnet.core.nft import SetDecl


def words(text: str) -> bytes:
    """Data as ``nft --debug=netlink`` prints it: 32-bit words in host order."""
    return b"".join(struct.pack("=I", int(w, 16)) for w in text.split())


def decl(family: str, name: str, key: tuple[str, ...], value: tuple[str, ...] | None = None,
         interval: bool = False) -> SetDecl:
    return SetDecl(family, name, key, value, interval, [])


def attrs(buf: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    pos = 0
    while pos + 4 <= len(buf):
        length, atype = struct.unpack_from("=HH", buf, pos)
        out[atype & 0x3FFF] = buf[pos + 4:pos + length]
        pos += (length + 3) & ~3
    return out


def key_and_data(elem: bytes) -> tuple[bytes, bytes | None]:
    """(key value, data attribute or None) of one NFTA_LIST_ELEM."""
    (inner,) = attrs(elem).values()
    a = attrs(inner)
    return attrs(a[nfnl.NFTA_SET_ELEM_KEY])[nfnl.NFTA_DATA_VALUE], a.get(nfnl.NFTA_SET_ELEM_DATA)


# Printed by nft 1.0.6 for the same elements, `nft --debug=netlink add element ...`
def test_a_concatenated_key_is_each_component_padded_to_four_bytes() -> None:
    d = decl("bridge", "ip4_bind", ("ifname", "ether_addr", "ipv4_addr"))
    key, data = key_and_data(nfnl.element(d, "vne1 . 02:00:00:00:00:01 . 10.0.0.1"))
    assert key == words("31656e76 00000000 00000000 00000000 00000002 00000100 0100000a")
    assert data is None


def test_a_single_component_key_is_the_type_itself() -> None:
    key, _ = key_and_data(nfnl.element(decl("bridge", "full_ports", ("ifname",)), "vne1"))
    assert key == words("31656e76 00000000 00000000 00000000")
    key, _ = key_and_data(nfnl.element(decl("inet", "e4_x", ("ipv4_addr",)), "10.142.1.45"))
    assert key == bytes([10, 142, 1, 45])
    key, _ = key_and_data(nfnl.element(decl("inet", "e6_x", ("ipv6_addr",)), "fd00::1"))
    assert key == bytes.fromhex("fd00" + "0" * 26 + "01")


def test_a_map_value_and_a_verdict() -> None:
    pub = decl("inet", "published4", ("inet_proto", "inet_service"), ("ipv4_addr", "inet_service"))
    key, data = key_and_data(nfnl.element(pub, "tcp . 8080 : 10.0.0.1 . 80"))
    assert key == words("00000006 0000901f")
    assert data is not None and attrs(data)[nfnl.NFTA_DATA_VALUE] == words("0100000a 00005000")
    # a deletion names the key only
    assert key_and_data(nfnl.element(pub, "tcp . 8080 : 10.0.0.1 . 80", key_only=True))[1] is None
    pairs = decl("inet", "net_pairs", ("ifname", "ifname"), ("verdict",))
    key, data = key_and_data(nfnl.element(pairs, "a . b : accept"))
    assert key == words("00000061 00000000 00000000 00000000 00000062 00000000 00000000 00000000")
    assert data is not None
    verdict = attrs(attrs(data)[nfnl.NFTA_DATA_VERDICT])
    assert verdict == {nfnl.NFTA_VERDICT_CODE: struct.pack(">i", 1)}  # NF_ACCEPT
    jump = attrs(attrs(key_and_data(nfnl.element(pairs, "a . b : jump c1"))[1] or b"")[nfnl.NFTA_DATA_VERDICT])
    assert jump == {nfnl.NFTA_VERDICT_CODE: struct.pack(">i", -3), nfnl.NFTA_VERDICT_CHAIN: b"c1\0"}


@pytest.mark.parametrize(("d", "elem"), [
    (decl("inet", "ports", ("inet_proto", "inet_service"), ("verdict",), interval=True), "tcp . 80 : accept"),
    (decl("inet", "e4", ("ipv4_addr",)), "10.0.0.0/24"),  # a prefix: an interval's
    (decl("inet", "marks", ("mark",)), "0x1"),
    (decl("bridge", "full_ports", ("ifname",)), "vnb-*"),  # a wildcard name
    (decl("bridge", "full_ports", ("ifname",)), "x" * 16),  # longer than IFNAMSIZ - 1
    (decl("bridge", "mac_bind", ("ifname", "ether_addr")), "vne1"),  # a component missing
    (decl("inet", "net_pairs", ("ifname", "ifname"), ("verdict",)), "a . b : queue"),
    (decl("inet", "pub", ("inet_proto", "inet_service")), "tcp . 70000"),
])
def test_what_it_does_not_encode_is_refused_so_libnftables_writes_it(d: SetDecl, elem: str) -> None:
    with pytest.raises(nfnl.Unsupported):
        nfnl.element_batch({(d.family, d.name): (frozenset(), frozenset({elem}))}, {(d.family, d.name): d})


def test_a_batch_deletes_first_in_the_order_of_the_sets_and_skips_sets_unchanged() -> None:
    a, b, c = (decl("inet", "e4_a", ("ipv4_addr",)), decl("inet", "e4_b", ("ipv4_addr",)),
               decl("bridge", "full_ports", ("ifname",)))
    meta = {("inet", "e4_a"): a, ("inet", "e4_b"): b, ("bridge", "full_ports"): c}
    changes = {("bridge", "full_ports"): (frozenset(), frozenset({"vne2", "vne1"})),
               ("inet", "e4_a"): (frozenset({"10.0.0.1"}), frozenset({"10.0.0.2"}))}
    msgs = nfnl.element_batch(changes, meta)
    kinds = [(t & 0xFF, body[0], attrs(body[4:])[nfnl.NFTA_SET_ELEM_LIST_SET]) for t, _f, body in msgs]
    assert kinds == [(nfnl.NFT_MSG_DELSETELEM, 1, b"e4_a\0"), (nfnl.NFT_MSG_NEWSETELEM, 1, b"e4_a\0"),
                     (nfnl.NFT_MSG_NEWSETELEM, 7, b"full_ports\0")]  # NFPROTO_INET, NFPROTO_BRIDGE
    assert all(t >> 8 == nfnl.NFNL_SUBSYS_NFTABLES for t, _f, _b in msgs)
    assert [f & nfnl.NLM_F_CREATE for _t, f, _b in msgs] == [0, nfnl.NLM_F_CREATE, nfnl.NLM_F_CREATE]
    elems = attrs(msgs[2][2][4:])[nfnl.NFTA_SET_ELEM_LIST_ELEMENTS]
    pos, names = 0, []
    while pos < len(elems):
        (length,) = struct.unpack_from("=H", elems, pos)
        names.append(key_and_data(elems[pos:pos + length])[0].rstrip(b"\0"))
        pos += (length + 3) & ~3
    assert names == [b"vne1", b"vne2"]  # sorted
    assert nfnl.element_batch({}, meta) == []


def test_a_delta_too_large_for_one_batch_goes_to_libnftables() -> None:
    d = decl("inet", "e4_a", ("ipv4_addr",))
    many = frozenset(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(20000))
    with pytest.raises(nfnl.Unsupported):
        nfnl.element_batch({("inet", "e4_a"): (frozenset(), many)}, {("inet", "e4_a"): d})
