"""Why a process stops: the stop signal, who sent it, or its parent's death.

Plain signal handlers cannot tell who sent a signal, so the stop signals (SIGTERM, SIGINT,
SIGHUP) are blocked in every thread and one daemon thread takes them with
``signal.sigwaitinfo``, which returns the sender's pid and uid and how it was sent. The
services and the node worker (:mod:`vnet.runtime.launcher`) and the stack's supervisor
(:mod:`vnet.runtime.stack.supervisor`) all log their stop this way.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
_SI_CODES = {0: "kill()", -1: "sigqueue()", -6: "tgkill()", 0x80: "the kernel"}


@dataclass(frozen=True)
class StopReason:
    """Why this process is asked to stop."""

    signal: str
    pid: int  # the sender (0: the kernel)
    uid: int
    how: str  # kill(), tgkill(), the kernel, ...
    sender: str  # the sender's command line, if it could still be read
    parent_died: bool  # our parent is gone: the signal is the parent-death signal (or its last act)
    parent: int  # the parent pid we started with

    def describe(self) -> str:
        if self.parent_died:
            return (f"{self.signal}: the parent process (pid {self.parent}) died; this is the parent-death "
                    f"signal (sent by pid {self.pid} via {self.how})")
        if self.pid == 0:  # the kernel: a terminal's Ctrl-C or hangup, a parent-death signal, ...
            return f"{self.signal} from the kernel (no sending process: a terminal's Ctrl-C or hangup)"
        who = f"pid {self.pid} (uid {self.uid}"
        who += f": {self.sender})" if self.sender else ", already gone)"
        return f"{self.signal} from {who} via {self.how}"


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()[:300]


def stop_reason(info: signal.struct_siginfo, parent: int | None) -> StopReason:
    """``parent``: the parent pid to watch for death (None: a process whose parent may leave
    on purpose, like the supervisor of a detached stack, whose launcher exits once it is up)."""
    try:
        name = signal.Signals(info.si_signo).name
    except ValueError:
        name = f"signal {info.si_signo}"
    return StopReason(signal=name, pid=info.si_pid, uid=info.si_uid,
                      how=_SI_CODES.get(info.si_code, f"si_code {info.si_code}"), sender=_cmdline(info.si_pid),
                      parent_died=parent is not None and os.getppid() != parent,
                      parent=parent or 0)


def block_stop_signals() -> None:
    """Block SIGTERM/SIGINT/SIGHUP in this thread and every thread started after it, so only
    :class:`StopSignals` takes them (with the sender). Call it first thing, before any thread
    exists. Children inherit the mask across exec: tools that exit by themselves do not care,
    and Go programs (wireguard-go) unblock these signals at start; anything else long-lived
    that must obey SIGTERM should be started with ``preexec_fn=unblock_stop_signals``."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def unblock_stop_signals() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class StopSignals:
    """A daemon thread that takes the (blocked) stop signals with ``sigwaitinfo`` and
    hands each one, with its sender, to ``on_signal``."""

    def __init__(self, on_signal: Callable[[StopReason], None], *, watch_parent: bool = True) -> None:
        self._on_signal = on_signal
        self.parent: int | None = os.getppid() if watch_parent else None
        self._thread = threading.Thread(target=self._wait, name="stop-signals", daemon=True)

    def start(self) -> None:
        block_stop_signals()  # no-op when already done; the waiter must not take them another way
        self._thread.start()

    def _wait(self) -> None:
        while True:
            info = signal.sigwaitinfo(STOP_SIGNALS)
            self._on_signal(stop_reason(info, self.parent))
