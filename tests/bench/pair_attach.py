"""Two variants of the whole stack side by side, attaching in alternating blocks: the
difference between them, measured in the same minutes.

Run as root from the repository root::

    # this tree (A) against an older one (B: its services and node worker run that tree)
    git archive <rev> | tar -x -C /tmp/vbold
    .venv/bin/python -m tests.bench.pair_attach --b-tree /tmp/vbold
    # this tree with and without a setting of its processes' environment
    .venv/bin/python -m tests.bench.pair_attach --b-env SOME_SETTING=1

Why: this machine's speed drifts by 20-40 % from one minute to the next (a default
``bench_attach_cni`` attach row went 5.1 -> 7.6 ms between two runs of the same tree), so
two whole benchmark runs, one per variant, compare minutes as much as code. Here both
stacks (A and B, each as ``bench_attach_cni.web_stack`` makes it: every service and a node
worker in a process of its own, a Full network with an allow rule, a private nats-server and
valkey) are up at once, and ``create_endpoint(wait=True)`` goes to A for a block of
``--block`` attaches, then to B, then B, then A, ... each followed by ``--gap-ms`` of this
process's own CPU (the CNI ADD that follows each attach in ``bench_attach_cni``). A stack
waiting for its turn is idle. Two identical stacks give the same medians within ~1 %
(5.17 / 5.18 ms); the figures and what they decided are in docs/dataplane.md.

The client (this process) is the current tree's in both arms: the wire contract is shared.
Everything runs in namespaces this script makes (``<prefix>-...``), removed at the end;
nothing touches the root namespace and no packet leaves them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator
from unittest import mock

from tests.bench import bench_attach_cni as B


@contextlib.asynccontextmanager
async def stack(n: int, prefix: str, env: dict[str, str]) -> AsyncIterator[B.WebStack]:
    """``web_stack(n)`` under its own name prefix, its processes started with ``env`` added."""
    B.PREFIX = prefix
    cm = B.web_stack(n)
    with mock.patch.dict(os.environ, env):  # the stack's processes inherit it; this one not after
        st = await cm.__aenter__()
    try:
        yield st
    finally:
        B.PREFIX = prefix
        await cm.__aexit__(None, None, None)


def busy(seconds: float) -> None:
    t = time.perf_counter()
    while time.perf_counter() - t < seconds:
        pass


async def run(n: int, block: int, gap_s: float, b_env: dict[str, str]) -> dict[str, list[float]]:
    base = B.PREFIX
    res: dict[str, list[float]] = {"A": [], "B": []}
    async with contextlib.AsyncExitStack() as es:
        sa = await es.enter_async_context(stack(n, f"{base}a", {}))
        sb = await es.enter_async_context(stack(n, f"{base}b", b_env))
        await asyncio.sleep(1.0)
        arms = {"A": sa, "B": sb}
        for i in range(0, n, block):
            for name in ("A", "B") if (i // block) % 2 == 0 else ("B", "A"):
                st = arms[name]
                for c in st.containers[i:i + block]:
                    t = time.perf_counter()
                    ep = await st.m.create_endpoint(c, st.network_id, labels={"app": "web"}, wait=True)
                    res[name].append(time.perf_counter() - t)
                    assert ep.status == "ready", ep
                    busy(gap_s)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=300,
                    help="attaches per stack (default 300; at most 1,020: a bridge holds 1,023 ports)")
    ap.add_argument("--block", type=int, default=10, help="attaches per turn (default 10)")
    ap.add_argument("--gap-ms", type=float, default=9.0,
                    help="this process's busy time after each attach (default 9 ms, a CNI ADD here)")
    ap.add_argument("--b-env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment of stack B's processes (repeatable)")
    ap.add_argument("--b-tree", metavar="DIR",
                    help="a source tree (git archive) whose services and node worker stack B runs")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: it makes network namespaces")
    env = dict(kv.split("=", 1) for kv in args.b_env)
    if args.b_tree:
        t = os.path.abspath(args.b_tree)
        env["PYTHONPATH"] = os.pathsep.join((f"{t}/shared", f"{t}/services", t))
    res = asyncio.run(run(args.n, args.block, args.gap_ms / 1e3, env))
    what = ", ".join(f"{k}={v}" for k, v in env.items()) or "nothing"
    print(f"\ncreate_endpoint(wait=True), Full network + allow rule, {args.n} attaches per stack in turns of "
          f"{args.block}, {args.gap_ms:g} ms busy after each; B differs by: {what}\n")
    w = min(20, args.n // 4)
    q = args.n // 4
    print(f"{'stack':<6} {'median':>8} {'p25':>8} {'p75':>8} {'mean':>8} {'last ' + str(q):>9}   "
          f"growth: median of the last {w} / first {w}")
    for k in ("A", "B"):
        v = sorted(res[k])
        grow = statistics.median(res[k][-w:]) / statistics.median(res[k][:w])
        print(f"{k:<6} {statistics.median(v) * 1e3:>6.2f}ms {v[len(v) // 4] * 1e3:>6.2f}ms "
              f"{v[3 * len(v) // 4] * 1e3:>6.2f}ms {statistics.mean(v) * 1e3:>6.2f}ms "
              f"{statistics.median(res[k][-q:]) * 1e3:>7.2f}ms   {grow:.2f}x")
    late = statistics.median(res["B"][-q:]) / statistics.median(res["A"][-q:])
    print(f"B / A, medians: {statistics.median(res['B']) / statistics.median(res['A']):.3f}; of the last {q} "
          f"(the most endpoints on the node): {late:.3f}")


if __name__ == "__main__":
    main()
