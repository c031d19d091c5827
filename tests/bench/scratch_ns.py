"""Namespaces a benchmark script makes: named with its prefix, loopback up, every one
removed (with whatever still runs inside) at the end, on error and on Ctrl-C or SIGTERM.

    ns = Scratch(prefix)          # registers its cleanup with atexit and the signals
    host = ns.make("h")           # "<prefix>-h"
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys


def sh(*cmd: str) -> None:
    subprocess.run(list(cmd), check=True, capture_output=True)


class Scratch:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.made: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        atexit.register(self.cleanup)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def make(self, name: str) -> str:
        full = f"{self.prefix}-{name}"
        sh("ip", "netns", "add", full)
        self.made.append(full)
        sh("ip", "-n", full, "link", "set", "lo", "up")
        return full

    def cleanup(self) -> None:
        for p in self.procs:
            p.kill()
        self.procs.clear()
        for ns in reversed(self.made):
            for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.made.clear()

    def _on_signal(self, signum: int, frame: object) -> None:
        self.cleanup()
        sys.exit(128 + signum)
