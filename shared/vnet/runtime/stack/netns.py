"""The sandbox network namespace a root stack makes for its node worker (``ip netns``).

Nothing outside that namespace is touched: the machine's root namespace is handed to
the worker only on an explicit ``--host-root-netns``."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path

from vnet.runtime.stackfile import StackError


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
