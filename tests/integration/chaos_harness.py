"""What the chaos tests share: service processes that can be SIGKILLed, a nats-server and a
valkey of the test's own that can be killed and frozen, and the environment the processes get.

Each service runs as the stack runs it (``python -m vnet.runtime.launcher <service>``, the
node worker as ``vnet-node --simulate 1``: the real control loop with a recording data
plane, so no kernel and no namespaces are touched). Every process is killed at teardown,
pass or fail.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vnet.runtime import servers
from vnet.runtime.config import VNetConfig

# What each process writes once it serves (the launcher's line; the simulated fleet's).
READY = {"node": "simulated node(s) up in"}
READY_DEFAULT = "up as instance"


def process_env(cfg: VNetConfig, **extra: str) -> dict[str, str]:
    """The environment of a service process: this test's servers, no GC timer, no metrics HTTP."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VNET_") or k == "VNET_RUN_PREFIX"}
    env.update(VNET_NATS_URL=cfg.nats_url, VNET_REDIS_URL=cfg.redis_url, VNET_IPAM_GC_INTERVAL_S="0",
               VNET_METRICS_ENABLED="false", PYTHONUNBUFFERED="1", **extra)
    return env


@dataclass
class Procs:
    env: dict[str, str]
    logs: Path
    running: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    all: list[subprocess.Popen[bytes]] = field(default_factory=list)
    # the argv of each name, for a restart
    argv: dict[str, list[str]] = field(default_factory=dict)

    def spawn(self, name: str, service: str, *args: str) -> int:
        """Start ``service`` (a service name, or "node" for a simulated node worker) without
        waiting; returns how many ready lines its log held before (for :meth:`wait_ready`)."""
        extra = ("--simulate", "1") if service == "node" else ()
        argv = [sys.executable, "-m", "vnet.runtime.launcher", service, *extra, *args]
        self.argv[name] = argv
        log = self.logs / f"{name}.log"
        log.touch()
        before = log.read_text(errors="replace").count(READY.get(service, READY_DEFAULT))
        with open(log, "ab") as fh:
            # With the death signal from the main thread only (servers._death_hook): a test
            # killed without its teardown leaves no service behind.
            p = subprocess.Popen(argv, env=self.env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 preexec_fn=servers._death_hook())
        self.running[name] = p
        self.all.append(p)
        return before

    def wait_ready(self, name: str, service: str, before: int, timeout: float = 90) -> None:
        log = self.logs / f"{name}.log"
        mark = READY.get(service, READY_DEFAULT)
        deadline = time.monotonic() + timeout
        while log.read_text(errors="replace").count(mark) <= before:
            p = self.running[name]
            assert p.poll() is None, log.read_text(errors="replace")[-2000:]
            assert time.monotonic() < deadline, f"{name} did not start; log:\n{log.read_text()[-2000:]}"
            time.sleep(0.05)

    def start(self, name: str, service: str, *args: str) -> None:
        self.wait_ready(name, service, self.spawn(name, service, *args))

    def start_many(self, specs: list[tuple[str, str, tuple[str, ...]]]) -> None:
        """Start several at once (start-up is mostly imports: in parallel it is much shorter)."""
        marks = [(name, service, self.spawn(name, service, *args)) for name, service, args in specs]
        for name, service, before in marks:
            self.wait_ready(name, service, before)

    def kill(self, name: str) -> None:
        p = self.running.pop(name)
        p.send_signal(signal.SIGKILL)
        p.wait()

    def stop_all(self) -> None:
        for p in self.all:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait()


@dataclass
class OwnServers:
    """A nats-server and a valkey of this test only: they may be killed, frozen, restarted.

    Restart them from the thread that runs the test (not an executor thread): they are
    started with PR_SET_PDEATHSIG, which fires when the *thread* that forked them exits.
    """

    root: Path
    nats: servers.ServerProc
    valkey: servers.ServerProc

    def restart_nats(self) -> None:
        self.nats = servers.start_nats(self.root / "nats", self.nats.port)

    def restart_valkey(self) -> None:
        self.valkey = servers.start_valkey(self.root / "valkey", self.valkey.port)

    def stop(self) -> None:
        for s in (self.nats, self.valkey):
            with contextlib.suppress(ProcessLookupError):
                os.kill(s.proc.pid, signal.SIGCONT)
            s.stop()


@contextlib.contextmanager
def own_servers(root: Path) -> Iterator[OwnServers]:
    o = OwnServers(root, servers.start_nats(root / "nats"), servers.start_valkey(root / "valkey"))
    try:
        yield o
    finally:
        o.stop()
