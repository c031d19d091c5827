"""The compose checker can fail: it flags each kind of mistake in a modified copy of
docker-compose.yml (or of the dashboard)."""

from __future__ import annotations

import copy
import json
from typing import Any

from tests.contract.compose_check import compose_problems, dashboard_problems
from tests.contract.compose_model import ROOT, exported_metrics, load_compose

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


def test_checker_flags_a_process_running_as_another_identity() -> None:
    probs = _broken(lambda s, d: s["policy"]["environment"].update(
        {"VNET_NATS_USER": "vnet-svc-ipam", "VNET_NATS_PASSWORD": "${NATS_PASSWORD_SVC_IPAM:-vnet-dev-svc-ipam}"}))
    assert _flags(probs, "services.policy", "not as vnet-svc-policy")
    probs = _broken(lambda s, d: s["node1"].update(command=["vnet-node", "--node-id", "node2"]))
    assert _flags(probs, "services.node1", "not as vnet-node-node2")
