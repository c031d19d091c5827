"""Where an attach's time goes: a per-phase profile of a ``vnet-cni`` ADD and DEL and of
``create_endpoint(wait=True)`` through the whole stack, with the round trips counted.

Run as root from the repository root (a script, not a pytest module)::

    .venv/bin/python -m tests.bench.profile_attach            # 20 of each
    .venv/bin/python -m tests.bench.profile_attach --n 40

The control plane (ipam, network, endpoint, policy services) and a node worker serving its
CNI socket run in this process against a private nats-server and valkey, as in
``bench_cni.py``; this script wraps, for its own run only, the NATS client's request,
publish and subscribe, the Redis client's commands and the coroutines of each phase (the
CNI socket's handler, the endpoint service's create/remove and their steps, the node
worker's event handling, reconcile and status report), and prints for each kind of call:
every phase's median start and end (ms from the call's first phase) and duration, how often
it ran per call, and the NATS requests and Redis commands per call. Everything shares one
process and one event loop here, so phases that run on different hosts in production queue
behind each other: read the order and the counts, and the durations as upper bounds.

Everything lives in namespaces this script makes (``<prefix>-...``), removed at the end,
on error and on Ctrl-C; addresses 10.89.72-75.x exist only inside them.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import json
import os
import statistics
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import nats.aio.client as nats_client
import redis.asyncio as aioredis

from tests.bench.one_node import one_node
from tests.bench.scratch_ns import Scratch
from vnet.cli.cni import plugin_source

PREFIX = f"{os.environ.get('VNET_RUN_PREFIX') or 'vb' + uuid.uuid4().hex[:5]}-p"
NS = Scratch(PREFIX)
Span = tuple[float, float, str]
SPANS: list[Span] = []  # (start, end, phase) of the call being profiled
COUNTS: collections.Counter[str] = collections.Counter()


def _short(subject: str) -> str:
    """A subject without its ids: events by domain and verb; inboxes and JetStream's own dropped."""
    parts = subject.split(".")
    if subject.startswith("vnet.node.") and len(parts) > 4 and parts[3] == "evt":  # a node-addressed copy
        return ".".join(parts[:6])
    return ".".join(parts[:4]) if subject.startswith(("vnet.evt.", "vnet.metrics.report.")) else subject


def _timed(owner: Any, attr: str, phase: str) -> None:
    orig: Callable[..., Awaitable[Any]] = getattr(owner, attr)

    @functools.wraps(orig)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return await orig(*args, **kwargs)
        finally:
            SPANS.append((t, time.perf_counter(), phase))

    setattr(owner, attr, wrapper)


def _timed_sync(owner: Any, attr: str, phase: str) -> None:
    """Like :func:`_timed` for a blocking function (the node's kernel thread runs these)."""
    orig: Callable[..., Any] = getattr(owner, attr)

    @functools.wraps(orig)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return orig(*args, **kwargs)
        finally:
            SPANS.append((t, time.perf_counter(), phase))

    setattr(owner, attr, wrapper)


def instrument() -> None:
    """Wrap the clients and the phases (this process only)."""
    req, pub, sub = nats_client.Client.request, nats_client.Client.publish, nats_client.Client.subscribe

    async def request(self: Any, subject: str, *args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return await req(self, subject, *args, **kwargs)
        finally:
            COUNTS[f"NATS request {_short(subject)}"] += 1
            SPANS.append((t, time.perf_counter(), f"NATS request {_short(subject)}"))

    async def publish(self: Any, subject: str, *args: Any, **kwargs: Any) -> Any:
        if not subject.startswith(("_INBOX", "$JS")):  # replies and JetStream's acks and pulls
            COUNTS[f"NATS publish {_short(subject)}"] += 1
        return await pub(self, subject, *args, **kwargs)

    async def subscribe(self: Any, subject: str, *args: Any, **kwargs: Any) -> Any:
        COUNTS[f"NATS subscribe {_short(subject)}"] += 1
        return await sub(self, subject, *args, **kwargs)

    nats_client.Client.request = request  # type: ignore[method-assign]
    nats_client.Client.publish = publish  # type: ignore[method-assign]
    nats_client.Client.subscribe = subscribe  # type: ignore[method-assign]
    execute: Callable[..., Awaitable[Any]] = aioredis.Redis.execute_command

    async def command(self: Any, *args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return await execute(self, *args, **kwargs)
        finally:
            COUNTS[f"Redis {args[0]}"] += 1
            SPANS.append((t, time.perf_counter(), f"Redis {args[0]}"))

    aioredis.Redis.execute_command = command  # type: ignore[method-assign]
    from vnet.svc.endpoint import create as ep_create
    from vnet.svc.endpoint import events as ep_events
    from vnet.svc.endpoint import runtime_ops as ep_runtime
    from vnet.svc.node import cni, worker

    # Each function is wrapped where its caller looks it up (the CNI path: runtime_ops calls
    # create and remove, create calls the rest); the endpoint service's phases keep their names.
    for owner, attr in ((cni.CniServer, "handle"), (cni.CniServer, "_detach"), (ep_runtime, "create"),
                        (ep_runtime, "remove"), (ep_create, "_commit"), (ep_create, "_allocate"),
                        (ep_create, "_check_netns_on_node"), (ep_create, "_wait_status"),
                        (ep_create, "_listen"), (ep_events._StatusWaiter, "start"), (ep_events._StatusWaiter, "_cb"),
                        (worker.NodeWorker, "_on_endpoint_event"), (worker.NodeWorker, "_handle_events"),
                        (worker.NodeWorker, "_reconcile"), (worker.NodeWorker, "_report")):
        if not hasattr(owner, attr):  # a step an older tree does not have (profiles of two commits compare)
            continue
        name = getattr(owner, "__name__", "")
        label = "service" if name.startswith("vnet.svc.endpoint.") else name.rsplit(".", 1)[-1]
        _timed(owner, attr, f"{label}.{attr.lstrip('_')}")
    # The node's kernel thread, step by step: the policy delta, then observe, plan, apply.
    from vnet.adapters.netlink import apply as nl_apply
    from vnet.svc.node import policysync, reconcile
    for owner, attr, phase in ((policysync.PolicySync, "_push_policy", "kernel thread: nft delta"),
                               (reconcile.Reconciler, "observe", "kernel thread: observe"),
                               (reconcile, "plan", "kernel thread: plan"),
                               (nl_apply.Applier, "apply", "kernel thread: apply (netlink)")):
        _timed_sync(owner, attr, phase)


def report(title: str, runs: list[list[Span]], counts: collections.Counter[str], walls: list[float]) -> None:
    print(f"\n{title}: {len(runs)} calls, median wall {statistics.median(walls) * 1e3:.1f} ms (in this process)")
    print(f"  {'phase':<52}{'per call':>9}{'start ms':>10}{'end ms':>9}{'dur ms':>8}")
    by: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    for spans in runs:
        if spans:
            t0 = min(s[0] for s in spans)
            for a, b, phase in spans:
                by[phase].append((a - t0, b - t0))
    for phase in sorted(by, key=lambda p: statistics.median(x[0] for x in by[p])):
        xs = by[phase]
        start, end = statistics.median(x[0] for x in xs), statistics.median(x[1] for x in xs)
        dur = statistics.median(x[1] - x[0] for x in xs)
        print(f"  {phase:<52}{len(xs) / len(runs):>9.2f}{start * 1e3:>10.2f}{end * 1e3:>9.2f}{dur * 1e3:>8.2f}")
    print("  per call: " + ", ".join(f"{k} {v / len(runs):.2f}" for k, v in sorted(counts.items())))


def exec_cni(host: str, exe: str, cmd: str, conf: dict[str, Any], container: str, netns: str, cni_path: str) -> float:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": cmd, "CNI_CONTAINERID": container,
           "CNI_NETNS": f"/run/netns/{netns}", "CNI_IFNAME": "eth0", "CNI_PATH": cni_path}
    t0 = time.perf_counter()
    r = subprocess.run(["ip", "netns", "exec", host, exe], input=json.dumps(conf).encode(), env=env,
                       capture_output=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"{exe} {cmd} {container}: {r.stdout.decode()} {r.stderr.decode()}")
    return time.perf_counter() - t0


async def main(n: int) -> None:
    instrument()
    async with one_node(PREFIX, NS, lambda work: {"cni": "on", "cni_socket": str(work / "cni.sock")}) as st:
        work, m, host = st.work, st.m, st.host
        sock = str(work / "cni.sock")
        bindir = work / "bin"
        bindir.mkdir()
        shim = bindir / "vnet-cni"
        shim.write_text(plugin_source())
        shim.chmod(0o755)
        net = await m.create_network(f"{PREFIX}-full", "10.89.72.0/22", "10.89.72.1", "bridge", "full")
        conf = {"cniVersion": "1.1.0", "name": net.name, "type": "vnet-cni", "network": net.name, "socket": sock}
        conts = [NS.make(f"c{i}") for i in range(n + 1)]
        await asyncio.to_thread(exec_cni, host, str(shim), "ADD", conf, "warm", conts[n], str(bindir))
        for cmd, order in (("ADD", range(n)), ("DEL", range(n))):
            runs: list[list[Span]] = []
            counts: collections.Counter[str] = collections.Counter()
            walls = []
            for i in order:
                SPANS.clear()
                COUNTS.clear()
                walls.append(await asyncio.to_thread(exec_cni, host, str(shim), cmd, conf, f"c{i}", conts[i],
                                                     str(bindir)))
                await asyncio.sleep(0.05)  # what the call set going in the background is counted too
                runs.append(list(SPANS))
                counts.update(COUNTS)
            report(f"vnet-cni {cmd} (ip netns exec + shim + node)", runs, counts, walls)
        runs, counts, walls = [], collections.Counter(), []
        for c in [NS.make(f"e{i}") for i in range(n)]:
            SPANS.clear()
            COUNTS.clear()
            t = time.perf_counter()
            ep = await m.create_endpoint(c, net.id, labels={"app": "web"}, wait=True, wait_timeout=60)
            walls.append(time.perf_counter() - t)
            assert ep.status == "ready", ep
            await asyncio.sleep(0.05)
            runs.append(list(SPANS))
            counts.update(COUNTS)
        report("create_endpoint(wait=True), Full network", runs, counts, walls)
        await m.delete_network(net.id, force=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=20, help="calls of each kind")
    a = p.parse_args()
    asyncio.run(main(a.n))
