"""The stack's state file (``stack.json``) and process identity: is that stack still running?

What runs, where it listens and who may log in: written by the supervisor, read by
``vnetctl status``/``down``, ``VNetConfig.load()`` and a second ``vnetctl up``. A pid in it
counts as ours only if the process started when the file says (its /proc start time), so
a stale file never makes us signal a stranger. Also the stack's own error type, and the
helpers every part of the stack uses on its processes (signalling a child's group, exit
descriptions, log tails, the parent-death hook).

Apart from the :mod:`vnet.runtime.stack` package because :mod:`vnet.runtime.config` reads
it (to find the running stack) while the stack package imports the config: kept here, the
runtime's modules import one another without a cycle.
"""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import msgspec

from vnet.contracts import permissions
from vnet.runtime import credentials

STACK_FILE = "stack.json"
LOCK_FILE = "stack.lock"
Say = Callable[[str], None]  # where a step of the stack reports what it does


class StackError(Exception):
    """A problem the user can act on; the message says what and how."""

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


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


# --- processes ----------------------------------------------------------------------



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


def signal_tree(pid: int, sig: int) -> None:
    """Signal a child and, since each child leads its own process group, what it spawned."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def describe_exit(code: int) -> str:
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


def parent_death_hook(parent: int, *, unblock: Iterable[int] = ()) -> Callable[[], None]:
    """A preexec hook that makes the child get SIGTERM when the supervisor dies.

    Without it a SIGKILLed supervisor would leave every child running (they sit in their
    own sessions so a terminal's Ctrl-C reaches only the supervisor, which stops them in
    order). libc is resolved here, before fork, so the hook itself only makes a call.
    ``unblock``: signals the supervisor blocks (it takes its stop signals with
    ``sigwaitinfo``) and a child must not inherit blocked across exec (valkey-server would
    ignore SIGTERM).
    """
    mask = frozenset(unblock)
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        prctl = None
    pr_set_pdeathsig = 1

    def hook() -> None:
        if mask:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, mask)
        if prctl is None:
            return
        prctl(pr_set_pdeathsig, int(signal.SIGTERM))
        if os.getppid() != parent:  # the supervisor died before prctl: follow it now
            os.kill(os.getpid(), signal.SIGTERM)

    return hook
