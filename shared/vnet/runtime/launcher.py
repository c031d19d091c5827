"""Entry points ``vnet-service <name>`` and ``vnet-node``: run one service until SIGTERM.

Every stop is logged with its cause: which signal, the pid, uid and command line of the
process that sent it, or that the parent died (the supervisor's children get SIGTERM
from the kernel then, via PR_SET_PDEATHSIG); a crash is logged with its traceback
(:mod:`vnet.runtime.stopsignals`, which the supervisor uses too).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import socket
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

from vnet.contracts import subjects
from vnet.core.errors import VNetError
from vnet.runtime import gcpause
from vnet.runtime import service as svc_runtime
from vnet.runtime.config import VNetConfig
from vnet.runtime.stopsignals import StopReason, StopSignals, block_stop_signals
from vnet.telemetry.logging import setup_logging
from vnet.telemetry.tracing import setup_tracing

T = TypeVar("T")

log = logging.getLogger("vnet.launcher")


def load_service(name: str) -> svc_runtime.ServiceDef:
    if name not in (*subjects.SERVICES, subjects.NODE_SERVICE):
        raise SystemExit(f"unknown service {name!r}; choose one of: {', '.join(subjects.SERVICES)}")
    mod = importlib.import_module(f"vnet.svc.{name}.service")
    defn: svc_runtime.ServiceDef = mod.SERVICE
    return defn


async def run(name: str, config: VNetConfig, params: dict[str, str]) -> None:
    defn = load_service(name)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reasons: list[StopReason] = []

    def on_stop(reason: StopReason) -> None:
        reasons.append(reason)
        if len(reasons) == 1:
            loop.call_soon_threadsafe(stop.set)
        # Logged from the waiter thread at once: even a process stuck in its drain says why.
        log.warning("%s: %s%s", defn.name, reason.describe(),
                    "; stopping" if len(reasons) == 1 else "; already stopping")

    StopSignals(on_stop).start()
    rt = await svc_runtime.start(defn, config, params=params)
    log.info("%s %s up as instance %s on %s (pid %d, parent %d)", defn.name, defn.version, rt.instance,
             config.nats_url, os.getpid(), os.getppid())
    await stop.wait()
    log.info("draining %s (%s)", defn.name, reasons[0].describe())
    await rt.stop()
    log.info("%s stopped (%s)", defn.name, reasons[0].describe())


async def run_simulated(config: VNetConfig, base: str, n: int, first: int = 0) -> None:
    """``vnet-node --simulate N``: N simulated node workers on one connection until a stop signal."""
    from vnet.svc.node.simulate import node_names, run_fleet

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_stop(reason: StopReason) -> None:
        loop.call_soon_threadsafe(stop.set)
        log.warning("simulated nodes: %s; stopping", reason.describe())

    StopSignals(on_stop).start()
    await run_fleet(config, node_names(base, n, first), stop)


def _main(name: str, argv: list[str] | None, node: bool) -> int:
    p = argparse.ArgumentParser(prog="vnet-node" if node else "vnet-service")
    if not node:
        p.add_argument("name", choices=subjects.SERVICES)
    p.add_argument("--config", help="config file (TOML, YAML or JSON); default $VNET_CONFIG")
    if node:
        p.add_argument("--node-id", help="this host's node id (default: $VNET_NODE_ID or the hostname)")
        p.add_argument("--host-netns", help="network namespace to manage (default: the current one)")
        p.add_argument("--underlay", help="this host's underlay address for overlays (default: found from routes)")
        p.add_argument("--underlay-ifname", help="the underlay interface (default: the one holding --underlay)")
        p.add_argument("--resync", type=float, help="full resync period in seconds (default 10)")
        p.add_argument("--wg-ifname", help="the WireGuard interface of encrypted overlays (default: vnw- and a "
                       "hash of the node id, unique per node: wireguard-go's control sockets share one directory)")
        p.add_argument("--teardown", action="store_true",
                       help="remove everything this node made (interfaces, macvlan endpoints, nftables tables, "
                       "wireguard-go) and exit, with the worker stopped; 1 when a step failed (all are reported)")
        p.add_argument("--dns", action="store_true",
                       help="answer names on the gateway of every local network (docs/dns.md)")
        p.add_argument("--dns-domain", help="the domain of endpoint names (default vnet)")
        p.add_argument("--dns-upstream", help="comma-separated resolvers for other names "
                       "(default: the host namespace's resolv.conf)")
        p.add_argument("--cni", action="store_true",
                       help="serve the vnet-cni plugin on a unix socket (docs/cni.md)")
        p.add_argument("--cni-socket", help="the CNI socket (default /run/vnet/cni.sock)")
        p.add_argument("--simulate", type=int, metavar="N", default=0,
                       help="run N simulated nodes in this process (no kernel, no root: a recording data "
                       "plane; names <node-id>-0000... when N > 1); see vnet.svc.node.simulate")
        p.add_argument("--simulate-first", type=int, metavar="I", default=0,
                       help="with --simulate: number the nodes from I (several processes, one numbering)")
    args = p.parse_args(argv)
    # Before anything starts a thread (tracing exporters, the loop's executor): see StopSignals.
    block_stop_signals()
    gcpause.watch()  # a long collection pause is logged next to the requests it held up
    try:
        overrides = {}
        if node and args.node_id:
            overrides["node_id"] = args.node_id
        if node and args.host_netns:
            overrides["host_netns"] = args.host_netns
        if node and args.underlay:
            overrides["node_underlay"] = args.underlay
        if node and args.underlay_ifname:
            overrides["node_underlay_ifname"] = args.underlay_ifname
        if node and args.resync:
            overrides["node_resync_interval_s"] = args.resync
        config = VNetConfig.load(args.config, **overrides)
    except VNetError as err:
        print(f"vnet: {err.message}", file=sys.stderr)
        return 2
    svc = name if node else args.name
    setup_logging(svc, config.log_level)
    setup_tracing(svc, config.otlp_endpoint)
    params: dict[str, str] = {}
    if node:
        params["node"] = config.node_id or socket.gethostname().split(".")[0]
        if args.dns:
            params["dns"] = "on"
        if args.dns_domain:
            params["dns_domain"] = args.dns_domain
        if args.dns_upstream is not None:
            params["dns_upstream"] = args.dns_upstream
        if args.cni:
            params["cni"] = "on"
        if args.cni_socket:
            params["cni_socket"] = args.cni_socket
        if args.wg_ifname:
            params["wg_ifname"] = args.wg_ifname
        if args.teardown:
            return teardown_local(config, params)
    try:
        if node and args.simulate:
            if args.simulate < 1:
                print("vnet-node: --simulate needs N >= 1", file=sys.stderr)
                return 2
            run_loop(run_simulated(config, params["node"], args.simulate, args.simulate_first))
            return 0
        run_loop(run(svc, config, params))
    except VNetError as err:
        log.error("%s did not start or stopped on an error: %s", svc, err.message)
        print(f"vnet-{svc}: {err.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        log.warning("%s: interrupted", svc)
    except BaseException:
        log.exception("%s crashed", svc)  # the supervisor sees the exit code; the log says why
        raise
    return 0


def teardown_local(config: VNetConfig, params: dict[str, str]) -> int:
    """``vnet-node --teardown``: the node's teardown done here, without the bus (the worker
    stopped; ``vnetctl node teardown`` asks a running one). Every step is tried; the exit
    code is 1 when one failed."""
    lifecycle = importlib.import_module("vnet.svc.node.lifecycle")
    worker = importlib.import_module("vnet.svc.node.worker")
    node = params["node"]
    ok, why = worker.dataplane_mode(config.host_netns)
    if not ok:
        print(f"vnet-node: cannot tear down node {node}: {why}", file=sys.stderr)
        return 2
    try:
        ifname = lifecycle.wg_ifname(params, node)
    except VNetError as exc:
        print(f"vnet-node: {exc.message}", file=sys.stderr)
        return 2
    rep = lifecycle.teardown_host(config.host_netns, node, lifecycle.state_dir(config, node), ifname)
    for item in rep.removed:
        print(f"removed {item}")
    for err in rep.errors:
        print(f"error: {err}", file=sys.stderr)
    print(f"node {node} torn down in {rep.duration_s:.2f} s: {len(rep.removed)} removed, {len(rep.errors)} error(s)")
    return 0 if rep.ok else 1


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop where it is installed (a dependency on Linux), else on asyncio's
    own loop. Every hop of a request is a message read, a handler and a message written by a
    service's event loop: with uvloop an attach through the whole stack took 2-4 % less time
    (``tests.bench.pair_attach``, docs/dataplane.md, "The last runs on main (5 Dec
    02:50-03:17 UTC)")."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def service_main(argv: list[str] | None = None) -> None:
    raise SystemExit(_main("", argv, node=False))


def node_main(argv: list[str] | None = None) -> None:
    raise SystemExit(_main(subjects.NODE_SERVICE, argv, node=True))


if __name__ == "__main__":
    # `python -m vnet.runtime.launcher node ...` runs the node worker, any other name a service.
    if sys.argv[1:2] == ["node"]:
        node_main(sys.argv[2:])
    service_main()
