"""A fresh container namespace read ahead of its attach (``Observer.prefetch``, called once
the node answered the namespace check) is used by the attach only while nothing in the
namespace changed since: a link, an address or a route made in between (by anyone, through
``ip`` here) makes the attach read it again, and so does a namespace deleted and made again
under its name. Namespaces come from the ``netns`` fixture (per-run prefix, removed at the end)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.conftest import requires_root
from tests.netns.conftest import ip
from tests.netns.test_bridge_dataplane import NET, assert_all_ready, endpoint
from vnet.adapters.netlink.nsctx import NsContext
from vnet.adapters.netlink.observe import Observer
from vnet.core.dataplane_model import NodeDesired, Scope
from vnet.svc.node.reconcile import Reconciler

pytestmark = [pytest.mark.netns, requires_root]


@pytest.fixture
def observer() -> Iterator[Observer]:
    ctx = NsContext(max_entries=16)
    obs = Observer(ctx, None)
    yield obs
    obs.drop_prefetched()
    ctx.close()


def test_an_unchanged_fresh_namespace_is_read_once(netns: Callable[[str], str], observer: Observer) -> None:
    c = netns("ra")
    observer.prefetch(c)
    before = observer.requests
    state = observer.container(c)
    assert observer.prefetch_used == 1 and observer.requests == before  # no dump for the attach
    assert set(state.links) == {"lo"}
    # used once: the next reading is the kernel's
    observer.container(c)
    assert observer.prefetch_used == 1 and observer.requests > before


@pytest.mark.parametrize("change", [
    ["link", "add", "vra0", "type", "veth", "peer", "name", "vra1"],
    ["addr", "add", "127.0.0.9/8", "dev", "lo"],
    ["route", "add", "10.99.0.0/16", "dev", "lo"],
    ["-6", "route", "add", "unreachable", "fd00:99::/64"],
])
def test_a_change_after_the_reading_makes_the_attach_read_again(netns: Callable[[str], str], observer: Observer,
                                                                change: list[str]) -> None:
    c = netns("rb")
    observer.prefetch(c)
    ip(*change, ns=c)
    state = observer.container(c)
    assert observer.prefetch_used == 0
    if change[0] == "link":
        assert "vra0" in state.links  # the kernel's reading, with the change
    elif change[0] == "route":
        assert any(r.dst == "10.99.0.0/16" for r in state.routes)


def test_a_namespace_not_fresh_is_not_read_ahead(netns: Callable[[str], str], observer: Observer) -> None:
    c = netns("rc")
    ip("link", "add", "vra0", "type", "veth", "peer", "name", "vra1", ns=c)
    observer.prefetch(c)
    observer.container(c)
    assert observer.prefetch_used == 0


def test_a_namespace_made_again_under_its_name_is_read_again(netns: Callable[[str], str],
                                                             observer: Observer) -> None:
    c = netns("rd")
    observer.prefetch(c)
    ip("netns", "del", c)
    ip("netns", "add", c)
    ip("link", "set", "lo", "up", ns=c)
    observer.container(c)
    assert observer.prefetch_used == 0


def test_an_attach_after_its_reading_is_ready_and_the_reading_is_not_used_again(netns: Callable[[str], str]) -> None:
    host, c = netns("rh"), netns("re")
    with Reconciler(host) as rec:
        rec.prefetch(c)
        ep = endpoint(1, c)
        result = rec.reconcile(NodeDesired(networks=[NET], endpoints=[ep]), Scope(endpoints=frozenset({ep.id})))
        assert_all_ready(result)
        assert rec.observer.prefetch_used == 1  # type: ignore[attr-defined]
        # read ahead again, the attach's own writes since make that reading stale: a resync reads
        rec.prefetch(c)
        assert rec.observer.prefetch_used == 1  # type: ignore[attr-defined]
        again = rec.reconcile(NodeDesired(networks=[NET], endpoints=[ep]))
        assert_all_ready(again)
        assert again.writes == 0 and rec.observer.prefetch_used == 1  # type: ignore[attr-defined]


def test_a_namespace_socket_serves_two_threads_one_request_at_a_time(netns: Callable[[str], str]) -> None:
    """The reading ahead runs in another thread than the reconcile, on the same namespace's
    socket: requests from both must not interleave (each skipped the other's replies as stale,
    and one waited for its own until the socket's timeout)."""
    import threading

    from pyroute2.netlink.rtnl import RTM_GETADDR, RTM_GETLINK

    from vnet.adapters.netlink.nsctx import ifaddrmsg, ifinfomsg

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
