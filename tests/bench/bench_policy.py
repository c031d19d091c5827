"""Benchmark: compile + render + apply of one host's ruleset, 1,000 endpoints and 1,000 rules.

Run as a script (root; pytest does not collect it)::

    python -m tests.bench.bench_policy            # 1,000 endpoints, 1,000 rules
    python -m tests.bench.bench_policy -e 200 -r 200
    python -m tests.bench.bench_policy --conn        # TCP connections/s, 0 vs 1,000 rules

The ruleset is applied in a scratch namespace this script makes (``vb<pid>-h``) and
deletes at the end; nothing touches the root namespace.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time

from vnet.adapters.nftables import NftEnforcer
from vnet.core import naming, nft
from vnet.core.dataplane_model import EpDesired, NetDesired, NodeDesired
from vnet.core.model import IsolationMode
from vnet.core.policy import AllowRule, Policy, PolicyEndpoint, PolicyNetwork, PortSpec, Selector
from vnet.svc.node.reconcile import Reconciler

SERVER = """
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", 80)); s.listen(1024)
print("ready", flush=True)
while True:
    c, _ = s.accept(); c.close()
"""
CLIENT = """
import socket, sys, time
n = int(sys.argv[1]); t0 = time.perf_counter()
for _ in range(n):
    c = socket.create_connection(("10.90.0.20", 80), timeout=2); c.close()
print(n / (time.perf_counter() - t0))
"""


def conn_bench(n: int) -> None:
    """Two containers of one Full network; the rule set is 1 vs 1,000 rules (999 toward other endpoints)."""
    pid = os.getpid()
    host, c1, c2 = f"vb{pid}-h", f"vb{pid}-c1", f"vb{pid}-c2"
    made: list[str] = []
    srv = None
    try:
        for ns in (host, c1, c2):
            subprocess.run(["ip", "netns", "add", ns], check=True)
            made.append(ns)
            subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        net = PolicyNetwork(id="bench", mode=IsolationMode.FULL, cidrs=("10.90.0.0/16",))
        eps = [PolicyEndpoint(id=f"e{i}", network="bench", ips=(f"10.90.{i // 200}.{20 + i % 200}",),
                              mac=naming.local_mac((i + 1).to_bytes(6, "big")), node="h") for i in range(1001)]
        with Reconciler(host) as rec:
            r = rec.reconcile(NodeDesired(networks=[NetDesired(id="bench", gateway4="10.90.255.1/16")], endpoints=[
                EpDesired(id=e.id, network_id="bench", netns=ns, mac=e.mac, ipv4=f"{e.ips[0]}/16")
                for e, ns in ((eps[1], c1), (eps[0], c2))]))
            assert r.errors == [], r.errors
        srv = subprocess.Popen(["ip", "netns", "exec", c2, sys.executable, "-c", SERVER], stdout=subprocess.PIPE,
                               text=True)
        assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
        enf = NftEnforcer(host)
        base = AllowRule(id="r0", from_=[Selector(endpoint="e1")], to=[Selector(endpoint="e0")],
                         ports=[PortSpec(protocol="tcp", port=80)])
        extra = [AllowRule(id=f"x{i}", from_=[Selector(endpoint=f"e{2 + i % 999}")],
                           to=[Selector(endpoint=f"e{1 + (i * 7) % 1000}")],
                           ports=[PortSpec(protocol="tcp", port=1000 + i)]) for i in range(999)]
        rows = []
        for label, rules in (("1 rule", [base]), ("1,000 rules", [base, *extra])):
            rs = Policy([net], eps, rules).compile("h")
            enf.sync(nft.render(rs))
            rates = []
            for _ in range(3):
                out = subprocess.run(["ip", "netns", "exec", c1, sys.executable, "-c", CLIENT, str(n)], check=True,
                                     capture_output=True, text=True).stdout
                rates.append(float(out))
            rows.append((label, len(rs.lines), sorted(rates)[1]))
        for label, elems, rate in rows:
            print(f"  {label:12s} ({elems:5d} rule lines): {rate:8.0f} TCP connections/s (median of 3)")
        print(f"  ratio 1,000 rules / 1 rule: {rows[1][2] / rows[0][2]:.2f} (target >= 0.8)")
    finally:
        if srv is not None:
            srv.kill()
            srv.wait()
        for ns in reversed(made):
            subprocess.run(["ip", "netns", "del", ns], check=False)


def build(n_eps: int, n_rules: int, nets: int = 20) -> Policy:
    rnd = random.Random(7)
    modes = list(IsolationMode)
    networks = [PolicyNetwork(id=f"n{i}", mode=modes[i % 4], cidrs=(f"10.{100 + i // 200}.{i % 200}.0/24",),
                              connected=(f"n{(i + 1) % nets}", f"n{(i - 1) % nets}"))
                for i in range(nets)]
    eps = [PolicyEndpoint(id=f"e{j}", network=f"n{j % nets}",
                          ips=(f"10.{100 + (j % nets) // 200}.{(j % nets) % 200}.{10 + j // nets}",),
                          mac=naming.local_mac(j.to_bytes(6, "big")), labels={"app": f"a{j % 50}"}, node="h")
           for j in range(n_eps)]
    rules = []
    for k in range(n_rules):
        kind = k % 3
        if kind == 0:
            a, b = rnd.randrange(n_eps), rnd.randrange(n_eps)
            sel_f, sel_t = Selector(endpoint=f"e{a}"), Selector(endpoint=f"e{b}")
        elif kind == 1:
            sel_f = Selector(labels={"app": f"a{rnd.randrange(50)}"})
            sel_t = Selector(endpoint=f"e{rnd.randrange(n_eps)}")
        else:
            sel_f, sel_t = Selector(endpoint=f"e{rnd.randrange(n_eps)}"), Selector(cidr=f"198.51.{k % 256}.0/24")
        port = rnd.randrange(1, 60000)
        rules.append(AllowRule(id=f"r{k}", from_=[sel_f], to=[sel_t],
                               ports=[PortSpec(protocol="tcp", port=port, end_port=port + rnd.randrange(0, 10))]))
    return Policy(networks, eps, rules)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-e", "--endpoints", type=int, default=1000)
    ap.add_argument("-r", "--rules", type=int, default=1000)
    ap.add_argument("--conn", action="store_true", help="TCP connections/s with 1 vs 1,000 rules")
    ap.add_argument("-n", type=int, default=2000, help="connections per run (--conn)")
    args = ap.parse_args()
    if args.conn:
        conn_bench(args.n)
        return
    t0 = time.perf_counter()
    pol = build(args.endpoints, args.rules)
    t1 = time.perf_counter()
    rs = pol.compile("h")
    t2 = time.perf_counter()
    script = nft.render(rs)
    t3 = time.perf_counter()
    ns = f"vb{os.getpid()}-h"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        enf = NftEnforcer(ns)
        t4 = time.perf_counter()
        enf.apply(script)
        t5 = time.perf_counter()
        r = enf.sync(script)
        t6 = time.perf_counter()
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    elems = sum(len(x.elements) for x in rs.sets)
    print(f"{args.endpoints} endpoints, {args.rules} rules: {len(rs.lines)} rule lines over {len(rs.sets)} sets "
          f"({elems} set elements), {len(rs.net_pairs)} bridge pairs, script {len(script) // 1024} KiB")
    print(f"  build inputs {1e3 * (t1 - t0):7.1f} ms")
    print(f"  compile      {1e3 * (t2 - t1):7.1f} ms")
    print(f"  render       {1e3 * (t3 - t2):7.1f} ms")
    print(f"  apply (nft -f, one transaction, + read-back) {1e3 * (t5 - t4):7.1f} ms")
    print(f"  resync, unchanged ({r.reason}, wrote={r.wrote}) {1e3 * (t6 - t5):7.1f} ms")


if __name__ == "__main__":
    main()
