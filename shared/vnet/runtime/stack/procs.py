"""Process identity: /proc start times (a pid is ours only if it started when we saw it),
liveness, signalling a child's process group, exit descriptions, log tails, and the
parent-death hook every child of the supervisor is started with."""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Callable, Iterable
from pathlib import Path


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
