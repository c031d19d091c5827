"""A namespace's netlink socket (``NlSocket``) serves one request at a time whatever the
thread: requests from two threads on one socket must not interleave (each skipped the
other's replies as stale, and one waited for its own until the socket's timeout).
Namespaces come from the ``netns`` fixture (per-run prefix, removed at the end)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from pyroute2.netlink.rtnl import RTM_GETADDR, RTM_GETLINK

from tests.conftest import requires_root
from vnet.adapters.netlink.nsctx import NsContext, ifaddrmsg, ifinfomsg

pytestmark = [pytest.mark.netns, requires_root]


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
