"""The policy share of an attach, per mechanism: ``nft -f`` in a child process, libnftables
in-process (ctypes, on a thread that enters the namespace), and the element delta as an
nfnetlink batch built in Python (libnftables for the rest), with 10 and 1,000 endpoints.

Run as root (it is a script, not a pytest module)::

    .venv/bin/python tests/bench/bench_attach_nft.py            # 1,000 endpoints
    .venv/bin/python tests/bench/bench_attach_nft.py --n 300

One namespace of its own (``<prefix>-nft``), removed at the end; nothing else is touched
and no packet is sent. For each mechanism: the node's attach path (``Ruleset.with_endpoint``
then ``NftEnforcer.sync_ruleset``: one element transaction) for endpoints 1..n on one Full
network with a network-wide allow rule; a resync's readback of n unchanged endpoints
(listing, parse, compare: no write); and the whole ruleset written at once (what every
attach cost before deltas).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping

from vnet.adapters.nftables import NftEnforcer
from vnet.core import naming, nft
from vnet.core.model import IsolationMode
from vnet.core.policy import AllowRule, Policy, PolicyEndpoint, PolicyNetwork, PortSpec, Selector

PREFIX = f"{os.environ.get('VNET_RUN_PREFIX') or 'vb' + uuid.uuid4().hex[:5]}-nft"


def ep(i: int) -> PolicyEndpoint:
    return PolicyEndpoint(id=f"e{i:05d}", network="a", ips=(f"10.1.{i // 250}.{2 + i % 250}",),
                          mac=f"02:00:00:00:{i // 256:02x}:{i % 256:02x}", node="h", labels={"app": "web"})


def time_writes(enf: NftEnforcer) -> list[float]:
    """The seconds each element transaction of ``enf`` takes from now on (the write alone)."""
    out: list[float] = []
    inner = enf.write_elements

    def timed(changes: nft.Changes, meta: Mapping[tuple[str, str], nft.SetDecl]) -> None:
        t = time.perf_counter()
        inner(changes, meta)
        out.append(time.perf_counter() - t)
    enf.write_elements = timed  # type: ignore[method-assign]
    return out


def main(n: int) -> None:
    nets = [PolicyNetwork(id="a", mode=IsolationMode.FULL, cidrs=("10.1.0.0/16",))]
    rules = [AllowRule(id="r", from_=[Selector(labels={"app": "web"})], to=[Selector(labels={"app": "web"})],
                       ports=[PortSpec(protocol="tcp", port=80)])]
    br = naming.bridge_name("a")
    subprocess.run(["ip", "netns", "add", PREFIX], check=True)
    rows = []
    try:
        for name, mech, path in (("subprocess", "subprocess", "script"), ("libnftables", "libnftables", "script"),
                                 ("nfnetlink", "libnftables", "nfnetlink")):
            enf = NftEnforcer(PREFIX, mechanism=mech, element_path=path)
            write_s = time_writes(enf)
            try:
                rs = Policy(nets, [ep(0)], rules).compile("h")
                enf.sync_ruleset(rs)
                lat: list[float] = []
                for i in range(1, n + 1):
                    t = time.perf_counter()
                    rs2 = rs.with_endpoint(ep(i), local=True, bridge=br)
                    assert rs2 is not None
                    r = enf.sync_ruleset(rs2)
                    lat.append(time.perf_counter() - t)
                    assert r.wrote and not r.whole and r.elements == 6, r
                    rs = rs2
                w = 10
                first, last = statistics.median(lat[:2 * w]), statistics.median(lat[-2 * w:])
                t = time.perf_counter()
                r = enf.sync_ruleset(rs, check=True)
                check = time.perf_counter() - t
                assert not r.wrote
                t = time.perf_counter()
                enf.execute(nft.render(rs))
                whole = time.perf_counter() - t
                wfirst, wlast = statistics.median(write_s[:2 * w]), statistics.median(write_s[-2 * w:])
                rows.append((name, first, last, wfirst, wlast, check, whole))
                enf.delete()
            finally:
                enf.close()
    finally:
        subprocess.run(["ip", "netns", "del", PREFIX], capture_output=True)
    print(f"\npolicy share of an attach (Full network, one network-wide rule), {os.cpu_count()} cores\n")
    print(f"{'mechanism':<14}{'attach #1-20':>14}{f'#{n - 19}-{n}':>14}{'growth':>8}{'write #1-20':>13}"
          f"{f'#{n - 19}-{n}':>12}{'resync check':>14}{'whole ruleset':>15}")
    for mech, first, last, wfirst, wlast, check, whole in rows:
        print(f"{mech:<14}{first * 1e3:>11.3f} ms{last * 1e3:>11.3f} ms{last / first:>7.2f}x{wfirst * 1e3:>10.3f} ms"
              f"{wlast * 1e3:>9.3f} ms{check * 1e3:>11.1f} ms{whole * 1e3:>12.1f} ms")
    print(f"\nattach: Ruleset.with_endpoint + one element transaction (6 elements: binding, ARP, set members); "
          f"write: that transaction alone; resync check: read back {n + 1} endpoints' tables and compare, no "
          f"write; whole: the full script with {n + 1} endpoints in one transaction (libnftables in the last two "
          f"rows)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: it makes a network namespace")
    main(args.n)
