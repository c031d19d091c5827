"""vnet-cni against the reference bridge + host-local, both exec'd as a runtime execs a
plugin — ONE table from one run.

Run as root from the repository root (a script, not a pytest module)::

    .venv/bin/python -m tests.bench.bench_cni              # 100 containers per row
    .venv/bin/python -m tests.bench.bench_cni --n 40

VNet: the control plane and a node worker serving its CNI socket (``vnet-node --cni``)
run in this process against a private nats-server and valkey; the shim is the file
``vnetctl cni install`` writes (``#!/usr/bin/python3 -IS``, standard library only). CNI:
``/usr/lib/cni/bridge`` with ``host-local`` (Debian's containernetworking-plugins). Each
call is one process started with ``ip netns exec <host>`` (the runtime's namespace is a
namespace of this script for both), the conf on stdin, CNI_* in the environment. The rows
are interleaved: container i is ADDed by every plugin in turn, then every container is
DELeted the same way in reverse order, so all rows see the same load on a shared machine
(ratios are what to read). For vnet-cni the node's share of each call is printed too (its
socket's request in to answer out; the rest is ``ip netns exec``, Python's start and the
shim). Cold start: ``VERSION`` of each executable, exec'd directly, in turns.

Everything lives in namespaces this script makes (``<prefix>-...``), removed at the end,
on error and on Ctrl-C; addresses 10.89.60-62.x exist only inside them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.bench.one_node import one_node
from tests.bench.scratch_ns import Scratch
from vnet.cli.cni import plugin_source

PREFIX = f"{os.environ.get('VNET_RUN_PREFIX') or 'vb' + uuid.uuid4().hex[:5]}-k"
NS = Scratch(PREFIX)
REF = Path("/usr/lib/cni")


def call(host: str, exe: str, cmd: str, conf: dict[str, Any], container: str, ns_path: str,
         cni_path: str) -> float:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": cmd, "CNI_CONTAINERID": container,
           "CNI_NETNS": ns_path, "CNI_IFNAME": "eth0", "CNI_PATH": cni_path}
    t0 = time.perf_counter()
    r = subprocess.run(["ip", "netns", "exec", host, exe], input=json.dumps(conf).encode(), env=env,
                       capture_output=True, timeout=120)
    took = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{exe} {cmd} {container}: exit {r.returncode}: {r.stdout.decode()} {r.stderr.decode()}")
    return took


def cold(exes: list[str], n: int = 40) -> list[float]:
    """``VERSION`` of each executable, exec'd directly, in turns: the median of ``n`` each."""
    ts: list[list[float]] = [[] for _ in exes]
    for _ in range(n):
        for k, exe in enumerate(exes):
            t0 = time.perf_counter()
            subprocess.run([exe], input=b'{"cniVersion":"1.0.0"}', env={"CNI_COMMAND": "VERSION"},
                           capture_output=True, check=True)
            ts[k].append(time.perf_counter() - t0)
    return [statistics.median(x) for x in ts]


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


Plugin = tuple[str, str, dict[str, Any], str]  # host namespace, executable, conf, CNI_PATH


def rows(plugins: dict[str, Plugin], conts: dict[str, list[str]], node_took: Callable[[str], float]
         ) -> dict[str, dict[str, list[float]]]:
    """ADD for container i with every plugin in turn, then DEL (reverse order) the same way:
    each row sees the same load on a shared machine. Per VNet call also the node's share
    (the socket's request in to its answer out); the rest is exec, Python start, the shim."""
    out: dict[str, dict[str, list[float]]] = {k: {"ADD": [], "DEL": [], "ADD node": [], "DEL node": []}
                                               for k in plugins}
    n = len(next(iter(conts.values())))
    for cmd, order in (("ADD", range(n)), ("DEL", reversed(range(n)))):
        for i in order:
            for k, (label, (host, exe, conf, cni_path)) in enumerate(plugins.items()):
                # a container id per row: one container in two VNet networks would need two ifnames
                out[label][cmd].append(call(host, exe, cmd, conf, f"c{k}-{i}", f"/run/netns/{conts[label][i]}",
                                            cni_path))
                if "vnet" in label:
                    out[label][f"{cmd} node"].append(node_took(cmd))
    return out


async def main(n: int) -> None:
    if not (REF / "bridge").exists():
        raise SystemExit("the reference plugins are not installed (apt-get install containernetworking-plugins)")
    async with one_node(PREFIX, NS, lambda work: {"cni": "on", "cni_socket": str(work / "cni.sock")}, "vh") as st:
        work, m, vhost, rts = st.work, st.m, st.host, st.rts
        sock = str(work / "cni.sock")
        bindir = work / "bin"
        bindir.mkdir()
        shim = bindir / "vnet-cni"
        shim.write_text(plugin_source())
        shim.chmod(0o755)
        nets = {"none": await m.create_network(f"{PREFIX}-none", "10.89.60.0/22", "10.89.60.1", "bridge",
                                               "none"),
                "full": await m.create_network(f"{PREFIX}-full", "10.89.64.0/22", "10.89.64.1", "bridge",
                                               "full")}
        ref_conf = {"cniVersion": "1.0.0", "name": "ref", "type": "bridge", "bridge": "cnibr0",
                    "isGateway": True, "ipMasq": False,
                    "ipam": {"type": "host-local", "subnet": "10.89.68.0/22", "dataDir": str(work / "hl")}}
        chost = NS.make("ch")  # made late: on this shared machine a namespace made early went missing twice
        plugins: dict[str, Plugin] = {"bridge + host-local": (chost, str(REF / "bridge"), ref_conf, str(REF))}
        for mode, net in nets.items():
            conf = {"cniVersion": "1.1.0", "name": net.name, "type": "vnet-cni", "network": net.name,
                    "socket": sock}
            plugins[f"vnet-cni, {mode} network"] = (vhost, str(shim), conf, str(bindir))
        conts = {label: [NS.make(f"x{k}-{i}") for i in range(n + 1)] for k, label in enumerate(plugins)}
        took: dict[str, float] = getattr(rts[-1].state["cni"], "took", {})  # the node's share of each call

        def node_took(cmd: str) -> float:
            return took.get(cmd, 0.0)
        # warm every path once (page cache, the first namespace), then measure in turns
        await asyncio.to_thread(rows, plugins, {k: v[:1] for k, v in conts.items()}, node_took)
        results = await asyncio.to_thread(rows, plugins, {k: v[1:] for k, v in conts.items()}, node_took)
        c_ref, c_shim = cold([str(REF / "bridge"), str(shim)])
        base_add = statistics.median(results["bridge + host-local"]["ADD"])
        base_del = statistics.median(results["bridge + host-local"]["DEL"])
        print(f"\nCNI ADD/DEL, {n} containers per row, one run, exec'd as a runtime does (ip netns exec), "
              "the rows interleaved container by container\n")
        print("| plugin | ADD median | ADD p99 | DEL median | DEL p99 |")
        print("|---|---|---|---|---|")
        for label, r in results.items():
            a, d = statistics.median(r["ADD"]), statistics.median(r["DEL"])
            print(f"| {label} | {a * 1e3:.1f} ms ({a / base_add:.2f}x) | {pct(r['ADD'], 0.99) * 1e3:.1f} ms | "
                  f"{d * 1e3:.1f} ms ({d / base_del:.2f}x) | {pct(r['DEL'], 0.99) * 1e3:.1f} ms |")
        print("\nwhere a vnet-cni call's time goes (medians): the node (socket in -> answer out) and the rest "
              "(ip netns exec, Python start, the shim)")
        for label, r in results.items():
            if any(r["ADD node"]):
                an, dn = statistics.median(r["ADD node"]), statistics.median(r["DEL node"])
                rest_a = statistics.median(x - y for x, y in zip(r["ADD"], r["ADD node"], strict=True))
                rest_d = statistics.median(x - y for x, y in zip(r["DEL"], r["DEL node"], strict=True))
                print(f"  {label}: ADD node {an * 1e3:.1f} ms + rest {rest_a * 1e3:.1f} ms; DEL node "
                      f"{dn * 1e3:.1f} ms + rest {rest_d * 1e3:.1f} ms")
        print(f"\ncold start (VERSION, exec'd directly, median of 40): vnet-cni shim {c_shim * 1e3:.1f} ms, "
              f"bridge {c_ref * 1e3:.1f} ms")
        for net in nets.values():
            await m.delete_network(net.id, force=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100, help="containers per row")
    a = p.parse_args()
    asyncio.run(main(a.n))
