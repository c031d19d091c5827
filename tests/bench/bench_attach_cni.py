"""Attach and detach through the whole stack with isolation on, against the CNI reference
plugins — ONE table from one run.

Run as root from the repository root, as a module like the other benches (not a pytest module)::

    .venv/bin/python -m tests.bench.bench_attach_cni                 # 100 per row, growth to 1,000
    .venv/bin/python -m tests.bench.bench_attach_cni --n 40 --big 300

``tests/bench/profile_attach.py`` says where one attach's time goes (phases, round trips).

VNet: the processes ``vnetctl up`` starts (ipam, network, endpoint, policy services and a
node worker), each in a process of its own as ``vnetctl up`` runs them (``--layout one``:
all of them in this process, beside the client: one event loop and one GIL for everything,
as the runs before 3 Dec 16:00 UTC had them), against a private nats-server and valkey in a
temporary directory; every attach is ``create_endpoint(wait=True)`` (client -> endpoint service ->
IPAM -> event -> node worker -> kernel (one nft element transaction + netlink) -> status
-> client), every detach ``delete_endpoint(wait=True)``. CNI: the plugins of the
``containernetworking-plugins`` package (``/usr/lib/cni``) executed as a runtime executes
them — one process per plugin, started in the host namespace, config on stdin, a chain
run in order with ``prevResult`` (and in reverse for DEL) — ``bridge`` + ``host-local``,
and ``bridge`` + ``host-local`` + ``portmap`` + ``firewall`` for the row with a published
port. Each CNI ADD/DEL runs right after the VNet attach/detach of the same index, so
both see the same load on a shared machine, and each row's ratio is to its own CNI runs.
Runtime overhead of a real container engine (result cache, locks) is not counted for
CNI: the peer is flattered, not handicapped. The growth row also times the kernel's
share alone (veth + bridge port with ``ip``, interleaved) on a bridge of its own, and
once the 1,000 are in, detaches them all and times the first attaches once more: this
machine's speed drifts by up to 2x within minutes, so the 1,000th attach is also compared
with the mean of the first ones measured before it and after it.

Everything runs in namespaces this script makes (``<prefix>-...``; a VNet host, a CNI
host, one namespace per container), removed at the end, on error and on Ctrl-C;
addresses 10.141-10.147.x.x exist only inside them. Nothing touches the root namespace.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import functools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec

from vnet import VNetManager
from vnet.contracts.endpoint import EndpointInfo, PortMapping
from vnet.contracts.subjects import SERVICES  # every service `vnetctl up` runs, metrics included
from vnet.core.errors import VNetError
from vnet.core.policy import AllowRule, PortSpec, Selector
from vnet.runtime import launcher, servers, service
from vnet.runtime.config import VNetConfig

PREFIX = f"{os.environ.get('VNET_RUN_PREFIX') or 'vb' + uuid.uuid4().hex[:5]}-c"
CNI_PATH = "/usr/lib/cni"
_made: list[str] = []
_libc = ctypes.CDLL(None, use_errno=True)


def _batch(lines: list[str]) -> None:
    subprocess.run(["ip", "-batch", "-"], input="\n".join(lines) + "\n", text=True, check=True, capture_output=True)


def namespaces(tag: str, n: int) -> list[str]:
    names = [f"{PREFIX}-{tag}{i}" for i in range(n)]
    _made.extend(names)
    for k in range(0, n, 200):
        _batch([f"netns add {x}" for x in names[k:k + 200]])
    return names


def cleanup() -> None:
    names = list(reversed(_made))
    _made.clear()
    for ns in names:
        for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
    for k in range(0, len(names), 200):
        subprocess.run(["ip", "-force", "-batch", "-"], input="".join(f"netns del {x}\n" for x in names[k:k + 200]),
                       text=True, capture_output=True)


def _on_signal(signum: int, frame: object) -> None:
    cleanup()
    sys.exit(128 + signum)


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


# ----------------------------------------------------------------------------- CNI, as a runtime runs it


class Cni:
    """A plugin chain run the way libcni runs a conflist (no result cache, no locks).

    A runtime (containerd, podman; Go) starts each plugin with ``clone(CLONE_VM|CLONE_VFORK)``
    from a thread of its own in the host namespace. So does this: :meth:`add` and
    :meth:`delete` run on :attr:`executor`, whose one thread entered the CNI host namespace
    once, and ``subprocess`` starts the plugin with ``vfork``, in that thread's namespace.
    Entering the namespace in the child instead (``preexec_fn``) makes Python ``fork`` this
    whole process: 5-7 ms more per plugin here than ``vfork`` (0.7-1 ms), which counted into
    every CNI ADD/DEL of the runs before 4 Dec 19:00 UTC (CNI ADD 15-21 ms then) and
    flattered VNet's ratios."""

    def __init__(self, host_ns: str, name: str, plugins: list[dict[str, Any]], data_dir: Path, *,
                 fork: bool = False) -> None:
        self.host_fd = os.open(f"/run/netns/{host_ns}", os.O_RDONLY | os.O_CLOEXEC)
        self.fork = fork  # ``--cni-start fork``: as the runs before 4 Dec 19:00 UTC did (the docstring)
        self.name = name
        self.plugins = plugins
        self.data_dir = data_dir
        self.results: dict[str, dict[str, Any]] = {}
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"cni-{name}",
                                                              initializer=None if fork else self._enter)
        self.executor.submit(lambda: None).result()  # entered now: a failure shows here, not in a row

    def _setns(self) -> int:
        """Enter the CNI host namespace (this thread only): 0, or the errno."""
        return 0 if _libc.setns(self.host_fd, 0x40000000) == 0 else ctypes.get_errno()

    def _enter(self) -> None:  # the executor's thread, once: the plugins it starts inherit the namespace
        if err := self._setns():
            raise OSError(err, f"setns into the CNI host namespace: {os.strerror(err)}")

    def _enter_child(self) -> None:  # ``fork``: in the forked child, before exec
        if self._setns():
            os._exit(99)

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        os.close(self.host_fd)

    def _run(self, plugin: dict[str, Any], cmd: str, cid: str, netns: str, prev: dict[str, Any] | None,
             runtime: dict[str, Any] | None) -> dict[str, Any]:
        conf: dict[str, Any] = {"cniVersion": "1.0.0", "name": self.name, **plugin}
        if prev is not None:
            conf["prevResult"] = prev
        if runtime is not None and plugin.get("capabilities"):
            conf["runtimeConfig"] = runtime
        env = {"CNI_COMMAND": cmd, "CNI_CONTAINERID": cid, "CNI_NETNS": f"/run/netns/{netns}", "CNI_IFNAME": "eth0",
               "CNI_PATH": CNI_PATH, "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
        r = subprocess.run([f"{CNI_PATH}/{plugin['type']}"], input=json.dumps(conf), env=env, capture_output=True,
                           text=True, preexec_fn=self._enter_child if self.fork else None)
        if r.returncode != 0:
            raise RuntimeError(f"CNI {plugin['type']} {cmd}: {r.stdout.strip()} {r.stderr.strip()}")
        return json.loads(r.stdout) if r.stdout.strip() else {}

    def add(self, cid: str, netns: str, runtime: dict[str, Any] | None = None) -> None:
        prev: dict[str, Any] | None = None
        for p in self.plugins:
            prev = self._run(p, "ADD", cid, netns, prev, runtime)
        assert prev is not None
        self.results[cid] = prev

    def delete(self, cid: str, netns: str, runtime: dict[str, Any] | None = None) -> None:
        prev = self.results.pop(cid)
        for p in reversed(self.plugins):
            self._run(p, "DEL", cid, netns, prev, runtime)


def cni_host(work: Path, fork: bool = False) -> tuple[Cni, Cni]:
    """The CNI host namespace and its two chains (each with its own bridge and pool)."""
    host = namespaces("cnih", 1)[0]
    subprocess.run(["ip", "-n", host, "link", "set", "lo", "up"], check=True)
    plain = Cni(host, "bench-a", [
        {"type": "bridge", "bridge": "cnibr0", "isGateway": True, "ipMasq": False,
         "ipam": {"type": "host-local", "subnet": "10.145.0.0/16", "dataDir": str(work / "cni-a")}}], work, fork=fork)
    chain = Cni(host, "bench-b", [
        {"type": "bridge", "bridge": "cnibr1", "isGateway": True, "ipMasq": False,
         "ipam": {"type": "host-local", "subnet": "10.146.0.0/16", "dataDir": str(work / "cni-b")}},
        {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
        {"type": "firewall"}], work, fork=fork)
    return plain, chain


class IpRef:
    """The kernel's share: the same host-side wiring (veth, bridge port, up) with one ``ip -batch``
    per container on a bridge of its own, to tell kernel growth from ours."""

    def __init__(self) -> None:
        self.ns = namespaces("ipref", 1)[0]
        subprocess.run(["ip", "-n", self.ns, "-batch", "-"], check=True, text=True, capture_output=True,
                       input="link add br0 type bridge\nlink set br0 up\n")
        self.k = 0

    def reset(self) -> None:
        """Every veth gone again (the bridge stays)."""
        cmds = "".join(f"link del v{k}\n" for k in range(1, self.k + 1))
        subprocess.run(["ip", "-n", self.ns, "-batch", "-"], check=True, text=True, capture_output=True, input=cmds)

    def add(self) -> float:
        self.k += 1
        k = self.k
        t = time.perf_counter()
        subprocess.run(["ip", "-n", self.ns, "-batch", "-"], check=True, text=True, capture_output=True,
                       input=f"link add v{k} type veth peer name p{k}\nlink set v{k} master br0\nlink set v{k} up\n")
        return time.perf_counter() - t


def underlay(hosts: int, tag: str = "") -> list[str]:
    """``hosts`` host namespaces joined by a switch namespace (10.250.0.k/24 on ul0)."""
    ul = namespaces(f"ul{tag}", 1)[0]
    cmds = ["link add br0 type bridge mcast_snooping 0", "link set br0 up"]
    subprocess.run(["ip", "-n", ul, "-batch", "-"], input="\n".join(cmds) + "\n", text=True, check=True,
                   capture_output=True)
    hs = namespaces(f"xh{tag}", hosts)
    for k, h in enumerate(hs, 1):
        subprocess.run(["ip", "-n", ul, "link", "add", f"u{k}", "type", "veth", "peer", "name", "ul0", "netns", h],
                       check=True, capture_output=True)
        subprocess.run(["ip", "-n", ul, "link", "set", f"u{k}", "master", "br0", "up"], check=True, capture_output=True)
        subprocess.run(["ip", "-n", h, "-batch", "-"], text=True, check=True, capture_output=True,
                       input=f"link set lo up\naddr add 10.250.0.{k}/24 dev ul0\nlink set ul0 up\n")
    return hs


def service_process(cfg: VNetConfig, work: Path, name: str, args: list[str] | None = None) -> subprocess.Popen[bytes]:
    """A service (or, with ``name`` "node", a node worker) in a process of its own, as ``vnetctl up`` runs it."""
    env = {**os.environ, **cfg.to_env()}
    env.pop("VNET_CONFIG", None)
    log = open(work / f"{name}.log", "ab")  # noqa: SIM115 (closed with the process's end)
    return subprocess.Popen([sys.executable, "-m", "vnet.runtime.launcher", name, *(args or [])], env=env,
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            preexec_fn=servers._die_with_parent)


@dataclasses.dataclass
class WebStack:
    m: VNetManager
    network_id: str
    containers: list[str]  # namespaces not attached yet
    procs: list[subprocess.Popen[bytes]]  # ipam, network, endpoint, policy, node


@contextlib.asynccontextmanager
async def web_stack(n: int, pre: int = 0) -> AsyncIterator[WebStack]:
    """The whole stack as ``vnetctl up`` runs it (each service and one node worker, resync
    60 s, in a process of its own, on a private nats-server and valkey), a Full network with
    an allow rule selecting ``app=web``, its first three endpoints attached (they make the
    bridge and the rules), ``pre`` more attached (a node that already has them), and ``n``
    container namespaces more; everything goes at the end."""
    work = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-"))
    valkey = servers.start_valkey(work / "valkey")
    nats = servers.start_nats(work / "nats")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        cfg = VNetConfig.load(env={}, nats_url=nats.url, redis_url=valkey.url, metrics_http_port=0,
                              log_level="WARNING")
        host = (await asyncio.to_thread(namespaces, "h", 1))[0]
        node = f"{PREFIX}-n1"
        procs = [service_process(cfg, work, name) for name in SERVICES]
        procs.append(service_process(cfg, work, "node", ["--node-id", node, "--host-netns", host, "--resync", "60"]))
        async with VNetManager(cfg) as m:
            for _ in range(1200):
                with contextlib.suppress(VNetError):
                    if any(x.node == node for x in await m.nodes()):
                        break
                await asyncio.sleep(0.05)
            await m.put_rule(AllowRule(id="web", from_=[Selector(labels={"app": "web"})],
                                       to=[Selector(labels={"app": "web"})], ports=[PortSpec(protocol="tcp", port=80)]))
            net = await m.create_network("t-full", "10.142.0.0/22" if n + pre < 1000 else "10.142.0.0/19", None,
                                         "bridge", "full")
            cs = await asyncio.to_thread(namespaces, "t", n + 3 + pre)
            for c in cs[:3 + pre]:
                await m.create_endpoint(c, net.id, labels={"app": "web"}, wait=True, wait_timeout=60)
            yield WebStack(m, net.id, cs[3 + pre:], procs)
    finally:
        stop_processes(procs)
        nats.stop()
        valkey.stop()
        cleanup()
        shutil.rmtree(work, ignore_errors=True)


def stop_processes(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM to every one, then wait (SIGKILL after 30 s)."""
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def node_process(cfg: VNetConfig, work: Path, node: str, host_ns: str, k: int) -> subprocess.Popen[bytes]:
    """A node worker in a process of its own, as on a host of its own (``vnet-node``)."""
    env = {**os.environ, **cfg.to_env()}
    env.pop("VNET_CONFIG", None)
    log = open(work / f"{node}.log", "ab")  # noqa: SIM115 (closed with the process's end)
    return subprocess.Popen([sys.executable, "-m", "vnet.runtime.launcher", "node", "--node-id", node,
                             "--host-netns", host_ns, "--underlay", f"10.250.0.{k}", "--underlay-ifname", "ul0",
                             "--resync", "60"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, preexec_fn=servers._die_with_parent)


CROSS_PACE_S = 0.05


async def cross_host(m: VNetManager, cfg: VNetConfig, rts: list[service.Runtime], n: int, work: Path,
                     procs: list[subprocess.Popen[bytes]] | None = None) -> dict[str, Any]:
    """Overlay attaches on one host vs spread over three (every other host learns each one).

    ``procs`` None: the three hosts' node workers run in this process, beside the services
    and the client (one event loop, one GIL: each remote host's work for an attach delays
    the attaching host's, which real hosts do not); else each in a process of its own (as
    on hosts of their own), appended to ``procs`` for the caller to stop."""
    tag = "" if procs is None else "p"
    hs = await asyncio.to_thread(underlay, 3, tag)
    nodes = [f"{PREFIX}-x{tag}{k}" for k in range(1, 4)]
    for k, (h, node) in enumerate(zip(hs, nodes, strict=True), 1):
        if procs is None:
            rts.append(await service.start(launcher.load_service("node"), msgspec.structs.replace(cfg, host_netns=h),
                                           params={"node": node, "underlay": f"10.250.0.{k}",
                                                   "underlay_ifname": "ul0", "resync_s": "60"}))
        else:
            procs.append(node_process(cfg, work, node, h, k))
    for _ in range(1200):
        if set(nodes) <= {x.node for x in await m.nodes()}:
            break
        await asyncio.sleep(0.05)
    base = 148 if procs is None else 150
    one = await m.create_network(f"b-ov1{tag}", f"10.{base}.0.0/22", None, "overlay", "full")
    three = await m.create_network(f"b-ov3{tag}", f"10.{base + 1}.0.0/22", None, "overlay", "full")
    warm = await asyncio.to_thread(namespaces, f"xw{tag}", 4)  # each network in play on its hosts first
    for c, (net, node) in zip(warm, [(one, nodes[0]), (three, nodes[0]), (three, nodes[1]), (three, nodes[2])],
                              strict=True):
        ep = await m.create_endpoint(c, net.id, node=node, labels={"app": "web"}, wait=True, wait_timeout=60)
        assert ep.status == "ready", ep
    out: dict[str, Any] = {}
    # Two passes. Back to back, the other hosts' work for an attach (its FDB, neighbour and
    # address-set entries) runs while the next attach does, on the same 2 cores: three hosts
    # here share one machine's CPUs, which hosts of their own do not. Paced, each attach is
    # followed by CROSS_PACE_S outside the timed window, so that work is done before the next.
    for pace in (0.0, CROSS_PACE_S):
        for key, net, spread in (("single", one, False), ("cross", three, True)):
            cs = await asyncio.to_thread(namespaces, f"x{tag}{key}{'p' if pace else ''}", n)
            lat: list[float] = []
            for i, c in enumerate(cs):
                t = time.perf_counter()
                ep = await m.create_endpoint(c, net.id, node=nodes[i % 3] if spread else nodes[0],
                                             labels={"app": "web"}, wait=True, wait_timeout=60)
                lat.append(time.perf_counter() - t)
                assert ep.status == "ready", ep
                if pace:
                    await asyncio.sleep(pace)
            out[(key, pace)] = lat
    # every host has the others' entries (FDB) and the others' addresses in its rule's set
    t0 = time.perf_counter()
    want = 2 * n + 3  # the cross row's containers (both passes) and the three warm ones
    while True:
        counts = [await asyncio.to_thread(fdb_count, h) for h in hs]
        expect = [want - 2 * (n // 3 + (1 if k < n % 3 else 0)) - 1 for k in range(3)]
        if counts == expect or time.perf_counter() - t0 > 30:
            break
        await asyncio.sleep(0.05)
    out["fdb"] = (counts, expect, time.perf_counter() - t0)
    return out


def fdb_count(ns: str) -> int:
    r = subprocess.run(["bridge", "-j", "-n", ns, "fdb", "show"], check=True, capture_output=True, text=True)
    return sum(1 for e in json.loads(r.stdout or "[]") if e.get("dst") and "permanent" in e.get("state", ""))


# ----------------------------------------------------------------------------- VNet through the stack


async def vnet_rows(n: int, big: int, parallel: int, work: Path, cross: int, layout: str,
                    cni_fork: bool = False) -> dict[str, Any]:
    """Every VNet row, with the CNI peer interleaved container by container (the same load
    for both on a shared machine). ``layout`` "processes": each service and the node worker
    in a process of its own, as ``vnetctl up`` runs them; "one": all of them in this
    process, beside the client (one event loop and one GIL for everything)."""
    plain, chain = await asyncio.to_thread(cni_host, work, cni_fork)
    valkey = servers.start_valkey(work / "valkey")
    nats = servers.start_nats(work / "nats")
    rts: list[service.Runtime] = []
    procs: list[subprocess.Popen[bytes]] = []
    res: dict[str, Any] = {}
    try:
        cfg = VNetConfig.load(env={}, nats_url=nats.url, redis_url=valkey.url, metrics_http_port=0,
                              log_level="WARNING")
        host = (await asyncio.to_thread(namespaces, "h", 1))[0]
        node = f"{PREFIX}-n1"
        if layout == "one":
            for name in SERVICES:
                rts.append(await service.start(launcher.load_service(name), cfg))
            rts.append(await service.start(launcher.load_service("node"),
                                           msgspec.structs.replace(cfg, host_netns=host),
                                           params={"node": node, "resync_s": "60"}))
        else:
            for name in SERVICES:
                procs.append(service_process(cfg, work, name))
            procs.append(service_process(cfg, work, "node", ["--node-id", node, "--host-netns", host,
                                                             "--resync", "60"]))
        async with VNetManager(cfg) as m:
            for _ in range(1200):
                with contextlib.suppress(VNetError):  # the services are still starting
                    if any(x.node == node for x in await m.nodes()):
                        break
                await asyncio.sleep(0.05)
            else:
                raise RuntimeError(f"node {node} did not register in 60 s (logs in {work})")
            await m.put_rule(AllowRule(id="web", from_=[Selector(labels={"app": "web"})],
                                       to=[Selector(labels={"app": "web"})], ports=[PortSpec(protocol="tcp", port=80)]))
            nets = {"none": await m.create_network("b-none", "10.141.0.0/22", None, "bridge", "none"),
                    "full": await m.create_network("b-full", "10.142.0.0/22", None, "bridge", "full"),
                    "pub": await m.create_network("b-pub", "10.143.0.0/22", None, "bridge", "full")}
            # every network in play on the node first (a network's first endpoint writes its bridge
            # pairs: counted once, not in the rows)
            warm = await asyncio.to_thread(namespaces, "w", len(nets))
            warm_eps = [await m.create_endpoint(c, nt.id, wait=True, wait_timeout=60)
                        for c, nt in zip(warm, nets.values(), strict=True)]
            assert all(e.status == "ready" for e in warm_eps), warm_eps

            async def applies() -> int:
                st = await m.node_stats(node)
                return st.policy.applies if st.policy else -1

            async def timed(cni: Cni, fn: Callable[[], None]) -> float:
                # on the chain's own thread, in the host namespace (Cni's docstring)
                loop = asyncio.get_running_loop()
                t = time.perf_counter()
                await loop.run_in_executor(cni.executor, fn)
                return time.perf_counter() - t

            async def row(key: str, tag: str, labels: dict[str, str], ports: Callable[[int], list[PortMapping]],
                          cni: Cni) -> None:
                cs = await asyncio.to_thread(namespaces, tag, n)
                ccs = await asyncio.to_thread(namespaces, f"{tag}-cni", n)
                pub = bool(ports(0))

                def rt(i: int) -> dict[str, Any] | None:
                    return ({"portMappings": [{"hostPort": 21000 + i, "containerPort": 80, "protocol": "tcp"}]}
                            if pub else None)

                a0 = await applies()
                lat: list[float] = []
                cadd: list[float] = []
                eps = []
                for i, c in enumerate(cs):
                    t = time.perf_counter()
                    ep = await m.create_endpoint(c, nets[key].id, labels=labels, ports=ports(i), wait=True,
                                                 wait_timeout=60)
                    lat.append(time.perf_counter() - t)
                    assert ep.status == "ready", ep
                    eps.append(ep)
                    cadd.append(await timed(cni, functools.partial(cni.add, f"{tag}{i}", ccs[i], rt(i))))
                a1 = await applies()
                dl: list[float] = []
                cdel: list[float] = []
                for i, ep in enumerate(eps):
                    t = time.perf_counter()
                    await m.delete_endpoint(ep.id, wait=True)
                    dl.append(time.perf_counter() - t)
                    cdel.append(await timed(cni, functools.partial(cni.delete, f"{tag}{i}", ccs[i], rt(i))))
                a2 = await applies()
                res[tag] = (lat, dl, (a1 - a0) / n, (a2 - a1) / n, cadd, cdel)

            await row("none", "none", {}, lambda i: [], plain)
            await row("full", "full", {"app": "web"}, lambda i: [], plain)
            await row("pub", "pub", {"app": "web"},
                      lambda i: [PortMapping(host_port=20000 + i, container_port=80, protocol="tcp")], chain)

            # throughput, 16 in flight, full network with the rule
            cs = await asyncio.to_thread(namespaces, "par", n)
            sem = asyncio.Semaphore(parallel)
            a0 = await applies()

            async def one(c: str) -> None:
                async with sem:
                    ep = await m.create_endpoint(c, nets["full"].id, labels={"app": "web"}, wait=True, wait_timeout=60)
                    assert ep.status == "ready", ep

            t0 = time.perf_counter()
            await asyncio.gather(*(one(c) for c in cs))
            res["par"] = (n / (time.perf_counter() - t0), (await applies() - a0))

            if cross:
                if layout == "one":
                    res["x"] = await cross_host(m, cfg, rts, cross, work)
                res["xp"] = await cross_host(m, cfg, rts, cross, work, procs)

            # growth: the 1,000th attach vs the 10th on one node (full network + the rule)
            if big:
                w = growth_window(big)
                bnet = await m.create_network("b-big", "10.144.0.0/20", None, "bridge", "full")
                cs = await asyncio.to_thread(namespaces, "big", big + w)
                ref = await asyncio.to_thread(IpRef)
                glat: list[float] = []
                gref: list[float] = []
                eps: list[EndpointInfo] = []

                async def grow(c: str) -> None:
                    t = time.perf_counter()
                    ep = await m.create_endpoint(c, bnet.id, node=node, labels={"app": "web"}, wait=True,
                                                 wait_timeout=60)
                    glat.append(time.perf_counter() - t)
                    assert ep.status == "ready", ep
                    eps.append(ep)
                    gref.append(await asyncio.to_thread(ref.add))

                for c in cs[:big]:
                    await grow(c)
                # a resync of everything unchanged: zero writes
                st0 = await m.node_stats(node)
                st = await m.node_resync(node, timeout=120)
                assert st.policy is not None and st0.policy is not None
                res["resync"] = (st.last_full_writes, st.last_full_duration_s, st.policy.applies - st0.policy.applies,
                                 st.endpoints, st.policy.last_reason)
                # back down to none, and the first attaches once more: the machine's speed drifts
                # within minutes, so the 1,000th is compared with the first ones measured both
                # before it and after it
                dsem = asyncio.Semaphore(8)

                async def down(ep: EndpointInfo) -> None:
                    async with dsem:
                        await m.delete_endpoint(ep.id, wait=True)

                await asyncio.gather(*(down(ep) for ep in eps))
                await asyncio.to_thread(ref.reset)
                for c in cs[big:]:
                    await grow(c)
                res["big"] = (glat, gref, w)
    finally:
        stop_processes(procs)
        for rt in reversed(rts):
            await rt.stop(drain_timeout=2.0)
        nats.stop()
        valkey.stop()
        plain.close()
        chain.close()
    return res


def growth_window(big: int) -> int:
    """How many attaches the growth row's medians take at each end."""
    return max(5, min(20, big // 10))


def main(n: int, big: int, parallel: int, cross: int, layout: str, cni_start: str = "thread") -> None:
    work = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-"))
    try:
        v = asyncio.run(vnet_rows(n, big, parallel, work, cross, layout, cni_start == "fork"))
    finally:
        cleanup()
        shutil.rmtree(work, ignore_errors=True)
    ms = 1e3
    cadd = v["none"][4] + v["full"][4]
    cdel = v["none"][5] + v["full"][5]
    padd, pdel = v["pub"][4], v["pub"][5]
    cni_rate = len(cadd) / sum(cadd)
    how = ("each service and the node worker in a process of its own (as vnetctl up)" if layout == "processes"
           else "every service, the node worker and the client in one process")
    print(f"\nAttach/detach through the whole stack vs CNI, {n} containers per row, one node, "
          f"{os.cpu_count()} cores, one run; {how}"
          + ("; CNI plugins started by fork + setns in the child (--cni-start fork: not as a runtime does)"
             if cni_start == "fork" else "") + "\n")
    hdr = (f"{'row':<44}{'attach med':>11}{'p99':>8}{'detach med':>11}{'p99':>8}"
           f"{'att/CNI':>9}{'det/CNI':>9}{'nft tx/att':>11}")
    print(hdr)
    print("-" * len(hdr))

    def line(label: str, a: list[float], d: list[float], ra: list[float], rd: list[float], tx: str) -> None:
        print(f"{label:<44}{statistics.median(a) * ms:>9.1f}ms{pct(a, .99) * ms:>6.1f}ms"
              f"{statistics.median(d) * ms:>9.1f}ms{pct(d, .99) * ms:>6.1f}ms"
              f"{statistics.median(a) / statistics.median(ra):>8.2f}x"
              f"{statistics.median(d) / statistics.median(rd):>8.2f}x"
              f"{tx:>11}")

    for tag, label in (("none", "VNet bridge, None network"),
                       ("full", "VNet bridge, Full network + 1 allow rule"),
                       ("pub", "VNet bridge, Full + 1 published port each")):
        lat, dl, tx_a, tx_d, ra, rd = v[tag]  # ratios to the CNI runs interleaved with this row
        line(label, lat, dl, ra, rd, f"{tx_a:.2f}/{tx_d:.2f}")
    line("CNI bridge + host-local", cadd, cdel, cadd, cdel, "-")
    line("CNI bridge + host-local + portmap + firewall", padd, pdel, padd, pdel, "-")
    rate, tx = v["par"]
    print(f"\nattach throughput, {parallel} in flight (Full + rule): {rate:.1f}/s = {rate / cni_rate:.2f}x CNI "
          f"bridge+host-local sequential ({cni_rate:.1f}/s); {tx} nft transactions for {n} attaches (coalesced)")
    for key, how in (("x", "hosts' node workers in this process"), ("xp", "a node worker process per host")):
        if key not in v:
            continue
        x = v[key]
        for pace in (0.0, CROSS_PACE_S):
            single, cross = x[("single", pace)], x[("cross", pace)]
            sm, cm = statistics.median(single), statistics.median(cross)
            paced = (f"each followed by {pace * ms:.0f} ms (the other hosts' work done first, as on hosts with "
                     "CPUs of their own)" if pace else "back to back")
            print(f"overlay (Full), {len(cross)} attaches, {how}, {paced}: all on one host median {sm * ms:.1f} ms "
                  f"(p99 {pct(single, .99) * ms:.1f}), spread over 3 hosts median {cm * ms:.1f} ms "
                  f"(p99 {pct(cross, .99) * ms:.1f}): {cm / sm:.2f}x")
        counts, expect, dt = x["fdb"]
        print(f"  remote FDB entries per host {counts} (expected {expect}) {dt * ms:.0f} ms after the last ready")
    if "big" in v:
        g, gr, w = v["big"]
        big = len(g) - w
        first, last, again = (statistics.median(g[:w]), statistics.median(g[big - w:big]),
                              statistics.median(g[big:]))
        rf, rl, ra = (statistics.median(gr[:w]), statistics.median(gr[big - w:big]), statistics.median(gr[big:]))
        print(f"growth (Full + rule, one network, one bridge): attaches 1-{w} median {first * ms:.1f} ms, attaches "
              f"{big - w + 1}-{big} median {last * ms:.1f} ms, attaches 1-{w} again after detaching all "
              f"{again * ms:.1f} ms: {last / first:.2f}x the first, {last / ((first + again) / 2):.2f}x the mean "
              f"of before and after; the kernel alone (veth + bridge port with ip, interleaved): {rf * ms:.1f} -> "
              f"{rl * ms:.1f} -> {ra * ms:.1f} ms: {rl / rf:.2f}x, {rl / ((rf + ra) / 2):.2f}x")
        writes, dur, tx, eps, reason = v["resync"]
        print(f"resync of {eps} unchanged endpoints: {writes} netlink writes, {tx} nft transactions "
              f"({reason}), {dur * ms:.0f} ms")
    print("\nattach/detach: create_endpoint(wait=True) / delete_endpoint(wait=True) to 'ready'/'deleted'; CNI: ADD/DEL "
          "of the chain, run right after each VNet attach/detach (same load); att/CNI, det/CNI: ratios of the medians "
          "to the CNI runs interleaved with that row; nft tx/att: policy transactions per attach/detach on the node")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100, help="containers per row (default 100)")
    ap.add_argument("--big", type=int, default=1000, help="attaches for the growth row (0: skip)")
    ap.add_argument("--parallel", type=int, default=16, help="attaches in flight for the throughput row")
    ap.add_argument("--cross", type=int, default=60, help="attaches for the cross-host row (0: skip)")
    ap.add_argument("--layout", choices=("processes", "one"), default="processes",
                    help="processes (default): each service and the node worker in a process of its own, as "
                         "`vnetctl up` runs them; one: all of them in this process, beside the client")
    ap.add_argument("--cni-start", choices=("thread", "fork"), default="thread",
                    help="thread (default): each CNI plugin started with vfork from a thread in the host "
                         "namespace, as a runtime starts it; fork: fork this process and enter the namespace in "
                         "the child, as the runs before 4 Dec 19:00 UTC did (5-7 ms more per plugin here)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: it makes network namespaces")
    if not os.path.exists(f"{CNI_PATH}/bridge"):
        sys.exit(f"the CNI reference plugins are not in {CNI_PATH}: apt-get install containernetworking-plugins")
    atexit.register(cleanup)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    main(args.n, args.big, args.parallel, args.cross, args.layout, args.cni_start)
