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
namespace of this script for both), the conf on stdin, CNI_* in the environment; DEL
right after, in reverse order of the ADDs. Cold start: ``VERSION`` of each executable,
exec'd directly.

Everything lives in namespaces this script makes (``<prefix>-...``), removed at the end,
on error and on Ctrl-C; addresses 10.89.60-62.x exist only inside them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from tests.bench.scratch_ns import Scratch
from vnet import VNetManager
from vnet.cli.cni import plugin_source
from vnet.runtime import launcher, servers, service
from vnet.runtime.config import VNetConfig

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
        raise RuntimeError(f"{exe} {cmd} {container}: {r.stdout.decode()} {r.stderr.decode()}")
    return took


def cold(exe: str, n: int = 40) -> float:
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run([exe], input=b'{"cniVersion":"1.0.0"}', env={"CNI_COMMAND": "VERSION"}, capture_output=True,
                       check=True)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def row(conts: list[str], host: str, exe: str, conf: dict[str, Any], cni_path: str) -> tuple[list[float], list[float]]:
    adds = [call(host, exe, "ADD", conf, f"c{i}", f"/run/netns/{c}", cni_path) for i, c in enumerate(conts)]
    dels = [call(host, exe, "DEL", conf, f"c{i}", f"/run/netns/{c}", cni_path)
            for i, c in reversed(list(enumerate(conts)))]
    return adds, dels


async def main(n: int) -> None:
    if not (REF / "bridge").exists():
        raise SystemExit("the reference plugins are not installed (apt-get install containernetworking-plugins)")
    work = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-"))
    valkey = servers.start_valkey(work / "valkey")
    nats = servers.start_nats(work / "nats")
    rts: list[service.Runtime] = []
    try:
        cfg = VNetConfig.load(env={}, nats_url=nats.url, redis_url=valkey.url, metrics_http_port=0,
                              log_level="WARNING")
        for name in ("ipam", "network", "endpoint", "policy"):
            rts.append(await service.start(launcher.load_service(name), cfg))
        vhost, chost = NS.make("vh"), NS.make("ch")
        node = f"{PREFIX}-n"
        sock = str(work / "cni.sock")
        rts.append(await service.start(
            launcher.load_service("node"),
            VNetConfig.load(env={}, nats_url=nats.url, redis_url=valkey.url, metrics_http_port=0,
                            log_level="WARNING", host_netns=vhost),
            params={"node": node, "resync_s": "600", "cni": "on", "cni_socket": sock}))
        bindir = work / "bin"
        bindir.mkdir()
        shim = bindir / "vnet-cni"
        shim.write_text(plugin_source())
        shim.chmod(0o755)
        async with VNetManager(cfg) as m:
            for _ in range(200):
                if any(x.node == node for x in await m.nodes()):
                    break
                await asyncio.sleep(0.05)
            nets = {"none": await m.create_network(f"{PREFIX}-none", "10.89.60.0/22", "10.89.60.1", "bridge",
                                                   "none"),
                    "full": await m.create_network(f"{PREFIX}-full", "10.89.64.0/22", "10.89.64.1", "bridge",
                                                   "full")}
            conts = [NS.make(f"x{i}") for i in range(n)]
            results: dict[str, tuple[list[float], list[float]]] = {}
            ref_conf = {"cniVersion": "1.0.0", "name": "ref", "type": "bridge", "bridge": "cnibr0",
                        "isGateway": True, "ipMasq": False,
                        "ipam": {"type": "host-local", "subnet": "10.89.68.0/22", "dataDir": str(work / "hl")}}
            # warm both paths once (page cache, the first netns), then measure in turns
            await asyncio.to_thread(row, conts[:2], chost, str(REF / "bridge"), ref_conf, str(REF))
            results["bridge + host-local"] = await asyncio.to_thread(row, conts, chost, str(REF / "bridge"), ref_conf,
                                                                     str(REF))
            for mode, net in nets.items():
                conf = {"cniVersion": "1.1.0", "name": net.name, "type": "vnet-cni", "network": net.name,
                        "socket": sock}
                results[f"vnet-cni, {mode} network"] = await asyncio.to_thread(row, conts, vhost, str(shim), conf,
                                                                                str(bindir))
            c_ref = cold(str(REF / "bridge"))
            c_shim = cold(str(shim))
            base_add = statistics.median(results["bridge + host-local"][0])
            base_del = statistics.median(results["bridge + host-local"][1])
            print(f"\nCNI ADD/DEL, {n} containers per row, one run, exec'd as a runtime does (ip netns exec)\n")
            print("| plugin | ADD median | ADD p99 | DEL median | DEL p99 |")
            print("|---|---|---|---|---|")
            for label, (adds, dels) in results.items():
                a, d = statistics.median(adds), statistics.median(dels)
                print(f"| {label} | {a * 1e3:.1f} ms ({a / base_add:.2f}x) | {pct(adds, 0.99) * 1e3:.1f} ms | "
                      f"{d * 1e3:.1f} ms ({d / base_del:.2f}x) | {pct(dels, 0.99) * 1e3:.1f} ms |")
            print(f"\ncold start (VERSION, exec'd directly, median of 40): vnet-cni shim {c_shim * 1e3:.1f} ms, "
                  f"bridge {c_ref * 1e3:.1f} ms")
            for net in nets.values():
                await m.delete_network(net.id, force=True)
    finally:
        for rt in reversed(rts):
            await rt.stop(drain_timeout=2.0)
        NS.cleanup()
        nats.stop()
        valkey.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100, help="containers per row")
    a = p.parse_args()
    asyncio.run(main(a.n))
