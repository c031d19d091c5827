"""macvlan endpoints removed while their node worker was down are cleaned after it
restarts (issue 18).

Nothing in the host namespace names a macvlan endpoint (it lives in its container's
namespace, a sub-interface of the parent), so a worker restarted after the endpoint's
record was deleted would never look for it: the orphan kept its MAC and address on the
parent's segment for ever. The worker keeps a ledger of the sub-interfaces it made in
its state directory; the restarted worker's first full resync removes every one no
longer desired (and whatever else of the removed networks is still there: the host
shim).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Awaitable, Callable

import msgspec
import pytest

from tests.conftest import requires_root
from tests.netns.conftest import ip, links, ping_all
from tests.netns.test_overlay_e2e import Cluster, cluster  # noqa: F401  (the fixture)
from vnet.core import naming
from vnet.core.dataplane_model import EpDesired, NetDesired, NodeDesired
from vnet.core.errors import VNetError
from vnet.core.model import DriverType
from vnet.runtime.service import Runtime
from vnet.svc.node.reconcile import Reconciler

pytestmark = [pytest.mark.netns, requires_root]


async def _resynced(c: Cluster, node: str, t0: float, timeout: float = 90.0) -> None:
    while True:
        try:
            s = await c.m.node_stats(node)
            if s.full_resyncs >= 1 and s.desired_fetched:
                return
        except VNetError:
            pass
        assert time.monotonic() - t0 < timeout, "the restarted worker did not resync"
        await asyncio.sleep(0.2)


async def test_macvlan_endpoints_removed_while_the_worker_was_down_are_cleaned_after_restart(
        cluster: Cluster) -> None:  # noqa: F811
    c = cluster
    node = f"{c.prefix}-mv"
    host = await asyncio.to_thread(c.netns, "mvh")
    for parent in ("par0", "par1"):  # a veth with both ends up has carrier (no dummy driver here)
        await asyncio.to_thread(ip, "link", "add", parent, "type", "veth", "peer", "name", f"{parent}p", ns=host)
        await asyncio.to_thread(ip, "link", "set", f"{parent}p", "up", ns=host)
    state = c.state / "mvnode"
    cfg = msgspec.structs.replace(c.cfg, host_netns=host, node_state_dir=str(state))
    start: Callable[[], Awaitable[Runtime]] = lambda: c.start_service(  # noqa: E731
        "node", params={"node": node, "resync_s": "60"}, cfg=cfg)
    rt = await start()
    await c.wait_nodes([node])
    n1 = await c.m.create_network("mvr1", "10.139.0.0/24", None, "macvlan", "none", {"parent": "par0"})
    n2 = await c.m.create_network("mvr2", "10.140.0.0/24", None, "macvlan", "none", {"parent": "par1"})
    cs = await c.containers(node, 4, "mvc")
    e = [await c.m.create_endpoint(x, n1.id if i < 3 else n2.id, node=node, wait=True, wait_timeout=30)
         for i, x in enumerate(cs)]
    assert [x.status for x in e] == ["ready"] * 4, e
    ledger = state / "subifs.json"
    assert {d["id"] for d in json.loads(ledger.read_text())["subifs"]} == {x.id for x in e}

    # The worker stops (fail static: everything stays). While it is down: endpoint 0's record
    # is deleted (its container lives on, with the macvlan); container 1's namespace is
    # deleted and then its record; network 2 goes with its only endpoint (3).
    await rt.stop(drain_timeout=2.0)
    await c.m.delete_endpoint(e[0].id, force=True)
    await asyncio.to_thread(ip, "netns", "delete", cs[1], ns=None)
    await c.m.delete_endpoint(e[1].id, force=True)
    await c.m.delete_endpoint(e[3].id, force=True)
    await c.m.delete_network(n2.id)
    assert "eth0" in links(cs[0]) and "eth0" in links(cs[3])  # the orphans

    # Restarted, its first full resync removes them all; endpoint 2 is untouched.
    t0 = time.monotonic()
    await start()
    await _resynced(c, node, t0)
    took = time.monotonic() - t0
    assert set(links(cs[0])) == {"lo"} and set(links(cs[3])) == {"lo"}
    # ... with the nftables tables that enforced their policy inside their containers
    left = {x: [t for t in await asyncio.to_thread(nft_tables, x) if t.startswith("vnetm_")] for x in (cs[0], cs[3])}
    assert left == {cs[0]: [], cs[3]: []}, left
    assert not any(naming.is_ours(n) for n in links(host))
    assert {d["id"] for d in json.loads(ledger.read_text())["subifs"]} == {e[2].id}
    assert (await c.m.get_endpoint(e[2].id)).status == "ready"
    link = links(cs[2])["eth0"]
    assert link["linkinfo"]["info_kind"] == "macvlan" and link["address"] == e[2].mac_address
    stats = await c.m.node_stats(node)
    assert stats.last_full_errors == 0, stats.last_errors
    print(f"\nrestart -> orphans gone (2 macvlans, 1 forgotten) after {took:.2f} s; "
          f"{stats.last_full_writes} kernel writes in the first full resync")
    # the remaining endpoint still works (a peer on par0's segment: its other end, addressed here)
    await asyncio.to_thread(ip, "addr", "add", "10.139.0.200/24", "dev", "par0p", ns=host)
    assert await asyncio.to_thread(ping_all, [(cs[2], "10.139.0.200")]) == []

    # The node torn down: the last macvlan endpoint goes with the tables that enforce its
    # policy inside its container, and the ledger with its last entry.
    had = await asyncio.to_thread(nft_tables, cs[2])
    rep = await c.m.node_teardown(node)
    assert rep.ok, rep.errors
    assert f"interface eth0 in {cs[2]}" in rep.removed, rep.removed
    assert set(links(cs[2])) == {"lo"}
    assert not [t for t in await asyncio.to_thread(nft_tables, cs[2]) if t.startswith("vnetm_")], had
    assert not ledger.exists() and not any(naming.is_ours(n) for n in links(host))
    print(f"teardown: {rep.removed} (container tables before: {had})")


def nft_tables(ns: str) -> list[str]:
    r = subprocess.run(["ip", "netns", "exec", ns, "nft", "-j", "list", "tables"], capture_output=True, text=True)
    return [t["table"]["name"] for t in json.loads(r.stdout or "{}").get("nftables", []) if "table" in t]


def test_the_ledger_survives_the_reconciler(netns: Callable[[str], str], tmp_path_factory: pytest.TempPathFactory,
                                           run_prefix: str) -> None:
    """The same at the reconciler's level: a new Reconciler on the same state directory
    removes a macvlan endpoint the previous one made and that is no longer desired, and
    forgets one whose namespace is gone; a teardown removes the rest (the host shim
    included) and empties the ledger (no file left)."""
    host = netns("mlh")
    ip("link", "add", "par0", "type", "veth", "peer", "name", "par0p", ns=host)
    ip("link", "set", "par0p", "up", ns=host)
    state = tmp_path_factory.mktemp(f"{run_prefix}-mvledger")
    net = NetDesired(id="mvl", driver=DriverType.MACVLAN, parent="par0", mode="bridge", gateway4="10.141.0.1/24",
                     host_shim="10.141.0.254/24")
    eps = [EpDesired(id=f"mvl-e{i}", network_id="mvl", netns=netns(f"mlc{i}"),
                     mac=naming.local_mac(bytes([2, 0x8a, 0, 0, 1, i])), ipv4=f"10.141.0.{i + 10}/24")
           for i in range(3)]
    with Reconciler(host, state_dir=state) as rec:
        r = rec.reconcile(NodeDesired(networks=[net], endpoints=eps))
        assert r.errors == [] and all(s.state == "ready" for s in r.endpoints.values()), r
    ip("netns", "delete", eps[1].netns, ns=None)
    # a new reconciler (a restarted worker) that never saw endpoint 0 or 1 desired
    with Reconciler(host, state_dir=state) as rec:
        r = rec.reconcile(NodeDesired(networks=[net], endpoints=[eps[2]]))
        assert r.errors == [], r.errors
        assert set(links(eps[0].netns)) == {"lo"}
        assert "eth0" in links(eps[2].netns) and naming.shim_name("mvl") in links(host)
        assert {d["id"] for d in json.loads((state / "subifs.json").read_text())["subifs"]} == {eps[2].id}
        removed, errors = rec.teardown()
        assert errors == [] and sorted(removed) == [f"interface eth0 in {eps[2].netns}",
                                                    f"interface {naming.shim_name('mvl')}"], (removed, errors)
        assert set(links(eps[2].netns)) == {"lo"} and not (state / "subifs.json").exists()
        assert naming.shim_name("mvl") not in links(host)  # the host shim went with the teardown too
