"""docker-compose.yml and ops/ checked against the code, without a Docker engine.

The checker (``compose_check.compose_problems``) finds nothing wrong with the checked-in
files; every service and a node worker run; the metrics the docs promise are exported and
the dashboard covers the required views; the Dockerfile installs what the processes need;
variables are interpolated as compose does. The NATS config is generated from the
permission matrix (``vnet.contracts.permissions``): the checked-in ``ops/nats/nats.conf`` must
equal the generated text.

Elsewhere: the checker's negative tests in ``test_compose_checker.py``, the NATS config run
for real (each identity can do its job and no more) in ``test_compose_nats.py``, the Valkey
ACL of the compose file for real in ``test_compose_valkey.py``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from tests.contract.compose_check import compose_problems
from tests.contract.compose_model import (
    COMPOSE,
    DOCKERFILE,
    PROMISED_METRICS,
    ROOT,
    argv,
    dashboard_queries,
    exported_metrics,
    interpolate,
    is_vnet,
    load_compose,
)
from vnet.contracts import permissions, subjects


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


def test_checked_in_nats_config_is_generated_from_the_matrix() -> None:
    conf = ROOT / "ops/nats/nats.conf"
    assert conf.read_text() == permissions.compose_nats_config(), (
        "ops/nats/nats.conf differs from the permission matrix; regenerate it with "
        "`python -m vnet.contracts.permissions compose > ops/nats/nats.conf`")
