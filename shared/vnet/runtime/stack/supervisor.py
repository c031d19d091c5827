"""The supervisor: starts the children of a plan, waits until they answer health, restarts
what crashes (exponential backoff, reset once a process stayed up a while) and, on
SIGINT/SIGTERM/SIGHUP, stops everything in order and removes what it made. Every stop is
logged with its cause: the signal and the pid, uid and command line of its sender."""

from __future__ import annotations

import _thread
import asyncio
import contextlib
import datetime as dt
import fcntl
import logging
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from vnet.adapters import nats as nats_adapter
from vnet.contracts import subjects
from vnet.core.errors import VNetError
from vnet.runtime import cluster, credentials
from vnet.runtime.config import VNetConfig
from vnet.runtime.stack import readiness
from vnet.runtime.stack.down import cleanup_leftovers
from vnet.runtime.stack.layout import COMPONENTS, REPLICATED, Child, Plan, StackOptions, make_plan
from vnet.runtime.stack.netns import delete_netns
from vnet.runtime.stack.summary import format_summary
from vnet.runtime.stackfile import (
    LOCK_FILE,
    STACK_FILE,
    ProcEntry,
    Say,
    StackError,
    StackFile,
    describe_exit,
    parent_death_hook,
    proc_start_time,
    read_stack_file,
    tail,
    write_stack_file,
)
from vnet.runtime.stopsignals import STOP_SIGNALS, StopReason, StopSignals

RESTART_BASE_S = 0.5
RESTART_MAX_S = 30.0
# A process that stayed up this long is healthy again: its next crash restarts fast.
STABLE_AFTER_S = 10.0
SERVER_LISTEN_TIMEOUT_S = 15.0
TICK_S = 0.1
# --replicated-valkey: how long a dead Valkey data server that the Sentinels still call the
# primary waits for them to promote the replica before it is restarted as the primary anyway
# (the replica is gone too, say). Restarting it sooner would let clients, which follow the
# Sentinels, write to a server the failover then demotes: those writes would be lost.
VALKEY_HOLD_S = 30.0

# ``vnetctl up --demo``: (admin config, say) -> exit code; given by the CLI (vnet.demo.run_demo)
Demo = Callable[[VNetConfig, Say], Coroutine[Any, Any, int]]


class Supervisor:
    """Runs one local stack in this process until SIGINT/SIGTERM/SIGHUP."""

    def __init__(self, opts: StackOptions, config: VNetConfig, *, say: Say = print,
                 show: Say | None = None, demo: Demo | None = None) -> None:
        self.opts = opts
        self.base_config = config
        self.say = say  # timestamped events
        self.show = show or say  # plain blocks (the summary)
        self.state_dir = opts.state_dir.expanduser().absolute()
        self.logs_dir = self.state_dir / "logs"
        self.children: dict[str, Child] = {}
        self.plan: Plan | None = None
        self.config: VNetConfig | None = None
        self._lock_fd: int | None = None
        self._started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self._status = "starting"
        self._stopping = False
        self._stop_event: asyncio.Event | None = None
        self._force_event: asyncio.Event | None = None
        self._signals = 0
        self._loop: asyncio.AbstractEventLoop | None = None  # set while the event loop runs
        self._stop_signals: StopSignals | None = None
        self._death_hook = parent_death_hook(os.getpid(), unblock=STOP_SIGNALS)
        # ``vnetctl up --demo``: run once the stack is ready (the caller's; the client is a layer above)
        self._demo_run = demo

    # -- preparation (sync; raises StackError) --------------------------------------------
    def prepare(self) -> None:
        """Lock the state dir, clean up after a crashed stack, pick ports, make the sandbox."""
        self._take_stop_signals()
        # This process is the stack: everything it and its children create (logs, the data
        # files of the servers, JetStream's store) is private to the owner from the start.
        os.umask(0o077)
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=credentials.DIR_MODE)
            self.logs_dir.mkdir(parents=True, exist_ok=True, mode=credentials.DIR_MODE)
        except OSError as exc:
            raise StackError(f"cannot create the state directory {self.state_dir}: {exc.strerror}; "
                             "choose another with --state-dir or $VNET_STATE_DIR") from None
        for problem in credentials.secure_tree(self.state_dir):  # one made by an older version was 755/644
            self.say(f"warning: {problem}")
        self._lock()
        try:
            self._clean_stale()
            self.plan = make_plan(self.opts, self.base_config, state_dir=self.state_dir, logs_dir=self.logs_dir,
                                  say=self.say)
            self.config = self.plan.config
            self.children = {spec.name: Child(spec) for spec in self.plan.children}
        except BaseException:
            self._unlock()
            raise

    def _take_stop_signals(self) -> None:
        """Log every stop with its cause: which signal and who sent it (vnet.runtime.stopsignals).

        SIGINT/SIGTERM/SIGHUP are blocked and one thread takes them with ``sigwaitinfo``.
        Before the event loop runs (preparing: a sandbox namespace may be half made) a stop
        unwinds the main thread like Ctrl-C, so what was made is removed again; once it runs,
        the first stop stops the stack in order and a second kills at once. The parent is not
        watched: a detached supervisor's launcher exits on purpose once the stack is ready.
        """
        if self._stop_signals is None:
            self._stop_signals = StopSignals(self._on_stop_signal, watch_parent=False)
            self._stop_signals.start()

    def _on_stop_signal(self, reason: StopReason) -> None:  # runs in the signal thread
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop just closed: fall through
                loop.call_soon_threadsafe(self._on_signal, reason)
                return
        self.say(f"{reason.describe()}: interrupting the start")
        _thread.interrupt_main()  # KeyboardInterrupt in the main thread, as Ctrl-C before

    def _lock(self) -> None:
        fd = os.open(self.state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            try:
                other = read_stack_file(self.state_dir)
            except StackError:
                other = None
            who = f" (supervisor pid {other.supervisor_pid})" if other else ""
            raise StackError(f"a local stack is already running from {self.state_dir}{who}; stop it with "
                             f"`vnetctl down --state-dir {shlex.quote(str(self.state_dir))}` or use another "
                             "--state-dir") from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _clean_stale(self) -> None:
        # We hold the lock, so a stack file here belongs to a supervisor that died
        # without cleaning up (SIGKILL, power loss): finish its job before starting.
        stale = read_stack_file(self.state_dir)
        if stale is None:
            return
        self.say(f"cleaning up after a stack that did not stop cleanly (supervisor pid {stale.supervisor_pid})")
        for problem in cleanup_leftovers(self.state_dir, stale, say=self.say):
            self.say(f"warning: {problem}")

    def _component_names(self) -> list[str]:
        """The services (with their replicas ``<service>-<n>``) and the node worker."""
        def ours(n: str) -> bool:
            base, _, num = n.rpartition("-")
            return n in COMPONENTS or (base in REPLICATED and num.isdigit())
        return [n for n in self.children if ours(n)]

    def _server_names(self) -> list[str]:
        """The servers this stack runs (each has a port the stack waits for): nats-server (and
        nats-server-<i> of a cluster), valkey-server (and its replica and Sentinels)."""
        return [n for n, c in self.children.items() if c.spec.port is not None]

    async def _replicate_stream(self) -> None:
        """A cluster: make VNET_EVENTS with min(3, N) replicas once the servers have formed one."""
        if self.plan is None or self.plan.stream_identity is None:
            return
        want = min(3, self.opts.cluster)
        try:
            nc = await nats_adapter.connect(self.plan.stream_identity, "vnet-supervisor-stream")
        except VNetError as err:
            raise StackError(f"cannot reach the NATS cluster to make the event stream: {err.message}") from None
        try:
            got = await cluster.ensure_replicated_stream(nc, want, timeout=SERVER_LISTEN_TIMEOUT_S * 2)
        except RuntimeError as exc:
            raise StackError(f"{exc}; see the logs in {self.logs_dir}") from None
        finally:
            await nc.close()
        self.say(f"NATS cluster of {self.opts.cluster} servers; {subjects.EVENTS_STREAM} has {got} replicas")

    # -- the state file -------------------------------------------------------------------
    def stack_file(self) -> StackFile:
        assert self.plan is not None
        p = self.plan
        return StackFile(
            status=self._status, supervisor_pid=os.getpid(), supervisor_start_time=proc_start_time(os.getpid()),
            detached=self.opts.detached, state_dir=str(self.state_dir), started_at=self._started_at,
            nats_url=p.nats_url, redis_url=p.redis_url, nats_port=p.nats_port, redis_port=p.redis_port,
            metrics_port=p.metrics_port, metrics_url=f"http://127.0.0.1:{p.metrics_port}/metrics",
            node_id=p.node_id, netns=p.netns, host_netns=p.host_netns, privileged=p.privileged,
            logs_dir=str(self.logs_dir), auth=p.nats_port is not None, nats_tls_ca=p.nats_tls_ca,
            processes={name: ProcEntry(pid=c.pid, start_time=c.start_time, log=str(c.spec.log),
                                       restarts=c.restarts, argv=c.spec.argv)
                       for name, c in self.children.items() if c.proc is not None})

    def _save(self) -> None:
        try:
            write_stack_file(self.state_dir, self.stack_file())
        except OSError as exc:
            self.say(f"warning: cannot write {self.state_dir / STACK_FILE}: {exc.strerror}")

    # -- running ----------------------------------------------------------------------------
    def run(self) -> int:
        """Start everything, wait for health, supervise until a signal; 0 on a clean stop."""
        if self.plan is None:
            self.prepare()
        # The readiness client's connect/close chatter is noise next to the summary; real
        # trouble surfaces as a health probe that does not answer.
        for name in ("nats", "vnet.adapters.nats"):
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            return asyncio.run(self._main())
        except BaseException:
            self._abandon()
            raise
        finally:
            self._unlock()

    def _abandon(self) -> None:
        """Last resort when the event loop could not run its own shutdown (a signal in
        the instant before its handlers were installed): kill, delete, remove."""
        for c in self.children.values():
            if c.proc is not None and c.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(c.proc.pid, signal.SIGKILL)
                c.proc.wait()
        if self.plan is not None and self.plan.netns:
            delete_netns(self.plan.netns)
        (self.state_dir / STACK_FILE).unlink(missing_ok=True)

    def _on_signal(self, reason: StopReason) -> None:
        assert self._stop_event is not None and self._force_event is not None
        self._signals += 1
        if self._signals == 1:
            self.say(f"{reason.describe()}: stopping the stack (a second one kills at once)")
            self._stop_event.set()
        else:
            self.say(f"{reason.describe()}: killing the stack now")
            self._force_event.set()

    async def _main(self) -> int:
        self._stop_event = asyncio.Event()
        self._force_event = asyncio.Event()
        self._take_stop_signals()  # run() without prepare() first
        self._loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        code = 0
        supervise: asyncio.Task[None] | None = None
        try:
            self._save()
            for name in self._server_names():
                self._spawn(self.children[name])
            for name in self._server_names():
                await self._wait_listening(self.children[name])
            if self._stop_event.is_set():
                return code
            await self._replicate_stream()
            assert self.plan is not None and self.config is not None
            before = await readiness.instances(self.config) if self.opts.nats_url else None
            for name in self._component_names():
                self._spawn(self.children[name])
            self._save()
            supervise = asyncio.create_task(self._supervise())
            degraded = await readiness.wait_ready(
                self.config, node_id=self.plan.node_id, before=before, timeout=self.opts.ready_timeout,
                stop=self._stop_event, children=self.children, nats_url=self.plan.nats_url,
                redis_url=self.plan.redis_url, logs_dir=self.logs_dir)
            if not self._stop_event.is_set():
                self._status = "ready"
                self._save()
                self.show(format_summary(self.stack_file(), elapsed=time.monotonic() - t0, degraded=degraded))
                if self.opts.demo and self._demo_run is not None:
                    await self._demo(self.config, self._demo_run)
                await self._stop_event.wait()
        except StackError as err:
            self.say(f"error: {err.message}")
            code = err.exit_code
        finally:
            await self._shutdown()
            if supervise is not None:
                supervise.cancel()
                await asyncio.gather(supervise, return_exceptions=True)
            self._loop = None
        return code

    async def _demo(self, config: VNetConfig, run_demo: Demo) -> None:
        self.show("\nDemo: the main job, end to end")
        try:
            demo = asyncio.create_task(run_demo(config, self.show))
            stop = asyncio.create_task(self._stop_event.wait()) if self._stop_event else None
            done, _ = await asyncio.wait([t for t in (demo, stop) if t], return_when=asyncio.FIRST_COMPLETED)
            if demo not in done:
                demo.cancel()
            if stop is not None and stop not in done:
                stop.cancel()
            if demo in done:
                code = demo.result()
                self.show("Demo done: " + ("every result matched explain" if code == 0 else
                                           "some results did not match explain (see above)")
                          + "; the stack keeps running (Ctrl-C stops it)")
        except Exception as exc:
            self.say(f"demo failed: {exc}")

    def _spawn(self, child: Child, extra: list[str] | None = None) -> None:
        spec = child.spec
        argv = spec.argv + (extra or [])
        with open(spec.log, "ab") as fh:
            stamp = dt.datetime.now().isoformat(sep=" ", timespec="seconds")
            again = f" (restart {child.restarts})" if child.restarts else ""
            fh.write(f"--- {stamp} vnet supervisor: starting {spec.name}{again}: {shlex.join(argv)}\n".encode())
            fh.flush()
            try:
                child.proc = subprocess.Popen(
                    argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=spec.env,
                    cwd=self.state_dir, start_new_session=True, preexec_fn=self._death_hook)
            except OSError as exc:
                raise StackError(f"cannot start {spec.name} ({spec.argv[0]}): {exc.strerror}") from None
        child.start_time = proc_start_time(child.proc.pid)
        child.started_mono = time.monotonic()
        child.restart_at = None

    async def _wait_listening(self, child: Child) -> None:
        assert child.spec.port is not None and child.proc is not None and self._stop_event is not None
        port = child.spec.port
        deadline = time.monotonic() + SERVER_LISTEN_TIMEOUT_S
        while not self._stop_event.is_set():
            rc = child.proc.poll()
            if rc is not None:
                raise StackError(f"{child.spec.name} exited ({describe_exit(rc)}) before listening on port "
                                 f"{port}; its log {child.spec.log} ends with:\n{tail(child.spec.log)}")
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 0.5)
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
                return
            except (OSError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise StackError(f"{child.spec.name} did not listen on 127.0.0.1:{port} within "
                                 f"{SERVER_LISTEN_TIMEOUT_S:.0f}s; see {child.spec.log}")
            await asyncio.sleep(0.05)

    async def _supervise(self) -> None:
        while not self._stopping:
            now = time.monotonic()
            changed = False
            for child in self.children.values():
                proc = child.proc
                if proc is not None and proc.poll() is not None:
                    up_for = now - child.started_mono
                    child.failures = 1 if up_for >= STABLE_AFTER_S else child.failures + 1
                    delay = min(RESTART_BASE_S * 2 ** (child.failures - 1), RESTART_MAX_S)
                    self.say(f"{child.spec.name} (pid {proc.pid}) exited with {describe_exit(proc.returncode)} "
                             f"after {up_for:.1f}s; restarting in {delay:.1f}s (log: {child.spec.log})")
                    child.proc = None
                    child.restart_at = now + delay
                    child.died_mono = now
                    child.held = False
                elif proc is None and child.restart_at is not None and now >= child.restart_at:
                    extra = await self._valkey_restart_args(child, now)
                    if extra is None:
                        child.restart_at = now + RESTART_BASE_S
                        continue
                    child.restarts += 1
                    try:
                        self._spawn(child, extra)
                    except StackError as err:
                        self.say(f"error: {err.message}; trying again")
                        child.failures += 1
                        child.restart_at = now + min(RESTART_BASE_S * 2 ** child.failures, RESTART_MAX_S)
                        continue
                    self.say(f"{child.spec.name} restarted as pid {child.pid} (restart {child.restarts})")
                    changed = True
                elif proc is not None and child.failures and now - child.started_mono >= STABLE_AFTER_S:
                    child.failures = 0
            if changed:
                self._save()
            await asyncio.sleep(TICK_S)

    async def _valkey_restart_args(self, child: Child, now: float) -> list[str] | None:
        """How to restart a Valkey data server of ``--replicated-valkey``: as a replica of the
        primary the Sentinels name (``--replicaof``, ahead of what its file says), or as it was
        when they still name it after VALKEY_HOLD_S; None: not yet (they still name it, the
        failover is under way). Any other child: as it was ([])."""
        group = self.plan.valkey_group if self.plan is not None else None
        if group is None or child.spec.name not in group.data:
            return []
        primary = await cluster.sentinel_primary(group.sentinel_ports, group.service)
        if primary is not None and primary[1] != group.data[child.spec.name]:
            return ["--replicaof", primary[0], str(primary[1])]
        if now - child.died_mono < VALKEY_HOLD_S:
            if not child.held:
                child.held = True
                self.say(f"{child.spec.name} waits for the Sentinels to promote the replica before it restarts "
                         f"(at most {VALKEY_HOLD_S:.0f}s)")
            return None
        self.say(f"the Sentinels named no other primary within {VALKEY_HOLD_S:.0f}s; restarting "
                 f"{child.spec.name} as the primary")
        return []

    async def _stop_children(self, names: Iterable[str]) -> None:
        assert self._force_event is not None
        group = [self.children[n] for n in names if n in self.children]
        for c in group:
            if c.running():
                assert c.proc is not None
                with contextlib.suppress(ProcessLookupError):
                    c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.opts.stop_timeout
        # Wake on a second Ctrl-C (force) as well as on children exiting.
        while any(c.running() for c in group) and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._force_event.wait(), 0.05)
            if self._force_event.is_set():
                break
        for c in group:
            if c.proc is None:
                continue
            if c.running():
                self.say(f"{c.spec.name} (pid {c.pid}) did not stop within {self.opts.stop_timeout:.0f}s; killing it")
            # Each child leads its own process group: this also ends anything it spawned.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(c.proc.pid, signal.SIGKILL)
            c.proc.wait()

    async def _shutdown(self) -> None:
        self._stopping = True
        if self.plan is None:
            return
        self._status = "stopping"
        if any(c.proc is not None for c in self.children.values()):
            self._save()
        # Services first, while NATS and Redis are still there for them to drain against.
        await self._stop_children(self._component_names())
        await self._stop_children(self._server_names())
        problems: list[str] = []
        if self.plan.netns:
            problems += delete_netns(self.plan.netns)
        with contextlib.suppress(FileNotFoundError):
            (self.state_dir / STACK_FILE).unlink()
        for p in problems:
            self.say(f"warning: {p}")
        left = "" if problems else "; nothing left running"
        self.say(f"stopped{left} (data and logs kept in {self.state_dir})")
