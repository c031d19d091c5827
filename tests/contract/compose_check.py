"""The compose checker: :func:`compose_problems` loads docker-compose.yml (as
``compose_model`` reads it) and returns every mismatch with the package: commands that are not
console scripts or services, ``VNET_*`` variables that are not ``VNetConfig`` fields, URLs that
point at no service or port, mounts of files the repository does not have,
``service_healthy`` on a service without a healthcheck, Prometheus targets and Grafana
queries that name nothing real (:func:`dashboard_problems`).

``test_compose.py`` runs it on the checked-in files, ``test_compose_checker.py`` feeds it broken
copies to show it can fail, ``test_compose_cluster.py`` runs it on the merged cluster file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import yaml

from tests.contract.compose_model import (
    HOST_PATHS,
    NODE_FORBIDDEN_ENV,
    ROOT,
    argv,
    binds,
    console_scripts,
    container_ports,
    dashboard_queries,
    environment,
    exported_metrics,
    interpolate,
    is_vnet,
    mounted_file,
    promql_names,
    service_at,
    valkey_users,
    vnetctl_problem,
)
from vnet.contracts import permissions, subjects
from vnet.runtime.config import VNetConfig

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
