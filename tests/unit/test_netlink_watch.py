"""Decoding kernel notifications (vnet.adapters.netlink.watch) from hand-built messages, and
the drift monitor's decisions (which notifications are suspects, own commits ignored)."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
from types import SimpleNamespace
from typing import Any

import msgspec

from vnet.adapters.netlink.watch import (
    AddrChange,
    LinkChange,
    NftCommit,
    NftParser,
    describe,
    is_own_thread,
    parse_rtnl,
)


def nla(atype: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, atype) + payload + b"\0" * (-n % 4)


def msg(mtype: int, body: bytes, port: int = 0) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), mtype, 0, 0, port) + body


def nft(sub_msg: int, family: int, attrs: bytes, port: int) -> bytes:
    return msg((10 << 8) | sub_msg, struct.pack("=BBH", family, 0, 0) + attrs, port)


def test_link_and_address_notifications() -> None:
    link = msg(16, struct.pack("=BxHiII", 0, 1, 7, 0x1002, 0) + nla(3, b"vnb-abc\0") + nla(10, struct.pack("=I", 3)))
    gone = msg(17, struct.pack("=BxHiII", 0, 1, 8, 0x1043, 0) + nla(3, b"vne123\0"))
    addr = msg(21, struct.pack("=BBBBI", socket.AF_INET, 24, 0, 0, 7) + nla(2, socket.inet_aton("10.9.0.1"))
               + nla(3, b"vnb-abc\0"), port=4242)
    got = parse_rtnl(link + gone + addr)
    assert got == [LinkChange(name="vnb-abc", index=7, deleted=False, up=False, master=3, port=0),
                   LinkChange(name="vne123", index=8, deleted=True, up=True, master=0, port=0),
                   AddrChange(index=7, label="vnb-abc", address="10.9.0.1/24", deleted=True, port=4242)]


def test_a_bridge_notice_about_its_port_is_not_the_link_itself() -> None:
    """A port leaving its bridge comes as an AF_BRIDGE RTM_DELLINK of a link that still exists,
    beside the link's own RTM_NEWLINK without a master: only the latter is the link's state.
    The link's other attributes (statistics, per-family settings) are skipped, wherever the
    name and the master come among them."""
    port_left = msg(17, struct.pack("=BxHiII", socket.AF_BRIDGE, 1, 9, 0x1043, 0) + nla(3, b"vne9\0")
                    + nla(10, struct.pack("=I", 3)))
    own = msg(16, struct.pack("=BxHiII", 0, 1, 9, 0x1043, 0) + nla(23, b"\0" * 96) + nla(3, b"vne9\0")
              + nla(26, nla(2, b"\0" * 8)))
    assert parse_rtnl(port_left + own) == [LinkChange(name="vne9", index=9, deleted=False, up=True, master=0,
                                                      port=0)]


def test_an_nftables_transaction_is_one_commit_with_the_kernel_named_sender() -> None:
    p = NftParser()
    chain = nft(5, 1, nla(1, b"vnet\0") + nla(3, b"forward\0"), port=900)
    table = nft(2, 1, nla(1, b"vnet\0"), port=900)
    other = nft(0, 7, nla(1, b"filter\0"), port=900)
    assert p.feed(chain + table + other) == []  # nothing until the generation closes it
    gen = nft(15, 0, nla(1, struct.pack(">I", 5)) + nla(2, struct.pack(">I", 31337)) + nla(3, b"nft\0"), port=900)
    (c,) = p.feed(gen)
    assert isinstance(c, NftCommit)
    assert c.tables == {("inet", "vnet"), ("bridge", "filter")}
    assert c.changes == {"delete chain inet vnet": 1, "delete table inet vnet": 1, "add table bridge filter": 1}
    assert (c.pid, c.comm, c.port, c.generation) == (31337, "nft", 900, 5)
    # the next transaction starts empty
    (c2,) = p.feed(nft(12, 1, nla(1, b"vnet\0"), port=1) + gen)
    assert c2.tables == {("inet", "vnet")} and c2.changes == {"add element inet vnet": 1}


def test_own_threads_and_process_description() -> None:
    got: list[int] = []
    t = threading.Thread(target=lambda: got.append(threading.get_native_id()))
    t.start()
    t.join()
    assert is_own_thread(threading.get_native_id()) and is_own_thread(os.getpid())
    assert not is_own_thread(1) and not is_own_thread(0)
    me = describe(threading.get_native_id())
    assert me.pid == os.getpid() and me.cmdline  # a thread id maps to its process
    assert describe(2**22 + 12345, "nft").cmdline == ""  # gone: only what the kernel said


def _monitor() -> Any:
    from vnet.core.dataplane_model import EpDesired, NetDesired
    from vnet.core.model import DriverType
    from vnet.svc.node.drift import DriftMonitor

    net = NetDesired(id="n1", driver=DriverType.BRIDGE, gateway4="10.9.0.1/24")
    ep = EpDesired(id="e1", network_id="n1", netns="c1", ifname="eth0", mac="02:00:00:00:00:01",
                   ipv4="10.9.0.2/24")
    q: asyncio.Queue[Any] = asyncio.Queue()
    worker = SimpleNamespace(nets={"n1": net}, eps={"e1": ep}, peers=[], queue=q, node="n", policy=None,
                             rec=object(), counters=SimpleNamespace(reconciles=0, full_resyncs=2), host_netns=None,
                             _item=lambda **kw: SimpleNamespace(**kw))
    metrics = SimpleNamespace(listeners=[], drift=lambda kind, s: None)
    return DriftMonitor(worker, metrics=metrics), q, net, ep  # type: ignore[arg-type]


async def test_only_changes_to_what_is_desired_are_suspects() -> None:
    mon, q, net, ep = _monitor()
    br, veth = net.bridge_name(), ep.host_ifname()
    # our own create-then-up sequence: the last state is fine, nothing queued
    mon._on_changes([LinkChange(name=veth, index=5, deleted=False, up=False, master=0, port=0),
                     LinkChange(name=veth, index=5, deleted=False, up=True, master=2, port=0)])
    # something not desired (a stale interface we removed ourselves), and not ours at all
    mon._on_changes([LinkChange(name="vnb-stale", index=9, deleted=True, up=False, master=0, port=0),
                     LinkChange(name="eth0", index=1, deleted=True, up=False, master=0, port=0),
                     # a link-local address leaving with the link state is not ours to restore
                     AddrChange(index=2, label=br, address="fe80::1/64", deleted=True, port=0)])
    await asyncio.sleep(0.05)
    assert q.empty()
    mon._on_changes([LinkChange(name=br, index=2, deleted=False, up=False, master=0, port=0),
                     LinkChange(name=veth, index=5, deleted=True, up=True, master=2, port=0),
                     AddrChange(index=2, label=br, address="10.9.0.1/24", deleted=True, port=0)])
    item = await asyncio.wait_for(q.get(), 5)
    got = {(s.kind, s.target, s.owner) for s in item.drift}
    assert got == {("link_down", br, "n1"), ("link_deleted", veth, "e1"), ("address_removed", br, "n1")}
    assert q.empty()  # one burst, one work item


async def test_lost_notifications_check_the_whole_host() -> None:
    from vnet.adapters.netlink.watch import Overflow

    mon, q, _net, _ep = _monitor()
    mon._on_changes([Overflow(source="rtnetlink")])
    item = q.get_nowait()
    assert (item.kind, item.fetch) == ("resync", False)  # a full reconcile against the state it has


def test_a_receive_overflow_is_reported_not_raised() -> None:
    import errno

    from vnet.adapters.netlink.watch import NetlinkWatch, Overflow

    class Full:
        calls = 0

        def recv_into(self, buf: bytearray) -> int:
            self.calls += 1
            if self.calls == 1:
                raise OSError(errno.ENOBUFS, "No buffer space available")
            raise BlockingIOError

    got: list[Any] = []
    w = NetlinkWatch(None, got.extend)
    w._drain(Full(), "rtnetlink")  # type: ignore[arg-type]
    assert got == [Overflow(source="rtnetlink")] and w.overflows == 1


def test_a_resync_records_drift_only_on_a_host_that_had_converged() -> None:
    from vnet.core.dataplane_model import ReconcileResult

    mon, _q, _net, ep = _monitor()

    def result(writes: int, errors: int = 0) -> ReconcileResult:
        from vnet.core.dataplane_model import ReconcileError

        errs = [ReconcileError(owner="node", code="kernel", message="x")] * errors
        return ReconcileResult(ops_planned=writes, ops_applied=writes, writes=writes, endpoints={}, networks={},
                               duration=0.01, errors=errs)

    # an event's reconcile converged the host; the resync (same desired state) wrote 2: drift
    mon._after_reconcile(None, result(3))
    mon._after_reconcile(None, result(2))
    mon.note_resync(result(2), None)
    assert [(r.kind, r.writes) for r in mon.ring] == [("resync", 2)]
    # the resync's fetch brought an endpoint the events had not yet: catching up, not drift
    mon.w.eps = {**mon.w.eps, "e2": msgspec.structs.replace(ep, id="e2")}
    mon._after_reconcile(None, result(4))
    mon.note_resync(result(4), None)
    assert len(mon.ring) == 1
    # the reconcile before failed: the resync's writes are its retry, not drift
    mon._after_reconcile(None, result(0, errors=1))
    mon._after_reconcile(None, result(1))
    mon.note_resync(result(1), None)
    assert len(mon.ring) == 1


def test_a_veth_name_finds_its_endpoint_whatever_order_the_endpoints_came_in() -> None:
    """``_wanted`` hashes only endpoints it has not seen (the newest first); a dict rebuilt
    by a resync, an endpoint gone and many gone are answered right, and what it remembers
    stays bounded."""
    from vnet.core import naming
    from vnet.core.dataplane_model import EpDesired

    mon, _, _, ep = _monitor()
    eps = mon.w.eps

    def add(i: int) -> EpDesired:
        e = msgspec.structs.replace(ep, id=f"e{i}")
        eps[e.id] = e
        return e

    assert mon._wanted(ep.host_ifname()) == ("endpoint", "e1")
    for i in range(2, 40):  # one at a time, as attaches come: each found by the newest-first look
        assert mon._wanted(add(i).host_ifname()) == ("endpoint", f"e{i}")
    later = [add(i) for i in range(40, 60)]
    # a resync rebuilds the dict in another order: the unseen ones hide behind seen ones
    rebuilt = dict(sorted(eps.items(), key=lambda kv: kv[0], reverse=True))
    eps.clear()
    eps.update(rebuilt)
    for e in later:
        assert mon._wanted(e.host_ifname()) == ("endpoint", e.id)
    gone = eps.pop("e7")
    assert mon._wanted(gone.host_ifname()) is None  # a departed endpoint's veth is not wanted
    for i in range(2, 60):
        eps.pop(f"e{i}", None)
    for i in range(100, 300):  # churn: many come and go
        e = add(i)
        assert mon._wanted(e.host_ifname()) == ("endpoint", e.id)
        del eps[e.id]
    assert len(mon._veth_seen) <= 2 * len(eps) + 64 + 1 and len(mon._veth_owner) <= 2 * len(eps) + 64 + 1
    assert mon._wanted(naming.veth_name("never-attached")) is None  # ours by its look, no endpoint's
