"""Every service process logs why it stops: the signal and who sent it, or its parent's death.

Node workers of local stacks stopped cleanly ("draining node") while nobody stopped them,
and the log could not say who sent the signal. These tests run a real ``vnet-service``
process (the launcher, as the supervisor starts it) against the session's servers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import fresh_db_config
from vnet.runtime.config import VNetConfig
from vnet.runtime.stack import pid_alive

pytestmark = pytest.mark.timeout(120)


def _service_env(config: VNetConfig) -> dict[str, str]:
    cfg = fresh_db_config(config)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VNET_") or k == "VNET_RUN_PREFIX"}
    env.update(VNET_NATS_URL=cfg.nats_url, VNET_REDIS_URL=cfg.redis_url, VNET_IPAM_GC_INTERVAL_S="0",
               VNET_METRICS_ENABLED="false", PYTHONUNBUFFERED="1")
    return env


def _wait_log(log: Path, text: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = log.read_text(errors="replace") if log.exists() else ""
        if text in out:
            return out
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not logged within {timeout}s:\n{log.read_text(errors='replace')[-3000:]}")


def _wait_gone(pid: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.05)
    assert not pid_alive(pid), f"pid {pid} did not stop"


@pytest.fixture
def kill_after() -> Iterator[list[int]]:
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_sigterm_names_its_sender(config: VNetConfig, tmp_path: Path, kill_after: list[int]) -> None:
    log = tmp_path / "ipam.log"
    with open(log, "wb") as fh:
        svc = subprocess.Popen([sys.executable, "-m", "vnet.runtime.launcher", "ipam"], env=_service_env(config),
                               stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    kill_after.append(svc.pid)
    _wait_log(log, "up as instance")
    sender = subprocess.Popen(["kill", "-TERM", str(svc.pid)])
    sender.wait()
    assert svc.wait(60) == 0
    out = log.read_text(errors="replace")
    print("\n" + "\n".join(line for line in out.splitlines() if "SIGTERM" in line))
    assert f"SIGTERM from pid {sender.pid} (uid {os.getuid()}" in out, out
    assert "via kill()" in out and f"ipam stopped (SIGTERM from pid {sender.pid}" in out, out


def test_sigint_from_a_live_sender_shows_its_command_line(config: VNetConfig, tmp_path: Path,
                                                           kill_after: list[int]) -> None:
    log = tmp_path / "ipam.log"
    with open(log, "wb") as fh:
        svc = subprocess.Popen([sys.executable, "-m", "vnet.runtime.launcher", "ipam"], env=_service_env(config),
                               stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    kill_after.append(svc.pid)
    _wait_log(log, "up as instance")
    os.kill(svc.pid, signal.SIGINT)  # from this process, which is still there to be named
    assert svc.wait(60) == 0
    out = log.read_text(errors="replace")
    assert f"SIGINT from pid {os.getpid()} (uid {os.getuid()}: " in out and "pytest" in out, out


def test_parent_death_is_logged(config: VNetConfig, tmp_path: Path, kill_after: list[int]) -> None:
    """As under the stack's supervisor: the child gets SIGTERM when its parent dies."""
    log = tmp_path / "ipam.log"
    parent_code = textwrap.dedent(f"""
        import ctypes, signal, subprocess, sys, time
        def hook():
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        with open({str(log)!r}, "wb") as fh:
            p = subprocess.Popen([sys.executable, "-m", "vnet.runtime.launcher", "ipam"], stdout=fh,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=hook)
        print(p.pid, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", parent_code], env=_service_env(config), stdout=subprocess.PIPE,
                              text=True)
    kill_after.append(parent.pid)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    kill_after.append(child)
    _wait_log(log, "up as instance")
    parent.kill()
    parent.wait()
    _wait_gone(child)
    out = log.read_text(errors="replace")
    print("\n" + "\n".join(line for line in out.splitlines() if "parent" in line))
    assert f"the parent process (pid {parent.pid}) died" in out, out
    assert "ipam stopped (SIGTERM: the parent process" in out, out
