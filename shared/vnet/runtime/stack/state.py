"""The state file (``stack.json``), the state directory and the stack's own error type.

What runs, where it listens and who may log in: written by the supervisor, read by
``vnetctl status``/``down``, ``VNetConfig.load()`` and a second ``vnetctl up``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import msgspec

from vnet.contracts import permissions
from vnet.runtime import credentials
from vnet.runtime.stack.procs import pid_alive

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
