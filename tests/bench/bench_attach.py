"""Per-container attach/detach on the bridge data plane: VNet's reconciler vs `ip`.

Run as root (it is a script, not a pytest module)::

    .venv/bin/python tests/bench/bench_attach.py            # 100 containers per peer
    .venv/bin/python tests/bench/bench_attach.py --n 50

Everything happens in network namespaces this script makes (names ``vb<run>-...``),
removed at the end, on error and on Ctrl-C; addresses are 10.123.0.0/16 and
fd00:123::/64 inside them. Nothing touches the root namespace.

Peers, run in this same process on the same kernel, one after another:

* **vnet**: ``Reconciler.reconcile(desired, Scope(endpoints={id}))`` per container —
  the node worker's path for one endpoint event: observe what it touches, plan, apply
  (veth created with its peer in the container, 2 sysctls, 2 addresses, link up,
  2 default routes). Detach: the same with the endpoint removed from the desired state.
* **ip**: the same wiring with one ``ip`` command per step (as a shell script would):
  ``ip link add ... type veth peer ... netns C``, ``ip netns exec C sysctl``, two
  ``ip addr add``, ``ip link set up``, two ``ip route add``. Detach: ``ip link del``.
* **ip -batch**: the same in three processes (host side, sysctls, one ``ip -batch``
  inside the container).
"""

from __future__ import annotations

import argparse
import atexit
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable

from vnet.core import naming
from vnet.core.dataplane_model import EpDesired, NetDesired, NodeDesired, Scope
from vnet.svc.node.reconcile import Reconciler

# honour the test runs' prefix so ops/scripts/sweep.sh can collect leftovers after a crash
PREFIX = f"{os.environ.get('VNET_RUN_PREFIX') or 'vb' + uuid.uuid4().hex[:5]}-b"
_made: list[str] = []


def _ip_batch(lines: list[str], ns: str | None = None) -> None:
    cmd = ["ip"] + (["-n", ns] if ns else []) + ["-batch", "-"]
    subprocess.run(cmd, input="\n".join(lines) + "\n", text=True, check=True, capture_output=True)


def make_namespaces(names: list[str]) -> None:
    _made.extend(names)
    _ip_batch([f"netns add {n}" for n in names])


def cleanup() -> None:
    if _made:
        names = list(_made)
        _made.clear()
        subprocess.run(["ip", "-force", "-batch", "-"], input="".join(f"netns del {n}\n" for n in names),
                       text=True, capture_output=True)


def _on_signal(signum: int, frame: object) -> None:
    cleanup()
    sys.exit(128 + signum)


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def ms(xs: list[float]) -> tuple[float, float]:
    return statistics.median(xs) * 1e3, pct(xs, 0.9) * 1e3


def run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def bench_vnet(n: int) -> dict[str, list[float]]:
    host = f"{PREFIX}-vh"
    cs = [f"{PREFIX}-v{i}" for i in range(n)]
    make_namespaces([host, *cs])
    net = NetDesired(id="bench", gateway4="10.123.0.1/16", gateway6="fd00:123::1/64")
    eps = [EpDesired(id=f"ep{i}", network_id="bench", netns=c,
                     mac=naming.local_mac(bytes([2, 0xBE, 0, 0, i >> 8, i & 0xFF])),
                     ipv4=f"10.123.{1 + i // 250}.{i % 250 + 2}/16", ipv6=f"fd00:123::{i + 2:x}/64",
                     gw4="10.123.0.1", gw6="fd00:123::1") for i, c in enumerate(cs)]
    out: dict[str, list[float]] = {"attach": [], "detach": [], "detach_apply": [], "observe": [], "plan": [],
                                   "apply": []}
    with Reconciler(host) as rec:
        r = rec.reconcile(NodeDesired(networks=[net]))
        assert r.ok, r.errors
        out["rss0_kb"] = [rss_kb()]
        for i in range(n):
            d = NodeDesired(networks=[net], endpoints=eps[: i + 1])
            t0 = time.perf_counter()
            r = rec.reconcile(d, Scope(endpoints=frozenset({eps[i].id})))
            out["attach"].append(time.perf_counter() - t0)
            assert r.ok and r.endpoints[eps[i].id].state == "ready", r.errors
            out["observe"].append(r.observe_s)
            out["plan"].append(r.plan_s)
            out["apply"].append(r.apply_s)
        run(["ip", "netns", "exec", cs[-1], "ping", "-c1", "-W1", "-q", "10.123.0.1"])
        full = NodeDesired(networks=[net], endpoints=eps)
        t0 = time.perf_counter()
        r = rec.reconcile(full)
        out["resync"] = [time.perf_counter() - t0]
        assert r.ok and r.writes == 0, (r.writes, r.errors)
        for i in range(n):
            d = NodeDesired(networks=[net], endpoints=eps[i + 1:])
            t0 = time.perf_counter()
            r = rec.reconcile(d, Scope(endpoints=frozenset({eps[i].id})))
            out["detach"].append(time.perf_counter() - t0)
            out["detach_apply"].append(r.apply_s)
            assert r.ok and r.writes == 1, (r.writes, r.errors)
        # the whole set at once: one full reconcile attaching n endpoints, one removing them
        t0 = time.perf_counter()
        r = rec.reconcile(full)
        out["bulk"] = [(time.perf_counter() - t0) / n]
        assert r.ok and r.writes == n * 8, (r.writes, r.errors)
        out["rss_kb"] = [rss_kb()]
        t0 = time.perf_counter()
        r = rec.reconcile(NodeDesired(networks=[net]))
        out["bulk_detach"] = [(time.perf_counter() - t0) / n]
        assert r.ok and r.writes == n + 1, (r.writes, r.errors)  # n group marks + one group delete
    return out


def rss_kb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return float(line.split()[1])
    return 0.0


def _ip_attach_steps(host: str, bridge: str, c: str, i: int) -> list[list[str]]:
    hv = naming.veth_name(f"ip{i}")
    mac = naming.local_mac(bytes([2, 0x1B, 0, 0, i >> 8, i & 0xFF]))
    v4, v6 = f"10.123.{1 + i // 250}.{i % 250 + 2}/16", f"fd00:123::{i + 2:x}/64"
    return [
        ["ip", "-n", host, "link", "add", hv, "mtu", "1500", "master", bridge, "up", "type", "veth", "peer", "name",
         "eth0", "address", mac, "mtu", "1500", "netns", c],
        ["ip", "netns", "exec", c, "sysctl", "-q", "-w", "net.ipv4.conf.eth0.arp_notify=1",
         "net.ipv6.conf.eth0.accept_dad=0"],
        ["ip", "-n", c, "addr", "add", v4, "dev", "eth0"],
        ["ip", "-n", c, "addr", "add", v6, "dev", "eth0", "nodad"],
        ["ip", "-n", c, "link", "set", "eth0", "up"],
        ["ip", "-n", c, "route", "add", "default", "via", "10.123.0.1"],
        ["ip", "-n", c, "-6", "route", "add", "default", "via", "fd00:123::1"],
    ]


def bench_ip(n: int, batch: bool) -> dict[str, list[float]]:
    tag = "b" if batch else "i"
    host = f"{PREFIX}-{tag}h"
    cs = [f"{PREFIX}-{tag}{i}" for i in range(n)]
    make_namespaces([host, *cs])
    bridge = "br-bench"
    _ip_batch([f"link add {bridge} type bridge", f"link set {bridge} up", f"addr add 10.123.0.1/16 dev {bridge}",
               f"addr add fd00:123::1/64 dev {bridge} nodad"], ns=host)
    out: dict[str, list[float]] = {"attach": [], "detach": []}
    for i, c in enumerate(cs):
        steps = _ip_attach_steps(host, bridge, c, i)
        t0 = time.perf_counter()
        if not batch:
            for cmd in steps:
                run(cmd)
        else:
            run(steps[0])
            run(steps[1])
            # inside the container: the address family follows from the addresses
            _ip_batch([" ".join(cmd[4:] if cmd[3] == "-6" else cmd[3:]) for cmd in steps[2:]], ns=c)
        out["attach"].append(time.perf_counter() - t0)
    run(["ip", "netns", "exec", cs[-1], "ping", "-c1", "-W1", "-q", "10.123.0.1"])
    for i in range(n):
        t0 = time.perf_counter()
        run(["ip", "-n", host, "link", "del", naming.veth_name(f"ip{i}")])
        out["detach"].append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100, help="containers per peer (default 100)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_attach: needs root (it makes network namespaces)")
    atexit.register(cleanup)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    n = args.n
    print(f"bench_attach: {n} containers per peer, namespaces {PREFIX}-*, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    runs: list[tuple[str, Callable[[], dict[str, list[float]]]]] = [
        ("vnet", lambda: bench_vnet(n)), ("ip", lambda: bench_ip(n, False)), ("ip -batch", lambda: bench_ip(n, True))]
    res: dict[str, dict[str, list[float]]] = {}
    try:
        for name, fn in runs:
            res[name] = fn()
            cleanup()
    finally:
        cleanup()
    v, i, b = res["vnet"], res["ip"], res["ip -batch"]
    rows = [
        ("attach", "vnet: scoped reconcile (observe+plan+apply)", v["attach"]),
        ("", "  of which observe", v["observe"]),
        ("", "  of which plan", v["plan"]),
        ("", "  of which apply (8 kernel writes)", v["apply"]),
        ("", "ip: one command per step (7 processes)", i["attach"]),
        ("", "ip -batch (3 processes)", b["attach"]),
        ("detach", "vnet: scoped reconcile (1 kernel write)", v["detach"]),
        ("", "  of which apply (the veth delete)", v["detach_apply"]),
        ("", "ip link del", i["detach"]),
    ]
    print()
    print(f"{'':7}{'per container (ms)':46}{'median':>9}{'p90':>9}")
    for op, what, xs in rows:
        med, p90 = ms(xs)
        print(f"{op:7}{what:46}{med:9.2f}{p90:9.2f}")
    print(f"{'':7}{'vnet: one full reconcile of all, per endpoint':46}{v['bulk'][0] * 1e3:9.2f}")
    print(f"{'':7}{'vnet: one full reconcile removing all, per endpoint':46}{v['bulk_detach'][0] * 1e3:9.2f}")
    print(f"{'':7}{'vnet: zero-write resync of all (total)':46}{v['resync'][0] * 1e3:9.2f}")
    grow = (v["rss_kb"][0] - v["rss0_kb"][0]) / n
    print(f"{'':7}{'vnet: resident memory growth per endpoint (KB)':46}{grow:9.1f}")
    am, _ = ms(v["attach"])
    print()
    print(f"attach ratio ip/vnet: {ms(i['attach'])[0] / am:.1f}x (one command per step), "
          f"{ms(b['attach'])[0] / am:.1f}x (ip -batch); detach ratio ip/vnet: "
          f"{ms(i['detach'])[0] / ms(v['detach'])[0]:.2f}x")


if __name__ == "__main__":
    main()
