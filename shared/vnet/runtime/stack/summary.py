"""What ``vnetctl up`` prints once the stack is ready."""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from pathlib import Path

from vnet.runtime.stackfile import StackFile, default_state_dir


def format_summary(stack: StackFile, *, elapsed: float | None = None, degraded: Mapping[str, str] | None = None,
                   env: Mapping[str, str] | None = None) -> str:
    state_dir = Path(stack.state_dir)
    took = f" in {elapsed:.1f}s" if elapsed is not None else ""
    managed_nats = "" if stack.nats_port else "  (existing server)"
    if stack.nats_tls_ca:
        managed_nats += f"  (TLS; CA {stack.nats_tls_ca})"
    managed_redis = "" if stack.redis_port else "  (existing server)"
    notes: list[str] = []
    if stack.netns:
        ns = f"sandbox namespace {stack.netns} (deleted on stop)"
    elif stack.privileged:
        ns = "THIS MACHINE's own namespace (--host-root-netns)"
        notes.append("the node worker changes this machine's network namespace (bridges, veths, nftables)")
    else:
        ns = "none (not root)"
        notes.append("not root: the node worker runs and answers health but cannot change a kernel, so networks "
                     "get no data plane; `sudo vnetctl up` gives it a sandbox namespace")
    pids = ", ".join(f"{n} {p.pid}" for n, p in stack.processes.items())
    lines = [
        f"VNet local stack ready{took}",
        f"  state dir   {state_dir}",
        f"  NATS        {stack.nats_url}{managed_nats}",
        f"  Redis       {stack.redis_url}{managed_redis}",
        f"  metrics     {stack.metrics_url}",
        f"  node        {stack.node_id}, host network: {ns}",
        f"  logs        {stack.logs_dir}/<name>.log",
        f"  processes   supervisor {stack.supervisor_pid}; {pids}",
    ]
    group = valkey_group(stack)
    if group:
        lines.insert(4, f"  Valkey      {group}")
    lines += [f"  note        {n}" for n in notes]
    for name, why in (degraded or {}).items():
        lines.append(f"  warning     {name} answers but is degraded: {why}")
    if state_dir == default_state_dir(env).expanduser().absolute():
        client, down = "vnetctl", "vnetctl down"
    else:
        # The state directory, not --nats: the credentials are found there too.
        client = f"VNET_STATE_DIR={shlex.quote(str(state_dir))} vnetctl"
        down = f"vnetctl down --state-dir {shlex.quote(str(state_dir))}"
    stop = (f"{down}   (or Ctrl-C here)" if not stack.detached else down)
    lines += [
        "",
        "Try next:",
        f"  {client} status",
        f"  {client} health network",
        f"  {client} health node --node {stack.node_id}",
        f"  {stop}",
    ]
    return "\n".join(lines)


def _port(argv: list[str]) -> str:
    return argv[argv.index("--port") + 1] if "--port" in argv[:-1] else "?"


def valkey_group(stack: StackFile) -> str:
    """``--replicated-valkey``: its data servers and Sentinels as they were started (the
    Sentinels know which server is the primary now); "" for a stack without them."""
    sentinels = [p for n, p in stack.processes.items() if n.startswith("valkey-sentinel")]
    if not sentinels:
        return ""
    data = [f"{n} 127.0.0.1:{_port(p.argv)}" for n, p in stack.processes.items()
            if n == "valkey-server" or n.startswith("valkey-server-")]
    return (f"{', '.join(data)} (primary at start: the first); Sentinels "
            + ",".join(f"127.0.0.1:{_port(p.argv)}" for p in sentinels) + " name the primary now")
