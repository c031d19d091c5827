"""The node worker's reconciler: desired state in -> observe -> plan -> apply.

::

    rec = Reconciler(host_netns=None)          # None: this process's namespace
    result = rec.reconcile(desired)            # whole host: start-up, periodic resync
    result = rec.reconcile(desired, Scope(endpoints=frozenset({"ep1"})))  # one event
    result = await rec.areconcile(desired)     # from asyncio: runs in a worker thread
    result.writes, result.endpoints["ep1"].state, result.errors

Level-triggered (Calico Felix's model): it never replays history; every call reads
the kernel, plans the difference (:func:`vnet.core.plan.plan`, pure) and applies it.
A converged host costs zero kernel writes. Reconciles are serialised (one at a
time per reconciler); the kernel serialises netlink work anyway.

Tracing: ``node.reconcile`` is a child of the current span (the node worker's
``process ...`` span of the request that caused it), with ``node.observe``,
``node.plan`` and ``node.apply`` below it and one ``kernel <op>`` span per kernel
operation below ``node.apply``.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import msgspec
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from vnet.core import drivers
from vnet.core import errors as E
from vnet.core.dataplane_model import (
    EpDesired,
    NodeActual,
    NodeDesired,
    ObjectStatus,
    ReconcileError,
    ReconcileResult,
    Scope,
)
from vnet.core.plan import (
    WG_OWNER,
    DeleteLink,
    Departed,
    Plan,
    PlanOp,
    SetSysctl,
    ep_owner,
    net_owner,
    observation_targets,
    plan,
    table_targets,
)
from vnet.runtime import dataplane
from vnet.runtime.dataplane import Dataplane, NamespaceGone, Once, WireGuardError
from vnet.runtime.dataplane import WireGuardPort as WireGuard
from vnet.telemetry import tracing

log = logging.getLogger(__name__)

# The macvlan/ipvlan endpoints this node made (where each is), kept in the node's state
# directory: nothing on the host side names such an endpoint, so a worker restarted after
# one was removed (its namespace deleted, or its record deleted while the worker was
# down) finds its interface only here (docs/dataplane.md, "Sub-interface ledger").
SUBIF_LEDGER = "subifs.json"


def read_ledger(path: str | os.PathLike[str]) -> dict[str, Departed]:
    """The ledger's entries (none when the file is missing or unreadable: nothing to clean)."""
    try:
        raw = json.loads(Path(path).read_bytes())
    except (OSError, ValueError):
        return {}
    out: dict[str, Departed] = {}
    for d in raw.get("subifs", []) if isinstance(raw, dict) else []:
        try:
            dep = Departed(id=str(d["id"]), netns=str(d["netns"]), ifname=str(d["ifname"]), kind=str(d["kind"]),
                           mac=d.get("mac"))
        except (KeyError, TypeError):
            continue
        out[dep.id] = dep
    return out


def write_ledger(path: str | os.PathLike[str], subifs: dict[str, Departed]) -> None:
    """Atomically (a crash leaves the old or the new ledger, never half of one); 0600. An
    empty ledger is no file (a torn-down node leaves nothing behind)."""
    if not subifs:
        Path(path).unlink(missing_ok=True)
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    # msgspec, not json.dumps: written on every macvlan attach and detach (1,000 entries, a
    # loaded machine: encoding 0.3 ms against 3.9 ms, the whole write 3.5 ms against 7.9 ms)
    body = msgspec.json.encode({"subifs": [subifs[k] for k in sorted(subifs)]})
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, body)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class Reconciler:
    """Reconciles one host namespace (``host_netns``: a name, a path, or ``None`` for
    the namespace this process runs in) with the desired state given to it."""

    def __init__(self, host_netns: str | None = None, *, max_namespaces: int = 1024,
                 tracer: trace.Tracer | None = None, node_name: str | None = None,
                 state_dir: str | os.PathLike[str] | None = None, kernel: Dataplane | None = None) -> None:
        """``node_name`` names this node in errors (default: the host namespace or the
        host name); ``state_dir`` keeps the node's WireGuard private key (0600; default a
        private temporary directory); ``kernel``: the data plane to work on (default the
        real one, :func:`vnet.runtime.dataplane.kernel`)."""
        self.host_netns = host_netns
        self.node_name = node_name or host_netns or os.uname().nodename
        self._tracer = tracer
        kernel = kernel or dataplane.kernel(host_netns, max_namespaces=max_namespaces, tracer=tracer,
                                            node=self.node_name)
        self.ctx = kernel.namespaces
        self.observer = kernel.observer
        self.applier = kernel.applier
        self._make_wireguard = kernel.wireguard
        self._lock = threading.Lock()
        self.reconciles = 0
        self._state_dir = state_dir
        self._tmp_state: str | None = None  # the temporary key directory made without a state_dir
        self._wg: WireGuard | None = None
        self._subifs: dict[str, Departed] = {}  # macvlan/ipvlan endpoints seen desired: where to remove them
        # ... kept in the state directory across restarts (SUBIF_LEDGER), when there is one
        self._ledger = os.path.join(state_dir, SUBIF_LEDGER) if state_dir is not None else None
        if self._ledger is not None:
            self._subifs = read_ledger(self._ledger)
        # ... of which these were made by an earlier process: the nftables tables of such a
        # macvlan endpoint are unknown to this one's policy agent, so removing the endpoint
        # removes them here (lifecycle.drop_macvlan_tables)
        self._inherited = set(self._subifs)

    @property
    def wireguard(self) -> WireGuard:
        """The WireGuard mesh manager (made on first use)."""
        if self._wg is None:
            state = self._state_dir
            if state is None:
                # Private to this process (a new key pair each start): removed in close()
                state = self._tmp_state = tempfile.mkdtemp(prefix=f"vnet-node-{self.node_name.replace('/', '_')}-")
            self._wg = self._make_wireguard(self.host_netns, state,
                                            lambda name: self.observer.link(self.host_netns, name) is not None)
        return self._wg

    def stop_wireguard(self) -> None:
        """Stop the wireguard-go processes this reconciler started (tests, tools). A node
        worker does not call it on exit: the tunnel stays up (fail static)."""
        if self._wg is not None:
            self._wg.stop()

    def wg_public_key(self, ifname: str = "vnwg0") -> str:
        """This node's WireGuard public key (generating the key pair on first use); the
        node worker publishes it so other hosts can list this node as a peer."""
        return self.wireguard.public_key(ifname)

    @property
    def tracer(self) -> trace.Tracer:
        """The tracer given, else the ``vnet`` tracer of the current provider."""
        return self._tracer or tracing.tracer()

    @property
    def writes(self) -> int:
        """Kernel writes since this reconciler was made (the counter the tests assert on)."""
        return self.applier.writes

    # -- steps (public for tests and tools) ----------------------------------------------
    def observe(self, desired: NodeDesired, scope: Scope | None = None,
                departed: list[Departed] | None = None) -> NodeActual:
        names, containers = observation_targets(desired, scope)
        containers |= {d.netns for d in departed or ()}
        return self.observer.node(containers, names, table_targets(scope))

    def _departed(self, desired: NodeDesired, scope: Scope | None) -> list[Departed]:
        wanted = {e.id for e in desired.endpoints}
        return [d for i, d in self._subifs.items() if i not in wanted and (scope is None or i in scope.endpoints)]

    def _remember_subifs(self, desired: NodeDesired, departed: list[Departed], failed: dict[str, object]) -> None:
        subifs = {n.id: drv for n in desired.networks if (drv := drivers.get(n.driver)).subif_kind is not None}
        before = dict(self._subifs)
        for d in departed:
            if ep_owner(d.id) not in failed:
                self._subifs.pop(d.id, None)
        for e in desired.endpoints:
            sub = subifs.get(e.network_id)
            if sub is not None and sub.subif_kind is not None:
                self._subifs[e.id] = Departed(id=e.id, netns=e.netns, ifname=e.ifname, kind=sub.subif_kind,
                                              mac=e.mac.lower() if sub.departed_by_mac else None)
        self._inherited -= {d.id for d in departed if ep_owner(d.id) not in failed} | {e.id for e in desired.endpoints}
        if self._ledger is not None and self._subifs != before:
            try:
                write_ledger(self._ledger, self._subifs)
            except OSError as exc:  # the in-memory copy still serves this process
                log.warning("cannot write the sub-interface ledger %s: %s", self._ledger, exc)

    def _drop_inherited_tables(self, gone: list[Departed]) -> None:
        from vnet.svc.node.lifecycle import drop_macvlan_tables

        removed, errors = drop_macvlan_tables(gone)
        for r in removed:
            log.info("%s: removed %s (an endpoint removed while the worker was down)", self.node_name, r)
        for e in errors:
            log.warning("%s: %s", self.node_name, e)

    def teardown(self) -> tuple[list[str], list[str]]:
        """Remove everything this node made in the kernel that a plan knows of: every
        bridge, veth, VXLAN device and host shim of ours in the host namespace, and every
        macvlan/ipvlan endpoint in the ledger (in its container namespace). Goes on past
        errors; ``(removed, errors)``. The WireGuard mesh and the nftables tables are the
        caller's (vnet.svc.node.lifecycle.teardown_host)."""
        with self._lock:
            departed = list(self._subifs.values())
            empty = NodeDesired()
            try:
                actual = self.observe(empty, None, departed)
            except OSError as exc:  # NamespaceGone included
                return [], [f"cannot read the host namespace {self.host_netns or '(own)'}: {exc}"]
            p = plan(empty, actual, None, departed)
            errors = [e.message for e in p.errors]
            out = self.applier.apply(p, actual) if p.ops else None
            failed: dict[str, object] = dict(out.failed) if out is not None else {}
            if out is not None:
                errors += [f"{e.owner}: {e.message}" for e in out.errors]
            removed = [f"interface {op.ifname}" + (f" in {op.ns}" if op.ns else "")
                       for op in p.ops if isinstance(op, DeleteLink) and op.owner not in failed]
            self._remember_subifs(empty, departed, failed)
            return removed, errors

    def _ensure_wireguard(self, desired: NodeDesired, scope: Scope | None) -> ReconcileError | None:
        u = desired.underlay
        if u is None or u.wg_address is None:
            return None
        enc = [n for n in desired.networks if drivers.get(n.driver).spans_hosts and n.encrypted
               and (scope is None or n.id in scope.networks
                    or any(e.network_id == n.id and e.id in scope.endpoints for e in desired.endpoints))]
        if not enc:
            return None
        with self.tracer.start_as_current_span("node.wireguard", attributes={"vnet.ifname": u.wg_ifname}) as sp:
            try:
                writes = self.wireguard.ensure(u, desired.peers)
                self.applier.writes += writes
                sp.set_attribute("vnet.writes", writes)
            except (WireGuardError, OSError) as exc:
                sp.set_status(Status(StatusCode.ERROR, str(exc)))
                return ReconcileError(owner=WG_OWNER, code=E.UNAVAILABLE.code, op="wireguard",
                                      message=f"WireGuard mesh on {self.node_name}: {exc}",
                                      errno=(exc.errno or errno.EIO) if isinstance(exc, OSError) else 0)
        return None

    def plan(self, desired: NodeDesired, scope: Scope | None = None) -> tuple[Plan, NodeActual]:
        actual = self.observe(desired, scope)
        return plan(desired, actual, scope), actual

    def apply_delta(self, ops: list[PlanOp]) -> dict[str, ReconcileError]:
        """Write ops decided without an observation (a remote endpoint's entries,
        ``Driver.remote_delta``); the first error of each owner that failed (its network is
        then reconciled in full by the caller). Never raises for kernel problems."""
        with self._lock, self.tracer.start_as_current_span("node.delta", attributes={"vnet.ops": len(ops)}) as sp:
            writes0 = self.applier.writes
            try:
                out = self.applier.apply(Plan(ops=ops, errors=[], networks=[], endpoints=[]))
            except OSError as exc:  # NamespaceGone included: the host namespace itself
                err = ReconcileError(owner="node", code=E.UNAVAILABLE.code, message=f"host namespace: {exc}",
                                     errno=exc.errno or 0)
                return {op.owner: err for op in ops}
            sp.set_attribute("vnet.writes", self.applier.writes - writes0)
            if out.failed:
                sp.set_status(Status(StatusCode.ERROR, f"{len(out.failed)} object(s) failed"))
            return dict(out.failed)

    def announce(self, endpoints: list[EpDesired]) -> list[str]:
        """Gratuitous ARP for endpoints just reported ready (the applier's ``announce``);
        the errors, never raised."""
        with self._lock:
            return self.applier.announce(endpoints)

    # -- reconcile -----------------------------------------------------------------------
    def reconcile(self, desired: NodeDesired, scope: Scope | None = None,
                  gate: Callable[[], None] | None = None,
                  planned: Callable[[], None] | None = None) -> ReconcileResult:
        """Make the host look like ``desired`` (within ``scope``); never raises for
        kernel or input problems — they are in ``result.errors`` and the statuses.

        ``gate`` is called once, before the first kernel op that could let a packet through
        (``Applier.apply``), and in any case before this returns. ``planned`` is called once
        the plan is made, before any kernel op (not at all when the observation or the plan
        failed): work to run beside the kernel's starts there."""
        once = Once(gate)
        try:
            with self._lock, self.ctx.one_pass():
                return self._reconcile(desired, scope, once, planned)
        finally:
            once()

    async def areconcile(self, desired: NodeDesired, scope: Scope | None = None) -> ReconcileResult:
        """:meth:`reconcile` off the event loop (the trace context follows)."""
        return await asyncio.to_thread(self.reconcile, desired, scope)

    def _reconcile(self, desired: NodeDesired, scope: Scope | None, gate: Callable[[], None],
                   planned: Callable[[], None] | None) -> ReconcileResult:
        t0 = time.perf_counter()
        writes0 = self.applier.writes
        self.reconciles += 1
        tracer = self.tracer
        self.applier.tracer = tracer
        attrs = {"vnet.host_netns": self.host_netns or "", "vnet.scope": "full" if scope is None else "scoped",
                 "vnet.desired.networks": len(desired.networks), "vnet.desired.endpoints": len(desired.endpoints)}
        with tracer.start_as_current_span("node.reconcile", attributes=attrs) as span:
            errors: list[ReconcileError] = []
            failed: dict[str, ReconcileError] = {}
            ops_planned = ops_applied = 0
            observe_s = plan_s = apply_s = 0.0
            p: Plan | None = None
            departed = self._departed(desired, scope)
            try:
                wg_err = self._ensure_wireguard(desired, scope)
                if wg_err is not None:
                    errors.append(wg_err)
                t = time.perf_counter()
                with tracer.start_as_current_span("node.observe") as sp:
                    actual = self.observe(desired, scope, departed)
                    sp.set_attribute("vnet.containers", len(actual.containers))
                    sp.set_attribute("vnet.host_links", len(actual.host.links))
                observe_s = time.perf_counter() - t
                t = time.perf_counter()
                with tracer.start_as_current_span("node.plan") as sp:
                    p = plan(desired, actual, scope, departed)
                    sp.set_attribute("vnet.ops", len(p.ops))
                    sp.set_attribute("vnet.plan_errors", len(p.errors))
                plan_s = time.perf_counter() - t
                ops_planned = len(p.ops)
                if planned is not None:
                    planned()
                for pe in p.errors:
                    err = ReconcileError(owner=pe.owner, code=pe.code, message=pe.message)
                    errors.append(err)
                    if pe.fatal:
                        failed.setdefault(pe.owner, err)
                if p.ops:
                    t = time.perf_counter()
                    with tracer.start_as_current_span("node.apply") as sp:
                        out = self.applier.apply(p, actual, gate)
                        sp.set_attribute("vnet.ops_applied", out.applied)
                        sp.set_attribute("vnet.writes", self.applier.writes - writes0)
                    apply_s = time.perf_counter() - t
                    ops_applied = out.applied
                    if any(isinstance(op, SetSysctl) and op.ns is None for op in p.ops):
                        self.observer.forget_host_sysctls()
                    errors.extend(out.errors)
                    for owner, err in out.failed.items():
                        failed.setdefault(owner, err)
                inherited = [d for d in departed if d.id in self._inherited and ep_owner(d.id) not in failed]
                if inherited:
                    self._drop_inherited_tables(inherited)
                self._remember_subifs(desired, departed, dict(failed))
                if scope is None:  # close the sockets of namespaces gone or no longer ours to watch
                    refs: set[str | None] = {self.host_netns}
                    refs |= set(actual.containers)
                    self.ctx.retain(refs)
                    self.ctx.prune()
            except NamespaceGone as exc:
                err = ReconcileError(owner="node", code=E.UNAVAILABLE.code,
                                     message=f"host namespace unavailable: {exc.strerror}", errno=exc.errno or 0)
                errors.append(err)
                failed["node"] = err
            except OSError as exc:
                err = ReconcileError(owner="node", code=E.UNAVAILABLE.code,
                                     message=f"cannot read the host's network state: {exc}", errno=exc.errno or 0)
                errors.append(err)
                failed["node"] = err
            except Exception as exc:  # a bug: report it on every object rather than kill the worker's loop
                log.exception("reconcile failed")
                err = ReconcileError(owner="node", code=E.INTERNAL.code,
                                     message=f"internal error while reconciling: {type(exc).__name__}: {exc}")
                errors.append(err)
                failed["node"] = err
                span.record_exception(exc)
            writes = self.applier.writes - writes0
            result = ReconcileResult(
                ops_planned=ops_planned, ops_applied=ops_applied, writes=writes, errors=errors,
                networks=self._statuses(desired, scope, failed, nets=True, plan_=p),
                endpoints=self._statuses(desired, scope, failed, nets=False, plan_=p),
                duration=time.perf_counter() - t0, observe_s=observe_s, plan_s=plan_s, apply_s=apply_s)
            span.set_attribute("vnet.ops", ops_planned)
            span.set_attribute("vnet.ops_applied", ops_applied)
            span.set_attribute("vnet.writes", writes)
            span.set_attribute("vnet.errors", len(errors))
            if failed:
                span.set_status(Status(StatusCode.ERROR, f"{len(failed)} object(s) failed"))
            return result

    @staticmethod
    def _statuses(desired: NodeDesired, scope: Scope | None, failed: dict[str, ReconcileError], *, nets: bool,
                  plan_: Plan | None) -> dict[str, ObjectStatus]:
        node_err = failed.get("node")  # the whole reconcile failed: every object with it
        owner: Callable[[str], str]
        if nets:
            ids = plan_.networks if plan_ is not None else [
                n.id for n in desired.networks if scope is None or n.id in scope.networks]
            owner = net_owner
        else:
            ids = plan_.endpoints if plan_ is not None else [
                e.id for e in desired.endpoints if scope is None or e.id in scope.endpoints]
            owner = ep_owner
        out: dict[str, ObjectStatus] = {}
        for i in ids:
            err = node_err or failed.get(owner(i))
            out[i] = (ObjectStatus(state="ready") if err is None else
                      ObjectStatus(state="failed", reason=err.message, code=err.code))
        return out

    def close(self) -> None:
        """The namespace threads end; a temporary key directory goes (a running tunnel keeps its
        key: wireguard-go read it when the device was set up)."""
        self.ctx.close()
        if self._tmp_state is not None:
            shutil.rmtree(self._tmp_state, ignore_errors=True)
            self._tmp_state = None

    def __enter__(self) -> Reconciler:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
