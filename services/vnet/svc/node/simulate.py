"""Simulated node workers: the real control loop with a recording applier instead of the kernel.

``vnet-node --simulate N`` runs N node workers (``<node-id>-0000`` ... ) in ONE process on ONE
NATS connection. Each is the real :class:`~vnet.svc.node.worker.NodeWorker` (registration and
heartbeat, its durable consumers, the desired-state fetch, scoped and full reconciles, status
reports) whose data plane is a :class:`RecordingApplier`: it records which endpoints and
networks it would have applied and answers ``ready`` for each, touching no kernel, no
namespace and needing no root. That is what makes 1,000 nodes fit on one machine: the control
plane (services, bus, Redis) sees 1,000 hosts, each with its own consumers, heartbeats and
subjects, while the per-node cost here is a few Python objects.

Why one process: a Python node worker process costs ~60 MB RSS before it does anything
(interpreter, msgspec, nats-py, OpenTelemetry, pyroute2 imports); 1,000 of them would need
60 GB. One process with N workers costs that once plus the per-worker state (measured in
tests/bench/bench_scale.py and docs/scale.md).

What is NOT simulated: nftables (the policy agent is off: the node reports isolation
unavailable; with ``VNETSIM_POLICY=1`` it runs, fetching and keeping its ruleset and taking
its set deltas from events like a real node, with a recording enforcer instead of nftables:
:class:`RecordingEnforcer`), DNS and CNI, host-route reports (every simulated host would report the same
prefixes of this machine). The subjects and the bus identity are the node's own, so with the
stack's per-node NATS users each simulated node would need its own user: the simulator is
for an unauthenticated bus or an identity allowed every node's subjects (the bench's).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from nats.aio.client import Client

from vnet.contracts import subjects
from vnet.contracts.endpoint import NetnsCheck, NetnsCheckReply, NodeStats
from vnet.core.dataplane_model import (
    EpDesired,
    NodeDesired,
    ObjectStatus,
    ProbeResult,
    ReconcileResult,
    Scope,
    Support,
)
from vnet.runtime import gcpause
from vnet.runtime import service as svc_runtime
from vnet.runtime.config import VNetConfig
from vnet.runtime.node_wiring import SyncResult
from vnet.runtime.wiring import connect_bus
from vnet.svc.node import service as node_service
from vnet.svc.node.worker import DRIVERS, NodeWorker

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class RecordingApplier:
    """Stands in for the Reconciler: the same ``reconcile(desired, scope)`` call, no kernel.

    It keeps what is "applied" (endpoint and network ids) so a test can compare it with the
    desired state, and counts the writes the kernel would have had: one per endpoint or
    network that appears or disappears (a converged host costs zero, as with the real one).
    """

    node: str
    endpoints: set[str] = field(default_factory=set)
    networks: set[str] = field(default_factory=set)
    writes: int = 0
    reconciles: int = 0
    log: list[tuple[str, str]] = field(default_factory=list)  # (op, id), the last ``keep`` entries
    keep: int = 256

    def announce(self, endpoints: list[EpDesired]) -> list[str]:
        return []  # no kernel, no gratuitous ARP

    def reconcile(self, desired: NodeDesired, scope: Scope | None = None) -> ReconcileResult:
        t0 = time.perf_counter()
        self.reconciles += 1
        want_eps = {e.id for e in desired.endpoints}
        want_nets = {n.id for n in desired.networks}
        if scope is None:
            eps_in, nets_in = want_eps | self.endpoints, want_nets | self.networks
        else:
            eps_in, nets_in = set(scope.endpoints), set(scope.networks)
            # the networks of endpoints in scope are realised with them, as the reconciler does
            nets_in |= {e.network_id for e in desired.endpoints if e.id in scope.endpoints}
        writes = 0
        for nid in sorted(nets_in):
            writes += self._set(self.networks, nid, nid in want_nets, "net")
        for eid in sorted(eps_in):
            writes += self._set(self.endpoints, eid, eid in want_eps, "ep")
        self.writes += writes
        ready = ObjectStatus(state="ready")
        return ReconcileResult(ops_planned=writes, ops_applied=writes, writes=writes, errors=[],
                               endpoints={i: ready for i in eps_in if i in want_eps},
                               networks={i: ready for i in nets_in if i in want_nets},
                               duration=time.perf_counter() - t0)

    def _set(self, have: set[str], ident: str, want: bool, kind: str) -> int:
        if want == (ident in have):
            return 0
        (have.add if want else have.discard)(ident)
        self.log.append((f"{'add' if want else 'del'}-{kind}", ident))
        if len(self.log) > self.keep:
            del self.log[: len(self.log) - self.keep]
        return 1

    def wg_public_key(self, ifname: str) -> str:
        raise RuntimeError("simulated node: no WireGuard")

    def close(self) -> None:
        pass


class RecordingEnforcer:
    """Stands in for the nftables enforcer of a simulated node's policy agent: it keeps the last
    ruleset it was given and counts the writes (a ruleset that changed), touching no kernel."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the agent writes under it, as with the real enforcer
        self.applied: Any = None
        self.writes = 0

    def sync_ruleset(self, rs: Any, *, check: bool = False) -> SyncResult:
        t0 = time.perf_counter()
        wrote = rs is not self.applied
        self.applied = rs
        self.writes += int(wrote)
        return SyncResult(wrote=wrote, reason="recorded" if wrote else "unchanged",
                          duration=time.perf_counter() - t0)


def simulate_policy() -> bool:
    """``VNETSIM_POLICY=1``: simulated nodes run their policy agent (rulesets and set deltas)."""
    return os.environ.get("VNETSIM_POLICY", "").lower() in ("1", "on", "true", "yes")


class SimulatedNodeWorker(NodeWorker):
    """The node worker with a :class:`RecordingApplier` as its data plane (see the module docstring)."""

    def __init__(self, rt: svc_runtime.Runtime) -> None:
        super().__init__(rt)
        # "data plane on" as far as the control loop goes: every driver reported available, endpoints
        # reconciled to ready. The policy agent stays off (it would write nftables in this namespace).
        self.dataplane, self.dataplane_reason = True, ""
        self.applier = RecordingApplier(self.node)
        self.isolation = Support(available=False, reason="simulated node: no nftables")

    async def start(self) -> None:
        # The base start makes a Reconciler when the data plane is on: make it think it is off for
        # that step only, then put the recording applier where the reconciler would be.
        self.dataplane, self.dataplane_reason = False, "simulated node: a recording applier stands in for the kernel"
        try:
            await super().start()
        finally:
            self.dataplane, self.dataplane_reason = True, ""
        self.rec = self.applier
        self.underlay, self.underlay_ifname = self.underlay or "192.0.2.1", self.underlay_ifname or "sim0"

    async def _start_policy(self) -> None:
        self.isolation = Support(available=False, reason="simulated node: no nftables")
        if not simulate_policy():
            return
        # The real agent (fetch, rebase, element deltas noted from events), a recording enforcer:
        # what a node with rules costs the control plane, without nftables in this namespace.
        agent = self.rt.adapters.node().policy_agent(self.node, host_netns=None,
                                                     timeout=self.rt.config.request_timeout_s, state_dir=None)
        agent.enforcer = RecordingEnforcer()
        self.policy = agent

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        # No kernel, no blocking: run inline on the loop (a thread per simulated node would be the cost).
        return fn(*args)

    async def _probe(self) -> None:
        ok = Support(available=True, reason="simulated")
        self.probe_result = ProbeResult(kinds={}, drivers={d: ok for d in DRIVERS})

    async def _wg_key(self) -> None:
        return None

    async def stop(self) -> None:
        await super().stop()
        self.rec = None


# The simulated node's service: the real node ops (health, stats, resync, netns.check) without the
# host-routes loop, DNS or CNI (they read or serve this machine, not a simulated host).
SIM_SERVICE = svc_runtime.ServiceDef(
    "node", "Simulated node worker: the real control loop, a recording data plane",
    uses_redis=False, health_subject=node_service.SERVICE.health_subject)
SIM_SERVICE.ops.extend(o for o in node_service.SERVICE.ops if o.name != "netns.check")


@SIM_SERVICE.op("netns.check", subjects.NODE_NETNS_CHECK, NetnsCheck)
async def _sim_netns_check(ctx: svc_runtime.Ctx, req: NetnsCheck) -> NetnsCheckReply:
    """A simulated host has every container namespace it is asked about."""
    path = req.netns if req.netns.startswith("/") else f"/run/netns/{req.netns}"
    return NetnsCheckReply(netns=req.netns, path=path, exists=True)


@SIM_SERVICE.starting
async def _start_sim_worker(rt: svc_runtime.Runtime) -> None:
    worker = SimulatedNodeWorker(rt)
    rt.state["worker"] = worker
    try:
        await worker.start()
    except BaseException:
        rt.state.pop("worker", None)
        await worker.stop()
        raise


@SIM_SERVICE.stopping
async def _stop_sim_worker(rt: svc_runtime.Runtime) -> None:
    worker = rt.state.pop("worker", None)
    if worker is not None:
        await worker.stop()


STOP_TIMEOUT_S = 20.0  # the whole fleet's stop
START_ATTEMPTS = 10  # per simulated node: its runtime's start makes ~6 JetStream API calls


def node_names(base: str, n: int, first: int = 0) -> list[str]:
    """``base`` alone for one node, else ``base-0000`` ... (sortable, stable across runs);
    ``first``: the number of the first one (several fleet processes share the numbering)."""
    return [base] if n == 1 and first == 0 else [f"{base}-{i:04d}" for i in range(first, first + n)]


class SimulatedFleet:
    """N simulated node workers in this process, on one shared NATS connection."""

    def __init__(self, config: VNetConfig, names: list[str], *, nc: Client | None = None) -> None:
        self.config = config
        self.names = names
        self.nc = nc
        self._own_nc = nc is None
        self.runtimes: list[svc_runtime.Runtime] = []
        self.failed: list[str] = []  # nodes that did not start

    async def start(self, *, concurrency: int = 8) -> None:
        if self.nc is None:
            self.nc = await connect_bus(self.config, f"vnet-node-sim-{len(self.names)}")
        sem = asyncio.Semaphore(concurrency)
        started: list[svc_runtime.Runtime | None] = [None] * len(self.names)

        async def one(i: int, name: str) -> None:
            async with sem:
                for attempt in range(START_ATTEMPTS):
                    try:
                        started[i] = await svc_runtime.start(SIM_SERVICE, self.config, nc=self.nc,
                                                             params={"node": name})
                        return
                    except Exception as exc:  # a JetStream API call timed out on a busy machine: again
                        if attempt == START_ATTEMPTS - 1:
                            # the others run on: one node that never started is reported, not fatal
                            self.failed.append(name)
                            log.error("simulated node %s did not start after %d attempts: %s", name,
                                      START_ATTEMPTS, exc)
                            return
                        log.info("simulated node %s did not start (%s); again", name, exc)
                        await asyncio.sleep(min(1.0 + attempt, 5.0))

        try:
            await asyncio.gather(*(one(i, n) for i, n in enumerate(self.names)))
        finally:
            self.runtimes = [r for r in started if r is not None]

    def workers(self) -> list[SimulatedNodeWorker]:
        return [r.state["worker"] for r in self.runtimes if "worker" in r.state]

    def stats(self) -> list[NodeStats]:
        return [w.stats() for w in self.workers()]

    async def stop(self) -> None:
        sem = asyncio.Semaphore(64)

        async def one(rt: svc_runtime.Runtime) -> None:
            async with sem:
                await rt.stop(drain_timeout=5.0)

        await asyncio.gather(*(one(r) for r in self.runtimes), return_exceptions=True)
        self.runtimes = []
        if self._own_nc and self.nc is not None:
            try:
                await self.nc.drain()
            except Exception:
                await self.nc.close()
            self.nc = None


async def run_fleet(config: VNetConfig, names: list[str], stop: asyncio.Event) -> None:
    """The launcher's ``--simulate N``: start the fleet, run until ``stop``, stop it."""
    fleet = SimulatedFleet(config, names)
    t0 = time.perf_counter()
    await fleet.start()
    log.info("%d simulated node(s) up in %.1fs (%s ... %s), one NATS connection%s", len(fleet.runtimes),
             time.perf_counter() - t0, names[0], names[-1],
             f"; {len(fleet.failed)} did not start" if fleet.failed else "")
    # 250 nodes' state in one interpreter: without this its full collections paused every node
    # of the process for up to 0.6 s (vnet.runtime.gcpause)
    gcpause.tune_for_large_heap()
    try:
        await stop.wait()
    finally:
        # Bounded: with the bus gone (the stack stopped first) every drain would wait its timeout.
        try:
            await asyncio.wait_for(fleet.stop(), STOP_TIMEOUT_S)
        except TimeoutError:
            log.warning("simulated nodes: not all stopped within %.0fs; exiting anyway", STOP_TIMEOUT_S)
