"""A namespace's netlink socket (``NlSocket``) serves one request at a time whatever the
thread: requests from two threads on one socket must not interleave (each skipped the
other's replies as stale, and one waited for its own until the socket's timeout). A
namespace's name is checked once per reconcile pass (``NsContext.one_pass``), and inside a
pass the pass's thread makes a new namespace's socket itself. Namespaces come from the
``netns`` fixture (per-run prefix, removed at the end)."""

from __future__ import annotations

import errno
import os
import subprocess
import threading
from collections.abc import Callable
from typing import TypeVar

import pytest
from pyroute2.netlink.rtnl import RTM_GETADDR, RTM_GETLINK, RTM_NEWLINK

from tests.conftest import requires_root
from vnet.adapters.netlink.nsctx import NsContext, ifaddrmsg, ifinfomsg
from vnet.adapters.netlink.observe import parse_link

pytestmark = [pytest.mark.netns, requires_root]
T = TypeVar("T")


def test_a_namespace_socket_serves_two_threads_one_request_at_a_time(netns: Callable[[str], str]) -> None:
    """Two threads dumping links and one addresses, 300 times each, on one socket."""
    c = netns("rf")
    ctx = NsContext(max_entries=4)
    try:
        sock = ctx.sock(c)
        sock.sock.settimeout(2.0)  # a lost reply fails this test in seconds, not 30
        errors: list[BaseException] = []

        def hammer(kind: int) -> None:
            try:
                for _ in range(300):
                    if kind == RTM_GETLINK:
                        assert sock.dump(RTM_GETLINK, ifinfomsg(), "dump links")
                    else:
                        sock.dump(RTM_GETADDR, ifaddrmsg(), "dump addresses")
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=hammer, args=(k,)) for k in (RTM_GETLINK, RTM_GETADDR, RTM_GETLINK)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors[:3]
    finally:
        ctx.close()


def test_a_namespace_name_is_checked_once_per_pass_and_on_the_passes_thread_only(
        netns: Callable[[str], str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside ``one_pass`` a namespace's name is checked at its first access only (an attach's
    reconcile reached its namespace ~15 times, each a ``stat``); outside it, and on any other
    thread, at every access; a namespace made again under its name is found after the pass."""
    from vnet.adapters.netlink import nsctx

    c = netns("op")
    checks: list[str] = []
    real = nsctx._ns_ino

    def counting(path: str) -> tuple[int, int]:
        if path == f"/run/netns/{c}":  # not the namespace worker's check of its own home
            checks.append(path)
        return real(path)

    monkeypatch.setattr(nsctx, "_ns_ino", counting)
    ctx = NsContext(max_entries=4)
    try:
        first = ctx.sock(c)  # opened (no check: it was just opened)
        for _ in range(3):
            assert ctx.sock(c) is first
        assert len(checks) == 3, checks  # outside a pass: every access
        checks.clear()
        with ctx.one_pass():
            for _ in range(10):
                assert ctx.sock(c) is first
            assert len(checks) == 1, checks
            with ctx.one_pass():  # nested: the same pass
                ctx.sock(c)
            assert len(checks) == 1, checks
            other: list[int] = []

            def elsewhere() -> None:  # another thread is not in this pass
                n = len(checks)
                ctx.sock(c)
                ctx.sock(c)
                other.append(len(checks) - n)

            t = threading.Thread(target=elsewhere)
            t.start()
            t.join(30)
            assert other == [2], other
            # made again under its name: this pass keeps the instance it checked
            subprocess.run(["ip", "netns", "del", c], check=True)
            subprocess.run(["ip", "netns", "add", c], check=True)
            assert ctx.sock(c) is first
        opened = ctx.sockets_opened
        fresh = ctx.sock(c)  # after the pass: checked, found replaced, opened anew
        assert fresh is not first and ctx.sockets_opened == opened + 1
        assert fresh.dump(RTM_GETLINK, ifinfomsg(), "dump links")
    finally:
        ctx.close()


def _on_a_thread(fn: Callable[[], T]) -> T:
    """``fn()`` on a thread of its own (as the node's kernel thread runs a pass); its result."""
    out: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    if errors:
        raise errors[0]
    return out[0]


def test_inside_a_pass_the_thread_makes_a_new_namespace_socket_itself_and_comes_home(
        netns: Callable[[str], str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside a pass the namespace worker makes a namespace's socket; inside one, the pass's
    thread does (``setns`` there and back), and is home again after; a thread that could not
    come back refuses to try again, and the worker makes its sockets from then on."""
    from vnet.adapters.netlink import nsctx

    a, b, c, d = netns("oa"), netns("ob"), netns("oc"), netns("od")
    home = os.stat("/proc/self/ns/net").st_ino
    ctx = NsContext(max_entries=8)
    made_by_worker: list[str] = []
    real_run = ctx.worker.run

    def run(ns: nsctx.Netns, fn: Callable[[], T]) -> T:
        made_by_worker.append(ns.path)
        return real_run(ns, fn)

    monkeypatch.setattr(ctx.worker, "run", run)

    def names(ref: str) -> list[str]:
        return sorted(parse_link(m).name for t, m in ctx.sock(ref).dump(RTM_GETLINK, ifinfomsg(), "links")
                      if t == RTM_NEWLINK)

    try:
        ctx.sock(a)
        assert made_by_worker == [f"/run/netns/{a}"]

        def pass_b() -> int:
            with ctx.one_pass():
                ctx.sock(b)
            return os.stat("/proc/thread-self/ns/net").st_ino

        assert _on_a_thread(pass_b) == home  # the thread is home after
        assert made_by_worker == [f"/run/netns/{a}"]  # b's socket was made by the pass's thread
        subprocess.run(["ip", "-n", b, "link", "add", "ob-marker", "type", "bridge"], check=True)
        assert names(b) == ["lo", "ob-marker"]  # and it lives in b

        real_setns = nsctx._setns
        calls: list[int] = []

        def back_fails(fd: int) -> None:
            calls.append(fd)
            if len(calls) == 2:  # the way home
                raise OSError(errno.EPERM, "refused by the test")
            real_setns(fd)

        def pass_c_then_d() -> tuple[str, int]:
            with ctx.one_pass():
                with pytest.raises(RuntimeError, match="could not return") as info:
                    ctx.sock(c)
                monkeypatch.setattr(nsctx, "_setns", real_setns)
                ctx.sock(d)  # this thread is stuck in c now: the worker makes d's socket
            return str(info.value), os.stat("/proc/thread-self/ns/net").st_ino

        monkeypatch.setattr(nsctx, "_setns", back_fails)
        message, where = _on_a_thread(pass_c_then_d)
        assert c in message and where == os.stat(f"/run/netns/{c}").st_ino
        assert made_by_worker == [f"/run/netns/{a}", f"/run/netns/{d}"]
        subprocess.run(["ip", "-n", d, "link", "add", "od-marker", "type", "bridge"], check=True)
        assert names(d) == ["lo", "od-marker"]
        assert os.stat("/proc/thread-self/ns/net").st_ino == home  # this thread never moved
    finally:
        ctx.close()
