"""How much CPU one attach costs, process by process, with each service and the node worker in
a process of its own (as ``vnetctl up`` runs them).

Run as root from the repository root::

    .venv/bin/python -m tests.bench.cpu_attach            # 150 attaches
    .venv/bin/python -m tests.bench.cpu_attach --n 300
    .venv/bin/python -m tests.bench.cpu_attach --n 100 --pre 900   # on a node with 903 already

``create_endpoint(wait=True)`` on a Full network with an allow rule selecting the endpoint,
one at a time; the user and system CPU time every process of the stack spent (read from
``/proc/<pid>/stat`` before and after: the services, the node worker and each of its
threads, nats-server, valkey, this client) divided by the attaches. Why it matters: a
sequential attach is a chain of hops between processes, but on a machine with few cores
the sum of their CPU is a floor under the wall time. If the stack spends C ms of CPU per
attach on k cores, no overlap of steps gets an attach under C/k ms; the wall time of the
reference CNI plugins is what C/k must be compared with (``docs/dataplane.md``, "CPU per
attach").

Everything runs in namespaces this script makes (``<prefix>-...``), removed at the end;
nothing touches the root namespace and no packet leaves them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from pathlib import Path

from tests.bench import bench_attach_cni as B

HZ = os.sysconf("SC_CLK_TCK")


def cpu(path: str) -> tuple[float, float]:
    """(user, system) seconds of a process or thread (``/proc/<pid>`` or ``/proc/<pid>/task/<tid>``)."""
    try:
        f = Path(path, "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    return int(f[11]) / HZ, int(f[12]) / HZ


def children() -> set[int]:
    """This process's children (the servers and the services)."""
    me, out = os.getpid(), set()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(Path("/proc", d, "stat").read_text().rsplit(")", 1)[1].split()[1]) == me:
                out.add(int(d))
    return out


def comm(pid: int) -> str:
    try:
        return Path("/proc", str(pid), "comm").read_text().strip()
    except OSError:
        return str(pid)


async def run(n: int, pre: int, parallel: int = 1) -> None:
    async with B.web_stack(n, pre) as st:
        await asyncio.sleep(1.0)
        label = {p.pid: name for name, p in zip((*B.SERVICES, "node"), st.procs,
                                                strict=True)}
        label[os.getpid()] = "client"
        pids = children() | {os.getpid()}
        for p in pids:  # nats-server, valkey-server (read now: they are gone when the table is printed)
            label.setdefault(p, comm(p))
        node_pid = st.procs[-1].pid
        tasks = {t: f"/proc/{node_pid}/task/{t}" for t in os.listdir(f"/proc/{node_pid}/task")}
        before = {p: cpu(f"/proc/{p}") for p in pids}
        tbefore = {t: cpu(path) for t, path in tasks.items()}
        sem = asyncio.Semaphore(parallel)

        async def one(c: str) -> None:
            async with sem:
                ep = await st.m.create_endpoint(c, st.network_id, labels={"app": "web"}, wait=True)
                assert ep.status == "ready", ep  # a failed attach (a bridge holds 1,023 ports) is not one to count

        t0 = time.perf_counter()
        await asyncio.gather(*(one(c) for c in st.containers))
        wall = time.perf_counter() - t0
        after = {p: cpu(f"/proc/{p}") for p in pids}
        tafter = {t: cpu(path) for t, path in tasks.items()}

    def per(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
        return (a[0] - b[0]) / n * 1e3, (a[1] - b[1]) / n * 1e3

    how = "one at a time" if parallel == 1 else f"{parallel} in flight"
    print(f"\nCPU per attach, create_endpoint(wait=True) on a Full network + allow rule, {n} attaches {how}, "
          f"{os.cpu_count()} cores, {pre + 3} attached before\n")
    print(f"{'process':<16} {'user ms':>8} {'sys ms':>8} {'total ms':>9}")
    total = 0.0
    rows = sorted(((label[p], *per(after[p], before[p])) for p in pids), key=lambda r: -(r[1] + r[2]))
    for name, u, k in rows:
        total += u + k
        if u + k >= 0.05:
            print(f"{name:<16} {u:>8.2f} {k:>8.2f} {u + k:>9.2f}")
    threads = sorted((sum(per(tafter[t], tbefore[t])) for t in tasks), reverse=True)
    print(f"{'all':<16} {'':>8} {'':>8} {total:>9.2f}")
    print(f"\nnode worker by thread (ms per attach, busiest first): "
          f"{', '.join(f'{x:.2f}' for x in threads if x >= 0.05)}")
    cores = os.cpu_count() or 1
    print(f"wall {wall / n * 1e3:.2f} ms per attach; the CPU above spread over {cores} cores is at least "
          f"{total / cores:.2f} ms of it")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=150, help="attaches (default 150)")
    ap.add_argument("--pre", type=int, default=0,
                    help="endpoints attached before the measured ones (default 0; at most 1,020: a bridge "
                         "holds 1,023 ports)")
    ap.add_argument("--parallel", type=int, default=1, help="attaches in flight (default 1: one at a time)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: it makes network namespaces")
    asyncio.run(run(args.n, args.pre, args.parallel))
