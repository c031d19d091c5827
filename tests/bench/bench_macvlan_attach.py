"""macvlan attach cost before and after the macvlan enforcement (root; scratch namespaces).

    .venv/bin/python -m tests.bench.bench_macvlan_attach --n 40

Two host namespaces, each with a parent interface; two connected MeshOnly macvlan
networks per host; ``--n`` containers attached one by one to each host, alternating
networks, the two hosts interleaved so both see the same load:

* **before** — what the node did for a macvlan attach until now: the host namespace's
  element delta (``NftEnforcer.sync_ruleset`` of ``Ruleset.with_endpoint``) and the scoped
  reconcile (the sub-interface made inside the container);
* **after** — the same, plus ``MvPolicy.with_endpoint`` and ``MacvlanEnforcer.sync(only=
  {new})``: the new endpoint's table pair (one transaction, in its container, before the
  netlink work), as ``PolicyAgent.push`` does; then, untimed as the attach, the deferred
  pass: an element delta in every other container whose sets take its address (timed
  and counted on its own).

Prints the medians, p90, the ratio, and the nft transactions per attach.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from tests.bench.scratch_ns import Scratch, sh
from vnet.adapters.mvnft import MacvlanEnforcer
from vnet.adapters.nftables import NftEnforcer
from vnet.core import mvpolicy as mvp
from vnet.core import naming
from vnet.core.dataplane_model import EpDesired, NetDesired, NodeDesired, Scope
from vnet.core.model import DriverType, IsolationMode
from vnet.core.policy import Policy, PolicyEndpoint, PolicyNetwork
from vnet.svc.node.reconcile import Reconciler


class Host:
    def __init__(self, ns: Scratch, tag: str, enforce: bool) -> None:
        self.ns, self.tag, self.enforce = ns, tag, enforce
        self.host = ns.make(f"{tag}h")
        sh("ip", "-n", self.host, "link", "add", "up0", "type", "veth", "peer", "name", "up0p")
        sh("ip", "-n", self.host, "link", "set", "up0", "up")
        sh("ip", "-n", self.host, "link", "set", "up0p", "up")
        self.nets = [PolicyNetwork(id=f"{tag}n{k}", mode=IsolationMode.MESH_ONLY, cidrs=(f"10.90.{k}.0/24",),
                                   gateways=(f"10.90.{k}.1",), connected=(f"{tag}n{1 - k}",)) for k in (0, 1)]
        self.nds = [NetDesired(id=n.id, driver=DriverType.MACVLAN, parent="up0") for n in self.nets]
        self.eps: list[EpDesired] = []
        self.peps: list[PolicyEndpoint] = []
        self.rec = Reconciler(self.host)
        self.nft = NftEnforcer(self.host)
        self.mv = MacvlanEnforcer()
        self.transactions: list[int] = []
        self.deferred: list[tuple[float, int]] = []
        # the first endpoint of each network is placed by the engine (a fetch), as on a node
        for k in (0, 1):
            self.attach(k, first=True)

    def attach(self, k: int, *, first: bool = False) -> float:
        i = len(self.eps)
        cont = self.ns.make(f"{self.tag}c{i}")
        eid = f"{self.tag}e{i}"
        mac = naming.local_mac(bytes.fromhex(naming.veth_name(eid)[3:]))
        ip = f"10.90.{k}.{10 + i}"
        ep = EpDesired(id=eid, network_id=self.nets[k].id, netns=cont, mac=mac, ipv4=f"{ip}/24")
        pe = PolicyEndpoint(id=eid, network=self.nets[k].id, ips=(ip,), mac=mac, node="h")
        t0 = time.perf_counter()
        self.eps.append(ep)
        self.peps.append(pe)
        if first:  # the whole ruleset, as a fetch would give it
            pol = Policy(self.nets, self.peps)
            self.rs = pol.compile("h")
            self.mvp = mvp.compile_macvlan(pol, "h", {n.id for n in self.nets})
        else:
            rs = self.rs.with_endpoint(pe, local=True, bridge=naming.bridge_name(pe.network))
            assert rs is not None
            self.rs = rs
            if self.mvp is not None:
                self.mvp = self.mvp.with_endpoint(pe)
        tx0 = self.mv.transactions
        self.nft.sync_ruleset(self.rs)
        locs = mvp.locals_from_desired(self.eps, {n.id: n for n in self.nds})
        if self.enforce:  # on the attach's path: its own table pair (PolicyAgent.push)
            res = self.mv.sync(self.mvp, self.rs, locs, only=None if first else {eid})
            assert not res.errors, res.errors
        r = self.rec.reconcile(NodeDesired(networks=self.nds, endpoints=self.eps), Scope(endpoints=frozenset({eid})))
        assert not r.errors, r.errors
        dt = time.perf_counter() - t0
        self.transactions.append(1 + self.mv.transactions - tx0)
        if self.enforce:  # the deferred pass: every other container's delta, off the attach's path
            t1 = time.perf_counter()
            tx1 = self.mv.transactions
            res = self.mv.sync(self.mvp, self.rs, locs)
            assert not res.errors, res.errors
            self.deferred.append((time.perf_counter() - t1, self.mv.transactions - tx1))
        return dt

    def close(self) -> None:
        self.rec.close()
        self.nft.close()
        self.mv.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=40)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (scratch network namespaces)")
    ns = Scratch(f"vbmv{os.getpid() % 10000}")
    try:
        before, after = Host(ns, "b", False), Host(ns, "a", True)
        tb: list[float] = []
        ta: list[float] = []
        for i in range(args.n):
            tb.append(before.attach(i % 2))
            ta.append(after.attach(i % 2))
        txa = after.transactions[2:]

        def row(name: str, xs: list[float]) -> str:
            q = statistics.quantiles(xs, n=10)
            return f"{name:<44} {statistics.median(xs) * 1000:8.2f} ms {q[8] * 1000:8.2f} ms"

        print(f"macvlan attach, {args.n} per host, two connected MeshOnly macvlan networks on one parent")
        print(f"{'':<44} {'median':>11} {'p90':>11}")
        print(row("before (host delta + scoped reconcile)", tb))
        print(row("after (+ the container tables)", ta))
        print(f"ratio after/before (medians): {statistics.median(ta) / statistics.median(tb):.2f}x")
        print(f"nft transactions on the attach path after: {statistics.mean(txa):.1f} (1 host delta + 1 for the "
              "new endpoint's table pair)")
        d = after.deferred[2:]
        print(f"deferred pass (every other container whose sets take the address, off the attach path): "
              f"attaches 1-10 median {statistics.median(x for x, _ in d[:10]) * 1000:.2f} ms / "
              f"{statistics.mean(n for _, n in d[:10]):.1f} transactions, last 10 median "
              f"{statistics.median(x for x, _ in d[-10:]) * 1000:.2f} ms / "
              f"{statistics.mean(n for _, n in d[-10:]):.1f}")
        h = args.n // 2
        print(f"halves: before {statistics.median(tb[:h]) * 1000:.2f} -> {statistics.median(tb[h:]) * 1000:.2f} ms, "
              f"after {statistics.median(ta[:h]) * 1000:.2f} -> {statistics.median(ta[h:]) * 1000:.2f} ms")
        before.close()
        after.close()
    finally:
        ns.cleanup()


if __name__ == "__main__":
    main()
