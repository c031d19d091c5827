"""The embedded local stack: servers, services and a node worker under one supervisor.

``vnetctl up`` builds a :class:`Supervisor` from :class:`StackOptions`, which starts
``nats-server`` (JetStream on) and ``valkey-server`` (AOF on) unless URLs of existing
servers are given, then the five services and one node worker, restarts whatever
crashes (exponential backoff, reset once a process has stayed up a while), and on
SIGINT/SIGTERM stops everything, deletes the sandbox namespace it made and removes
its state file. ``vnetctl down`` (:func:`stop_stack`) signals that supervisor.

A state directory holds::

    stack.json        what runs: URLs, ports, pids, namespace (only while the stack is up)
    stack.lock        flock held by the supervisor for its whole life (one stack per dir)
    credentials.json  NATS and Valkey passwords, one per identity (vnet.runtime.credentials)
    nats.conf         nats-server users and permissions, generated from vnet.contracts.permissions
    valkey.conf       Valkey ACL users (services only; the default user is off)
    nats/jetstream/   JetStream data (kept across up/down)
    valkey/           Redis data, AOF + RDB (kept across up/down)
    logs/<name>.log   one per process; supervisor.log when detached

Security: the directory is 0700 and every file in it 0600 (the supervisor runs with umask
077 and repairs an older directory). NATS and Valkey accept no connection without a
password; each service, the node worker and the local user's vnetctl (admin) get their own
identity, so a process of another local user gets nothing.

Safety: the stack never configures the machine's root network namespace. As root it
creates a sandbox namespace (``ip netns add``, loopback up inside it) for the node
worker to manage; the root namespace is handed to the worker only on an explicit
``host_root_netns``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import datetime as dt
import fcntl
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec

from vnet.contracts import permissions, subjects
from vnet.core.errors import VNetError
from vnet.runtime import credentials, servers, tls
from vnet.runtime.config import ENV_PREFIX, VNetConfig, with_local_stack

STACK_FILE = "stack.json"
LOCK_FILE = "stack.lock"
NATS = "nats-server"
VALKEY = "valkey-server"
SERVERS = (NATS, VALKEY)
NODE = subjects.NODE_SERVICE
# Everything that must answer health before the stack counts as ready.
COMPONENTS = (*subjects.SERVICES, NODE)
# Services `vnetctl up --replicas N` runs N of (metrics serves /metrics on one port: one).
REPLICATED = tuple(s for s in subjects.SERVICES if s != "metrics")

RESTART_BASE_S = 0.5
RESTART_MAX_S = 30.0
# A process that stayed up this long is healthy again: its next crash restarts fast.
STABLE_AFTER_S = 10.0
SERVER_LISTEN_TIMEOUT_S = 15.0
TICK_S = 0.1

Say = Callable[[str], None]

_NODE_ID_BAD = re.compile(r"[^A-Za-z0-9_-]")


class StackError(Exception):
    """A problem the user can act on; the message says what and how."""

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


# --- the state file ---------------------------------------------------------------------

class ProcEntry(msgspec.Struct, kw_only=True):
    pid: int
    # Kernel start time (clock ticks since boot) of that pid: tells our process from a
    # later one that got the same pid, so stale cleanup never signals a stranger.
    start_time: int | None
    log: str
    restarts: int = 0
    argv: list[str] = []


class StackFile(msgspec.Struct, kw_only=True):
    version: int = 1
    status: str  # starting | ready | stopping
    supervisor_pid: int
    supervisor_start_time: int | None
    detached: bool = False
    state_dir: str
    started_at: str
    nats_url: str
    redis_url: str
    nats_port: int | None  # None: an existing server the stack does not manage
    redis_port: int | None
    metrics_port: int
    metrics_url: str
    node_id: str
    netns: str | None  # the sandbox namespace this stack created and deletes on stop
    host_netns: str | None  # what the node worker manages; None: the namespace it runs in
    privileged: bool
    logs_dir: str
    processes: dict[str, ProcEntry] = {}
    auth: bool = False  # NATS and Valkey of this stack require the credentials in the state dir
    nats_tls_ca: str | None = None  # the CA a client verifies the stack's NATS with (TLS on)

    def connection_settings(self) -> dict[str, Any]:
        """What a client needs to reach this stack, as VNetConfig fields (credentials belong
        here too): ``VNetConfig.load()`` and vnetctl apply it (``config.with_local_stack``)."""
        return {"nats_url": self.nats_url, "redis_url": self.redis_url, **stack_credentials(self)}


def default_state_dir(env: Mapping[str, str] | None = None) -> Path:
    """``$VNET_STATE_DIR``, else ``$XDG_STATE_HOME/vnet``, else ``~/.local/state/vnet``."""
    env = os.environ if env is None else env
    if env.get("VNET_STATE_DIR"):
        return Path(env["VNET_STATE_DIR"]).expanduser()
    base = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base).expanduser() / "vnet"


def read_stack_file(state_dir: Path) -> StackFile | None:
    path = state_dir / STACK_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StackError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return msgspec.json.decode(data, type=StackFile)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise StackError(f"{path} is not a VNet stack file ({exc}); if no stack runs from {state_dir}, "
                         "delete it") from None


def write_stack_file(state_dir: Path, stack: StackFile) -> None:
    # Atomic (a reader, vnetctl status or down, never sees a half-written file) and 0600.
    credentials.private_write(state_dir / STACK_FILE, msgspec.json.format(msgspec.json.encode(stack)))


def stack_credentials(stack: StackFile, role: str = permissions.ADMIN) -> dict[str, Any]:
    """VNetConfig fields that log a caller into ``stack``'s own NATS as ``role`` (the stack's
    owner is its admin); empty for a NATS the stack does not manage, or when the
    credentials cannot be read (another user's stack: that is the point)."""
    if stack.nats_port is None:
        return {}
    settings = credentials.client_settings(Path(stack.state_dir), role)
    if settings and stack.nats_tls_ca:
        settings["nats_tls_ca"] = stack.nats_tls_ca
    return settings


def running_stack(state_dir: Path) -> StackFile | None:
    """The stack file of ``state_dir`` if its supervisor is alive, else None."""
    stack = read_stack_file(state_dir)
    if stack is None or not pid_alive(stack.supervisor_pid, stack.supervisor_start_time):
        return None
    return stack


def apply_running_stack(config: VNetConfig, *, explicit_nats: bool = False) -> VNetConfig:
    """Point ``config`` at the running local stack unless the user named servers.

    The user named a NATS server when ``explicit_nats`` (``--nats``), ``VNET_NATS_URL``
    is set, or the config file changed ``nats_url`` from its default; then ``config`` is
    returned as is. Otherwise, if the stack of the default state directory is up, its
    NATS URL (and its Redis URL, unless named likewise) replace the defaults.
    """
    named = {f for f in VNetConfig.__struct_fields__ if os.environ.get(ENV_PREFIX + f.upper())}
    if explicit_nats:
        named.add("nats_url")
    return with_local_stack(config, named=named)


# --- processes --------------------------------------------------------------------------

def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time) of a pid from /proc, None if there is no such process."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: split after its closing one.
    rest = data[data.rindex(")") + 2:].split()
    return rest[0], int(rest[19])


def proc_start_time(pid: int) -> int | None:
    st = _proc_stat(pid)
    return st[1] if st else None


def pid_alive(pid: int, start_time: int | None = None) -> bool:
    """Whether ``pid`` runs (zombies count as gone) and, if given, started at ``start_time``."""
    if pid <= 0:
        return False
    st = _proc_stat(pid)
    if st is None:
        if Path("/proc/self/stat").exists():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    state, started = st
    if state in ("Z", "X"):
        return False
    return start_time is None or started == start_time


def _signal_tree(pid: int, sig: int) -> None:
    """Signal a child and, since each child leads its own process group, what it spawned."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _parent_death_hook(parent: int) -> Callable[[], None] | None:
    """A preexec hook that makes the child get SIGTERM when the supervisor dies.

    Without it a SIGKILLed supervisor would leave every child running (they sit in their
    own sessions so a terminal's Ctrl-C reaches only the supervisor, which stops them in
    order). libc is resolved here, before fork, so the hook itself only makes a call.
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def hook() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM))
        if os.getppid() != parent:  # the supervisor died before prctl: follow it now
            os.kill(os.getpid(), signal.SIGTERM)

    return hook


# --- network namespaces -----------------------------------------------------------------

def _ip_binary() -> str:
    found = shutil.which("ip") or next((p for p in ("/usr/sbin/ip", "/sbin/ip") if os.path.exists(p)), None)
    if not found:
        raise StackError("the `ip` command (iproute2) is needed to create the sandbox network namespace; "
                         "install iproute2 (apt-get install iproute2)")
    return found


def netns_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


def _run_ip(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_ip_binary(), *args], capture_output=True, text=True, timeout=10, check=False)


def create_sandbox_netns(name: str) -> None:
    """``ip netns add NAME`` and loopback up inside it; nothing outside it is touched."""
    res = _run_ip(["netns", "add", name])
    if res.returncode != 0:
        raise StackError(f"cannot create the sandbox network namespace {name}: {res.stderr.strip()}; "
                         "the node worker needs CAP_SYS_ADMIN for that (run as root), or pass "
                         "--host-root-netns to let it manage this machine's own namespace")
    res = _run_ip(["-n", name, "link", "set", "lo", "up"])
    if res.returncode != 0:
        delete_netns(name)
        raise StackError(f"cannot bring up loopback in the sandbox namespace {name}: {res.stderr.strip()}")


def delete_netns(name: str) -> list[str]:
    """Kill what runs inside the namespace (it would keep it alive), then delete it.

    Returns the problems met (empty when all went well): teardown goes on past errors.
    """
    problems: list[str] = []
    if not netns_exists(name):
        return problems
    res = _run_ip(["netns", "pids", name])
    for tok in res.stdout.split():
        with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
            os.kill(int(tok), signal.SIGKILL)
    res = _run_ip(["netns", "del", name])
    if res.returncode != 0 and netns_exists(name):
        problems.append(f"could not delete network namespace {name}: {res.stderr.strip()} "
                        f"(remove it with `ip netns del {name}`)")
    return problems


def sandbox_netns_name(env: Mapping[str, str] | None = None) -> str:
    """``vnet-<id>-host``, led by ``$VNET_RUN_PREFIX`` when set so test leftovers are recognisable."""
    env = os.environ if env is None else env
    prefix = env.get("VNET_RUN_PREFIX")
    while True:
        short = secrets.token_hex(3)
        name = f"{prefix}-vnet-{short}-host" if prefix else f"vnet-{short}-host"
        if not netns_exists(name):
            return name


# --- options and children ---------------------------------------------------------------

@dataclass
class StackOptions:
    state_dir: Path
    nats_url: str | None = None  # an existing server: do not start nats-server
    redis_url: str | None = None  # an existing server: do not start valkey-server
    nats_port: int | None = None
    redis_port: int | None = None
    metrics_port: int | None = None
    node_id: str | None = None
    host_root_netns: bool = False
    ready_timeout: float = 30.0
    stop_timeout: float = 10.0
    detached: bool = False
    demo: bool = False  # after ready, run the demo (vnet.runtime.demo) once, then keep running
    # nats-servers of the stack's own (routes on loopback, VNET_EVENTS with min(3, N) replicas):
    # vnet.runtime.cluster, docs/scale.md. 1: one server, as before.
    cluster: int = 1
    # Instances of each API service (ipam, network, endpoint, policy) in their queue group:
    # "ipam", "ipam-2", ... The metrics service stays one (it serves /metrics on one port).
    replicas: int = 1


def valid_node_id(node_id: str) -> bool:
    """Node ids are NATS subject tokens."""
    return bool(node_id) and not _NODE_ID_BAD.search(node_id)


def default_node_id() -> str:
    name = socket.gethostname().split(".")[0] or "local"
    return _NODE_ID_BAD.sub("-", name)


def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # Match what the servers do, so a port in TIME_WAIT does not count as taken.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _pick_port(explicit: int | None, flag: str, what: str, taken: set[int]) -> int:
    if explicit is not None:
        if explicit in taken or not _port_free(explicit):
            raise StackError(f"port {explicit} on 127.0.0.1 is already in use, so {what} cannot listen there; "
                             f"choose another with {flag}, or leave {flag} out to use a free port")
        taken.add(explicit)
        return explicit
    while True:
        port = servers.free_port()
        if port not in taken:
            taken.add(port)
            return port


def _check_reachable(url: str, default_port: int, what: str, flag: str) -> None:
    parts = urlsplit(url)
    if parts.scheme in ("unix", "unixs"):
        return
    host = parts.hostname or "127.0.0.1"
    try:
        port = parts.port or default_port
    except ValueError:
        raise StackError(f"{flag} {url!r} has an invalid port") from None
    try:
        with socket.create_connection((host, port), timeout=2.0):
            pass
    except OSError as exc:
        raise StackError(f"cannot reach {what} at {url} ({exc.strerror or exc}); start it, fix {flag}, "
                         f"or leave {flag} out to let `vnetctl up` start its own") from None


@dataclass
class ChildSpec:
    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    port: int | None = None  # servers: the stack is not usable before this port listens


@dataclass
class Child:
    spec: ChildSpec
    proc: subprocess.Popen[bytes] | None = None
    start_time: int | None = None
    started_mono: float = 0.0
    restarts: int = 0
    failures: int = 0  # consecutive short-lived runs; sets the backoff
    restart_at: float | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def entry_argv(script: str, module: str, func: str, args: list[str]) -> list[str]:
    """A console script next to the interpreter (so ``ps`` reads well), else the same
    entry point through ``python -c`` (``-m`` would load the module twice under two names)."""
    path = Path(sys.executable).parent / script
    if path.exists():
        return [sys.executable, str(path), *args]
    return [sys.executable, "-c", f"from {module} import {func}; {func}()", *args]


def _launcher_argv(kind: str, args: list[str]) -> list[str]:
    func = "service_main" if kind == "vnet-service" else "node_main"
    return entry_argv(kind, "vnet.runtime.launcher", func, args)


def child_env(config: VNetConfig, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The parent's environment minus every VNet setting, plus ``config`` as ``VNET_*``.

    Settings are stripped first so a stray ``VNET_NATS_URL`` in the user's shell cannot
    point a child elsewhere; ``VNET_CONFIG`` too, since ``config`` already holds the file.
    """
    base = os.environ if base is None else base
    fields = set(VNetConfig.env_names()) | {"VNET_CONFIG"}
    env = {k: v for k, v in base.items() if not (k.startswith(ENV_PREFIX) and k in fields)}
    env.update(config.to_env())
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class _Identities:
    """The config each process of the stack runs with: its own NATS user (when the stack
    runs NATS) and, for services only, its own Valkey user (when the stack runs Valkey)."""

    shared: VNetConfig
    nats: credentials.Credentials | None
    redis: credentials.Credentials | None

    def _nats(self, cfg: VNetConfig, user: permissions.User) -> VNetConfig:
        if self.nats is None:
            return cfg
        return msgspec.structs.replace(cfg, nats_user=user.name, nats_password=self.nats.nats[user.name],
                                       nats_token=None, nats_creds=None, nats_inbox_prefix=None)

    def admin(self) -> VNetConfig:
        return self._nats(self.shared, permissions.admin_user())

    def service(self, name: str) -> VNetConfig:
        cfg = self._nats(self.shared, permissions.service_user(name))
        if self.redis is None:
            return cfg
        user = credentials.service_redis_user(name)
        return msgspec.structs.replace(cfg, redis_username=user, redis_password=self.redis.redis[user])

    def node(self, node_id: str) -> VNetConfig:
        # Node workers hold no Valkey credentials (design rule): none are passed down.
        cfg = self._nats(self.shared, permissions.node_user(node_id))
        return msgspec.structs.replace(cfg, redis_username=None, redis_password=None)


# --- the supervisor ---------------------------------------------------------------------

@dataclass
class _Plan:
    nats_url: str
    redis_url: str
    nats_port: int | None
    redis_port: int | None
    metrics_port: int
    node_id: str
    netns: str | None
    host_netns: str | None
    privileged: bool
    children: list[ChildSpec] = field(default_factory=list)
    nats_tls_ca: str | None = None  # TLS on: the CA of the stack's own certificates


class Supervisor:
    """Runs one local stack in this process until SIGINT/SIGTERM/SIGHUP."""

    def __init__(self, opts: StackOptions, config: VNetConfig, *, say: Say = print,
                 show: Say | None = None) -> None:
        self.opts = opts
        self.base_config = config
        self.say = say  # timestamped events
        self.show = show or say  # plain blocks (the summary)
        self.state_dir = opts.state_dir.expanduser().absolute()
        self.logs_dir = self.state_dir / "logs"
        self.children: dict[str, Child] = {}
        self.plan: _Plan | None = None
        self.config: VNetConfig | None = None
        self._lock_fd: int | None = None
        self._started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self._status = "starting"
        self._stopping = False
        self._stop_event: asyncio.Event | None = None
        self._force_event: asyncio.Event | None = None
        self._signals = 0
        self._death_hook = _parent_death_hook(os.getpid())
        self._stream_identity: VNetConfig | None = None  # --cluster: who makes the replicated stream

    # -- preparation (sync; raises StackError) --------------------------------------------
    def prepare(self) -> None:
        """Lock the state dir, clean up after a crashed stack, pick ports, make the sandbox."""
        # Until the event loop takes over, SIGTERM/SIGHUP must unwind like Ctrl-C so a
        # namespace made here is deleted again.
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _raise_interrupt)
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
            self.plan = self._make_plan()
        except BaseException:
            self._unlock()
            raise

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

    def _make_plan(self) -> _Plan:
        o = self.opts
        taken: set[int] = set()
        nats_bin = valkey_bin = None
        try:
            if o.nats_url is None:
                nats_bin = servers.nats_server_binary()
            if o.redis_url is None:
                valkey_bin = servers.valkey_server_binary()
        except FileNotFoundError as exc:
            raise StackError(f"{exc}; or give an existing server with --nats-url / --redis-url") from None
        if o.nats_url is not None:
            _check_reachable(o.nats_url, 4222, "NATS", "--nats-url")
        if o.redis_url is not None:
            _check_reachable(o.redis_url, 6379, "Redis", "--redis-url")
        nats_port = None if o.nats_url else _pick_port(o.nats_port, "--nats-port", "nats-server", taken)
        redis_port = None if o.redis_url else _pick_port(o.redis_port, "--redis-port", "valkey-server", taken)
        metrics_port = _pick_port(o.metrics_port, "--metrics-port", "the metrics service", taken)
        nats_url = o.nats_url or f"nats://127.0.0.1:{nats_port}"
        # No password in the URL: stack.json and `ps` would show it; credentials travel apart.
        redis_url = o.redis_url or f"redis://127.0.0.1:{redis_port}/0"
        node_id = o.node_id or default_node_id()
        try:
            # Servers of our own get generated users; existing ones keep the user's settings.
            creds = credentials.ensure(self.state_dir, [node_id]) if (nats_bin or valkey_bin) else None
        except (OSError, credentials.CredentialsError) as exc:
            raise StackError(f"cannot prepare the stack's credentials in {self.state_dir}: {exc}") from None

        privileged = os.geteuid() == 0
        netns: str | None = None
        host_netns: str | None = None
        if privileged and not o.host_root_netns:
            netns = sandbox_netns_name()
            create_sandbox_netns(netns)
            host_netns = netns
        try:
            if not privileged:
                self.say("not running as root: the node worker will run and answer health, but it cannot change "
                         "a kernel (no sandbox namespace is made, networks get no data plane); run "
                         "`sudo vnetctl up` for a working data plane")
            elif o.host_root_netns:
                self.say("warning: --host-root-netns: the node worker manages THIS MACHINE's own network "
                         "namespace (bridges, veths, nftables there)")
            tls_block: dict[str, str] | None = None
            if nats_bin is not None and self.base_config.stack_tls:
                try:
                    tls_block = tls.nats_tls_block(self.state_dir)
                except (OSError, tls.TLSError) as exc:
                    raise StackError(f"cannot make the TLS certificates in {self.state_dir / tls.TLS_DIR}: "
                                     f"{exc}") from None
            shared = msgspec.structs.replace(
                self.base_config, nats_url=nats_url, redis_url=redis_url, metrics_http_host="127.0.0.1",
                metrics_http_port=metrics_port, node_id=node_id, host_netns=host_netns,
                nats_tls_ca=tls_block["ca_file"] if tls_block else self.base_config.nats_tls_ca)
            roles = _Identities(shared, creds if nats_bin else None, creds if valkey_bin else None)
            # The supervisor's own probes (health, discovery, the demo) run as the admin.
            self.config = roles.admin()
            env = child_env(self.config)
            logs = self.logs_dir
            children: list[ChildSpec] = []
            if nats_bin is not None and nats_port is not None and creds is not None and o.cluster > 1:
                children += self._cluster_children(creds, node_id, tls_block, nats_port, taken, env)
                shared = msgspec.structs.replace(shared, nats_url=",".join(
                    f"nats://127.0.0.1:{c.port}" for c in children if c.port is not None))
                nats_url = shared.nats_url
                roles = _Identities(shared, creds, creds if valkey_bin else None)
                self.config = roles.admin()
                env = child_env(self.config)
                # VNET_EVENTS is made with its replicas before any service could make it with one
                self._stream_identity = roles.service("endpoint")
            elif nats_bin is not None and nats_port is not None and creds is not None:
                (self.state_dir / "nats").mkdir(exist_ok=True, mode=credentials.DIR_MODE)
                conf = credentials.write_nats_conf(self.state_dir, creds, [node_id], tls=tls_block)
                args = servers.nats_args(nats_port, self.state_dir / "nats", config_file=conf)
                children.append(ChildSpec(NATS, args, env, logs / f"{NATS}.log", nats_port))
            if valkey_bin is not None and redis_port is not None and creds is not None:
                (self.state_dir / "valkey").mkdir(exist_ok=True, mode=credentials.DIR_MODE)
                conf = credentials.write_valkey_conf(self.state_dir, creds)
                args = servers.valkey_args(redis_port, self.state_dir / "valkey", config_file=conf)
                children.append(ChildSpec(VALKEY, args, env, logs / f"{VALKEY}.log", redis_port))
            for name in subjects.SERVICES:
                children.append(ChildSpec(name, _launcher_argv("vnet-service", [name]),
                                          child_env(roles.service(name)), logs / f"{name}.log"))
                for r in range(2, (o.replicas if name in REPLICATED else 1) + 1):
                    children.append(ChildSpec(f"{name}-{r}", _launcher_argv("vnet-service", [name]),
                                              child_env(roles.service(name)), logs / f"{name}-{r}.log"))
            node_args = ["--node-id", node_id] + (["--host-netns", host_netns] if host_netns else [])
            # names that follow isolation on every gateway, and the CNI socket a runtime's
            # vnet-cni talks to (`vnetctl cni install --socket <state dir>/cni.sock`)
            node_args += ["--dns", "--cni", "--cni-socket", str(self.state_dir / "cni.sock")]
            children.append(ChildSpec(NODE, _launcher_argv("vnet-node", node_args),
                                      child_env(roles.node(node_id)), logs / f"{NODE}.log"))
        except BaseException:
            if netns:
                delete_netns(netns)
            raise
        for spec in children:
            self.children[spec.name] = Child(spec)
        return _Plan(nats_url, redis_url, nats_port, redis_port, metrics_port, node_id, netns, host_netns,
                     privileged, children, tls_block["ca_file"] if tls_block else None)

    def _cluster_children(self, creds: credentials.Credentials, node_id: str, tls_block: dict[str, str] | None,
                          first_port: int, taken: set[int], env: dict[str, str]) -> list[ChildSpec]:
        """``--cluster N``: N nats-servers joined by routes on loopback, each with the stack's
        users (the same generated config) plus a route user of its own (vnet.runtime.cluster)."""
        from vnet.runtime import cluster

        n = self.opts.cluster
        ports = [first_port] + [_pick_port(None, "--nats-port", f"nats-server {i}", taken) for i in range(1, n)]
        route_ports = [_pick_port(None, "--nats-port", f"nats-server {i} routes", taken) for i in range(n)]
        password = credentials.new_password()
        base = permissions.local_nats_config(dict(creds.nats), [node_id], tls=tls_block)
        out: list[ChildSpec] = []
        for i in range(n):
            name = NATS if i == 0 else f"{NATS}-{i}"
            data = self.state_dir / ("nats" if i == 0 else f"nats-{i}")
            data.mkdir(exist_ok=True, mode=credentials.DIR_MODE)
            conf = self.state_dir / f"nats-{i}.conf"
            text = base.rstrip() + "\n\n" + cluster.cluster_block(
                name=cluster.CLUSTER_NAME, port=route_ports[i], peers=[p for j, p in enumerate(route_ports) if j != i],
                user=cluster.ROUTE_USER, password=password)
            credentials.private_write(conf, text.encode())
            out.append(ChildSpec(name, servers.nats_args(ports[i], data, config_file=conf), env,
                                 self.logs_dir / f"{name}.log", ports[i]))
        return out

    def _component_names(self) -> list[str]:
        """The services (with their replicas ``<service>-<n>``) and the node worker."""
        def ours(n: str) -> bool:
            base, _, num = n.rpartition("-")
            return n in COMPONENTS or (base in REPLICATED and num.isdigit())
        return [n for n in self.children if ours(n)]

    def _server_names(self) -> list[str]:
        """The servers this stack runs: nats-server (and nats-server-<i> of a cluster), valkey-server."""
        return [n for n in self.children if n in SERVERS or n.startswith(f"{NATS}-")]

    async def _replicate_stream(self) -> None:
        """A cluster: make VNET_EVENTS with min(3, N) replicas once the servers have formed one."""
        from vnet.adapters import nats as nats_adapter
        from vnet.runtime import cluster

        if self._stream_identity is None:
            return
        want = min(3, self.opts.cluster)
        try:
            nc = await nats_adapter.connect(self._stream_identity, "vnet-supervisor-stream")
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

    def _on_signal(self, sig: signal.Signals) -> None:
        assert self._stop_event is not None and self._force_event is not None
        self._signals += 1
        if self._signals == 1:
            self.say(f"{sig.name}: stopping the stack (a second one kills at once)")
            self._stop_event.set()
        else:
            self._force_event.set()

    async def _main(self) -> int:
        self._stop_event = asyncio.Event()
        self._force_event = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, self._on_signal, sig)
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
            before = await self._instances() if self.opts.nats_url else None
            for name in self._component_names():
                self._spawn(self.children[name])
            self._save()
            supervise = asyncio.create_task(self._supervise())
            degraded = await self._wait_ready(before)
            if not self._stop_event.is_set():
                self._status = "ready"
                self._save()
                self.show(format_summary(self.stack_file(), elapsed=time.monotonic() - t0, degraded=degraded))
                if self.opts.demo and self.config is not None:
                    await self._demo(self.config)
                await self._stop_event.wait()
        except StackError as err:
            self.say(f"error: {err.message}")
            code = err.exit_code
        finally:
            await self._shutdown()
            if supervise is not None:
                supervise.cancel()
                await asyncio.gather(supervise, return_exceptions=True)
        return code

    async def _demo(self, config: VNetConfig) -> None:
        from vnet.runtime.demo import run_demo

        self.show("\nDemo: the main job, end to end")
        try:
            demo = asyncio.create_task(run_demo(config, say=self.show))
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

    def _spawn(self, child: Child) -> None:
        spec = child.spec
        with open(spec.log, "ab") as fh:
            stamp = dt.datetime.now().isoformat(sep=" ", timespec="seconds")
            again = f" (restart {child.restarts})" if child.restarts else ""
            fh.write(f"--- {stamp} vnet supervisor: starting {spec.name}{again}: {shlex.join(spec.argv)}\n".encode())
            fh.flush()
            try:
                child.proc = subprocess.Popen(
                    spec.argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=spec.env,
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
                raise StackError(f"{child.spec.name} exited ({_describe_exit(rc)}) before listening on port "
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
                    self.say(f"{child.spec.name} (pid {proc.pid}) exited with {_describe_exit(proc.returncode)} "
                             f"after {up_for:.1f}s; restarting in {delay:.1f}s (log: {child.spec.log})")
                    child.proc = None
                    child.restart_at = now + delay
                elif proc is None and child.restart_at is not None and now >= child.restart_at:
                    child.restarts += 1
                    try:
                        self._spawn(child)
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

    async def _instances(self) -> set[str]:
        """Ids of the VNet service instances on the bus now (only asked of an existing NATS)."""
        from vnet.client import VNetManager
        from vnet.core.errors import VNetError

        assert self.config is not None
        try:
            async with VNetManager(self.config) as m:
                return {s.id for s in await m.services(wait=0.3)}
        except VNetError as err:
            raise StackError(err.message) from None

    async def _wait_ready(self, before: set[str] | None) -> dict[str, str]:
        """Poll health of every component until all answer; returns those not "ok" and why.

        On an existing NATS (``before`` holds the instances already there) a replica of
        another stack may answer a service's health, so each component must also show a
        new instance of its own before it counts.
        """
        from vnet.client import VNetManager
        from vnet.core.errors import VNetError

        assert self.config is not None and self.plan is not None and self._stop_event is not None
        cfg = msgspec.structs.replace(self.config, request_timeout_s=1.0)
        node_id = self.plan.node_id
        pending = set(COMPONENTS)
        unseen = set(COMPONENTS) if before is not None else set()
        last: dict[str, str] = {}
        degraded: dict[str, str] = {}
        deadline = time.monotonic() + self.opts.ready_timeout

        async def probe(m: VNetManager, name: str) -> None:
            try:
                rep = await m.health(name, node=node_id if name == NODE else None)
            except VNetError as err:
                # The adapter's own hint ("is the stack up?") would mislead here.
                last[name] = {"unavailable": "nothing answers its health yet",
                              "timeout": "its health request timed out"}.get(err.code, err.message)
                return
            pending.discard(name)
            if rep.status != "ok":
                degraded[name] = ", ".join(f"{k}: {v}" for k, v in rep.checks.items() if v != "ok")

        async def look(m: VNetManager) -> None:
            for s in await m.services(wait=0.3):
                if before is not None and s.id in before:
                    continue
                if s.name == NODE and s.metadata.get("vnet.node") != node_id:
                    continue
                unseen.discard(s.name)
            for name in unseen:
                last[name] = "answers health, but no new instance of this stack's own is on the bus yet"

        try:
            async with VNetManager(cfg) as m:
                while not self._stop_event.is_set():
                    if pending:
                        await asyncio.gather(*(probe(m, n) for n in sorted(pending)))
                    if not pending and unseen:
                        await look(m)
                    if not pending and not unseen:
                        break
                    if time.monotonic() > deadline:
                        raise StackError(self._not_ready_message(pending | unseen, last))
                    await asyncio.sleep(0.2)
        except VNetError as err:  # connecting to NATS itself failed
            raise StackError(f"{err.message} (log: {self.logs_dir / (NATS + '.log')})") from None
        return degraded

    def _not_ready_message(self, pending: Iterable[str], last: Mapping[str, str]) -> str:
        lines = [f"not ready within {self.opts.ready_timeout:.0f}s: {', '.join(sorted(pending))} did not answer "
                 "health; everything is being stopped"]
        for name in sorted(pending):
            child = self.children[name]
            lines.append(f"- {name}: {last.get(name, 'no answer')} (restarts: {child.restarts}; "
                         f"log {child.spec.log})")
            t = tail(child.spec.log, 8)
            if "\n" not in t:
                lines.append("    (nothing logged since it started: stuck connecting to NATS or Redis?)")
            else:
                lines.extend("    " + ln for ln in t.splitlines())
        assert self.plan is not None
        lines.append(f"NATS is {self.plan.nats_url}, Redis is {self.plan.redis_url}; raise the limit with "
                     "--ready-timeout if this machine is just slow")
        return "\n".join(lines)

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


# --- stopping a stack from outside (vnetctl down) -----------------------------------------

def cleanup_leftovers(state_dir: Path, stack: StackFile, *, say: Say, timeout: float = 5.0) -> list[str]:
    """Stop processes of a stack whose supervisor is gone, delete its namespace and state file."""
    problems: list[str] = []
    alive = {n: p for n, p in stack.processes.items() if pid_alive(p.pid, p.start_time)}
    for name, p in alive.items():
        say(f"stopping leftover {name} (pid {p.pid})")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(pid_alive(p.pid, p.start_time) for p in alive.values()):
        time.sleep(0.05)
    for name, p in alive.items():
        if pid_alive(p.pid, p.start_time):
            try:
                _signal_tree(p.pid, signal.SIGKILL)
            except PermissionError:
                problems.append(f"cannot kill {name} (pid {p.pid}): permission denied")
    if stack.netns:
        problems += delete_netns(stack.netns)
    current = read_stack_file(state_dir) if (state_dir / STACK_FILE).exists() else None
    if current is not None and current.supervisor_pid == stack.supervisor_pid:
        (state_dir / STACK_FILE).unlink(missing_ok=True)
    return problems


def stop_stack(state_dir: Path, *, say: Say, timeout: float = 30.0) -> bool:
    """Stop the stack running from ``state_dir``; False if there was none.

    SIGTERM to the supervisor (which stops its children in order, deletes the sandbox
    namespace and the state file); SIGKILL after ``timeout``; then whatever is still
    there is cleaned up here, so nothing of the stack is left either way.
    """
    state_dir = state_dir.expanduser().absolute()
    stack = read_stack_file(state_dir)
    if stack is None:
        return False
    pid, started = stack.supervisor_pid, stack.supervisor_start_time
    if pid_alive(pid, started):
        say(f"stopping the stack of {state_dir} (supervisor pid {pid})")
        try:
            os.kill(pid, signal.SIGTERM)
        except PermissionError:
            raise StackError(f"cannot signal the supervisor (pid {pid}): permission denied; it was started by "
                             "another user (try sudo)") from None
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while pid_alive(pid, started) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_alive(pid, started):
            say(f"the supervisor did not stop within {timeout:.0f}s; killing it")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            while pid_alive(pid, started):
                time.sleep(0.05)
    else:
        say(f"the supervisor (pid {pid}) is gone; cleaning up what it left")
    # The supervisor may have restarted children since we read the file.
    latest = read_stack_file(state_dir) or stack
    problems = cleanup_leftovers(state_dir, latest, say=say)
    if latest is not stack:
        problems += cleanup_leftovers(state_dir, stack, say=say)
    if problems:
        raise StackError("stopped, but:\n" + "\n".join(f"- {p}" for p in problems))
    return True


def start_detached(argv: list[str], state_dir: Path, *, timeout: float, say: Say) -> StackFile:
    """Run ``argv`` (``vnetctl up --foreground-supervisor ...``) in a new session and
    return the stack file once it reports ready."""
    state_dir = state_dir.expanduser().absolute()
    logs = state_dir / "logs"
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=credentials.DIR_MODE)
        logs.mkdir(parents=True, exist_ok=True, mode=credentials.DIR_MODE)
    except OSError as exc:
        raise StackError(f"cannot create {logs}: {exc.strerror}; choose another --state-dir") from None
    log = logs / "supervisor.log"
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, credentials.FILE_MODE)
    with open(fd, "ab") as fh:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    say(f"starting the stack in the background (supervisor pid {proc.pid}, log {log})")
    deadline = time.monotonic() + timeout
    while True:
        rc = proc.poll()
        if rc is not None:
            raise StackError(f"the stack did not start ({_describe_exit(rc)}); {log} ends with:\n{tail(log, 25)}")
        try:
            stack = read_stack_file(state_dir)
        except StackError:
            stack = None  # caught between writes of a previous stack's file; look again
        if stack is not None and stack.supervisor_pid == proc.pid and stack.status == "ready":
            return stack
        if time.monotonic() > deadline:
            proc.terminate()
            raise StackError(f"the stack was not ready within {timeout:.0f}s and is being stopped; see {log}")
        time.sleep(0.1)


# --- what `up` prints ---------------------------------------------------------------------

def format_summary(stack: StackFile, *, elapsed: float | None = None, degraded: Mapping[str, str] | None = None,
                   env: Mapping[str, str] | None = None) -> str:
    state_dir = Path(stack.state_dir)
    took = f" in {elapsed:.1f}s" if elapsed is not None else ""
    managed_nats = "" if stack.nats_port else "  (existing server)"
    if stack.nats_tls_ca:
        managed_nats += f"  (TLS; CA {stack.nats_tls_ca})"
    managed_redis = "" if stack.redis_port else "  (existing server)"
    notes: list[str] = []
    if stack.netns:
        ns = f"sandbox namespace {stack.netns} (deleted on stop)"
    elif stack.privileged:
        ns = "THIS MACHINE's own namespace (--host-root-netns)"
        notes.append("the node worker changes this machine's network namespace (bridges, veths, nftables)")
    else:
        ns = "none (not root)"
        notes.append("not root: the node worker runs and answers health but cannot change a kernel, so networks "
                     "get no data plane; `sudo vnetctl up` gives it a sandbox namespace")
    pids = ", ".join(f"{n} {p.pid}" for n, p in stack.processes.items())
    lines = [
        f"VNet local stack ready{took}",
        f"  state dir   {state_dir}",
        f"  NATS        {stack.nats_url}{managed_nats}",
        f"  Redis       {stack.redis_url}{managed_redis}",
        f"  metrics     {stack.metrics_url}",
        f"  node        {stack.node_id}, host network: {ns}",
        f"  logs        {stack.logs_dir}/<name>.log",
        f"  processes   supervisor {stack.supervisor_pid}; {pids}",
    ]
    lines += [f"  note        {n}" for n in notes]
    for name, why in (degraded or {}).items():
        lines.append(f"  warning     {name} answers but is degraded: {why}")
    if state_dir == default_state_dir(env).expanduser().absolute():
        client, down = "vnetctl", "vnetctl down"
    else:
        # The state directory, not --nats: the credentials are found there too.
        client = f"VNET_STATE_DIR={shlex.quote(str(state_dir))} vnetctl"
        down = f"vnetctl down --state-dir {shlex.quote(str(state_dir))}"
    stop = (f"{down}   (or Ctrl-C here)" if not stack.detached else down)
    lines += [
        "",
        "Try next:",
        f"  {client} status",
        f"  {client} health network",
        f"  {client} health node --node {stack.node_id}",
        f"  {stop}",
    ]
    return "\n".join(lines)

