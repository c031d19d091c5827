"""Controlling a stack from outside its supervisor: ``vnetctl up --detach`` (start it in
the background and wait for ready) and ``vnetctl down`` (stop it; clean up after a
supervisor that died)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from vnet.runtime import credentials
from vnet.runtime.stack.netns import delete_netns
from vnet.runtime.stackfile import (
    STACK_FILE,
    Say,
    StackError,
    StackFile,
    describe_exit,
    pid_alive,
    read_stack_file,
    signal_tree,
    tail,
)


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
                signal_tree(p.pid, signal.SIGKILL)
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
            raise StackError(f"the stack did not start ({describe_exit(rc)}); {log} ends with:\n{tail(log, 25)}")
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
