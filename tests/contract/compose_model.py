"""docker-compose.yml read as compose reads it, without a Docker engine: the file, its
variable interpolation, commands, environments, ports, mounts and Valkey ACL users, what the
metrics service exports and what the Grafana dashboard queries.

Shared by the compose checks (``compose_check``, ``test_compose*.py``,
``test_compose_cluster.py``) and ``tests/integration/test_stack_valkey.py``.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import click
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = "ops/Dockerfile"

# Host paths (outside the repository) a container may bind, and why.
HOST_PATHS = {
    "/run/netns": "the node worker manages named network namespaces of the host",
}
# Variables of the node worker that it must NOT have: it holds no Redis credentials.
NODE_FORBIDDEN_ENV = ("VNET_REDIS_URL", "VNET_REDIS_USERNAME", "VNET_REDIS_PASSWORD")
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
                   "unless", "offset", "inf", "nan"}
# The metric names the brief and docs promise (the collector must export at least these).
PROMISED_METRICS = {
    "vnet_networks_total", "vnet_endpoints_total", "vnet_operations_total", "vnet_operation_errors_total",
    "vnet_operation_duration_seconds_bucket", "vnet_operation_duration_seconds_sum",
    "vnet_operation_duration_seconds_count", "vnet_events_total",
}


# --- helpers --------------------------------------------------------------------------


def load_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value: Any, env: Mapping[str, str]) -> str:
    """Compose's variable interpolation (``${X}``, ``${X:-d}``, ``${X-d}``, ``${X:?e}``, ``$$``)."""
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3) or ""
        val = env.get(name)
        if op in (":-", "-"):
            return (val if val else arg) if op == ":-" else (arg if val is None else val)
        if op in (":?", "?"):
            if not val:
                raise ValueError(f"required variable {name} is not set: {arg}")
            return val
        if op in (":+", "+"):
            return arg if val else ""
        return val or ""

    return _VAR.sub(sub, str(value))


def environment(svc: Mapping[str, Any], env: Mapping[str, str] | None = None) -> dict[str, str]:
    raw = svc.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) if "=" in item else (item, "") for item in raw)
    return {str(k): interpolate("" if v is None else v, env or {}) for k, v in raw.items()}


def argv(cmd: Any) -> list[str]:
    if cmd is None:
        return []
    return [str(c) for c in cmd] if isinstance(cmd, list) else str(cmd).split()


def console_scripts() -> dict[str, str]:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    return {str(k): str(v) for k, v in scripts.items()}


def is_vnet(svc: Mapping[str, Any]) -> bool:
    """A container built from our Dockerfile (the one image of every VNet process)."""
    build = svc.get("build")
    if not isinstance(build, dict):
        return False
    dockerfile = Path(str(build.get("context", "."))) / str(build.get("dockerfile", "Dockerfile"))
    return dockerfile.as_posix().removeprefix("./") == DOCKERFILE


def container_ports(svc: Mapping[str, Any]) -> set[int]:
    """Ports a container listens on as declared (``expose`` and the container side of ``ports``)."""
    out: set[int] = set()
    for p in svc.get("expose") or []:
        out.add(int(str(p).split("/")[0]))
    for p in svc.get("ports") or []:
        target = p.get("target") if isinstance(p, dict) else str(p).split("/")[0].rsplit(":", 1)[-1]
        out.add(int(str(target)))
    return out


def host_published(svc: Mapping[str, Any]) -> set[int]:
    """Ports published on the host's loopback (reachable from a network_mode: host container)."""
    out: set[int] = set()
    for p in svc.get("ports") or []:
        parts = str(p).split("/")[0].split(":")
        if len(parts) == 3 and parts[0] in ("127.0.0.1", "0.0.0.0"):
            out.add(int(parts[1]))
        elif len(parts) == 2:
            out.add(int(parts[0]))
    return out


def binds(svc: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(source, target) of every volume entry."""
    for v in svc.get("volumes") or []:
        if isinstance(v, dict):
            yield str(v.get("source", "")), str(v.get("target", ""))
        else:
            parts = str(v).split(":")
            if len(parts) == 1:
                yield "", parts[0]
            else:
                yield parts[0], parts[1]


def mounted_file(svc: Mapping[str, Any], target: str) -> Path | None:
    """The repository path bound at ``target`` (or at a parent directory of it)."""
    for src, tgt in binds(svc):
        if not src.startswith("."):
            continue
        if target == tgt:
            return ROOT / src
        if target.startswith(tgt.rstrip("/") + "/"):
            return ROOT / src / target[len(tgt.rstrip("/")) + 1:]
    return None


def service_at(data: Mapping[str, Any], url_host: str, port: int, *, from_svc: Mapping[str, Any]) -> str | None:
    """Problem with reaching ``url_host:port`` from a container, or None."""
    services = data["services"]
    if from_svc.get("network_mode") == "host":
        if url_host not in ("127.0.0.1", "localhost"):
            return f"{url_host}:{port} is not reachable from the host network (use 127.0.0.1 and publish the port)"
        if not any(port in host_published(s) for s in services.values()):
            return f"no service publishes port {port} on the host's loopback"
        return None
    if url_host not in services:
        return f"{url_host} is not a compose service"
    if port not in container_ports(services[url_host]):
        return f"service {url_host} declares no port {port} (expose/ports)"
    return None


def exported_metrics() -> dict[str, set[str]]:
    """Sample names the metrics service exports, with their label names (from its collector)."""
    from vnet.contracts.messages import MetricsReport, OpCounter
    from vnet.svc.metrics import service as metrics_service

    st = metrics_service.State()
    st.networks, st.endpoints = 1, 2
    st.reports[("network", "i1")] = MetricsReport(
        service="network", instance="i1", started=0.0, buckets=[0.01, 0.1],
        ops=[OpCounter(op="create", count=3, errors={"subnet_overlap": 1}, bucket_counts=[1, 3], sum_s=0.1)])
    st.events[("network", "created")] = 1
    # a node's report with one sample of every counter a report may name (its labels as declared)
    from vnet.contracts.messages import LabeledCount

    st.reports[("node", "i2")] = MetricsReport(
        service="node", instance="i2", started=0.0, buckets=[0.01, 0.1], ops=[],
        counters=[LabeledCount(name=name, labels=dict.fromkeys(labels, "x"), value=1)
                  for name, (_doc, labels) in metrics_service.LABELED_COUNTERS.items()])
    from vnet.contracts.ipam import PoolInfo
    from vnet.core.forecast import PoolForecast

    st.pools = [PoolInfo(network_id="n1", family=4, cidr="10.0.0.0/24", gateway="10.0.0.1", capacity=253, used=10,
                         free=243, cursor=None,
                         forecast=PoolForecast(alloc_per_h=4.0, release_per_h=1.0, net_per_h=3.0, exhaustion_s=291600.0,
                                               fullness=0.04, window_s=900.0))]
    out: dict[str, set[str]] = {}
    for fam in metrics_service.VNetCollector(st).collect():
        for sample in fam.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) used by a PromQL expression."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    labels: set[str] = set()
    for sel in re.findall(r"\{([^}]*)\}", e):
        labels.update(m for m in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", sel))
    for grp in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", e):
        labels.update(x.strip() for x in grp.split(",") if x.strip())
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", e):
        if e[m.end():].lstrip().startswith("(") or m.group(0).lower() in PROMQL_KEYWORDS:
            continue
        names.add(m.group(0))
    return names, labels


def dashboard_queries(dash: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every panel target and templating query of a dashboard."""
    def panels(items: list[Any]) -> Iterator[Any]:
        for p in items:
            yield p
            yield from panels(p.get("panels") or [])

    for p in panels(dash.get("panels") or []):
        for t in p.get("targets") or []:
            if "expr" in t:
                yield f"panel {p.get('title')!r}", str(t["expr"])
    for var in (dash.get("templating") or {}).get("list") or []:
        q = var.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        if var.get("type") == "query" and isinstance(q, str):
            m = re.fullmatch(r"\s*label_values\(\s*([^,]+?)\s*,\s*([A-Za-z_]\w*)\s*\)\s*", q)
            yield f"variable {var.get('name')!r}", (f"{m.group(1)}" if m else q) + (
                f" by ({m.group(2)})" if m else "")


def vnetctl_problem(args: list[str]) -> str | None:
    """Parse ``vnetctl <args>`` with the real click CLI (no command runs)."""
    from vnet.cli import main as cli_main

    pkg = importlib.import_module("vnet.cli")
    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"vnet.cli.{info.name}")
    cli = cli_main.cli
    try:
        ctx = cli.make_context("vnetctl", list(args), obj={})
        with ctx:
            rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
            name, cmd, sub = cli.resolve_command(ctx, rest)
            if cmd is None or name is None:
                return f"vnetctl {' '.join(args)}: no command"
            cmd.make_context(name, sub, parent=ctx)
    except click.ClickException as exc:
        return f"vnetctl {' '.join(args)}: {exc.format_message()}"
    return None


def valkey_users(cmd: list[str]) -> dict[str, dict[str, Any]]:
    """``--user NAME on >password rules...`` entries of a valkey-server command line."""
    out: dict[str, dict[str, Any]] = {}
    i = 0
    while i < len(cmd):
        if cmd[i] != "--user" or i + 1 >= len(cmd):
            i += 1
            continue
        j = i + 2
        while j < len(cmd) and not cmd[j].startswith("--"):
            j += 1
        rules = cmd[i + 2:j]
        pw = next((r[1:] for r in rules if r.startswith(">")), None)
        out[cmd[i + 1]] = {"password": pw, "rules": [r for r in rules if not r.startswith(">")]}
        i = j
    return out
