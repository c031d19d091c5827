"""docker-compose.cluster.yml (the replicated stack) merged over docker-compose.yml as
`docker compose -f docker-compose.yml -f docker-compose.cluster.yml` merges it, then
checked like the base file (``compose_problems``) and for what a cluster needs: NATS
routes that close the mesh, every server in every client's URL list, VNET_EVENTS
replicated on all of them, a Valkey replica with the primary's users, Sentinels that
can log in and agree, three instances of each service. No Docker engine needed.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.contract.compose_check import compose_problems
from tests.contract.compose_model import (
    COMPOSE,
    ROOT,
    argv,
    container_ports,
    environment,
    interpolate,
    is_vnet,
    load_compose,
    service_at,
    valkey_users,
)

CLUSTER = ROOT / "docker-compose.cluster.yml"
# Sequences compose merges entry by entry; any other sequence (command, entrypoint, ...) is replaced.
_UNION = {"ports", "expose", "volumes", "dns", "dns_search", "extra_hosts", "cap_add", "cap_drop",
          "security_opt", "env_file", "labels"}


class _Override:
    """A value tagged ``!override``: it replaces what it is merged over."""

    def __init__(self, value: Any) -> None:
        self.value = value


class _Loader(yaml.SafeLoader):
    pass


def _tagged(loader: yaml.SafeLoader, node: yaml.Node) -> _Override:
    if isinstance(node, yaml.SequenceNode):
        return _Override(loader.construct_sequence(node, deep=True))
    if isinstance(node, yaml.MappingNode):
        return _Override(loader.construct_mapping(node, deep=True))
    return _Override(loader.construct_scalar(node))  # type: ignore[arg-type]


_Loader.add_constructor("!override", _tagged)


def _merge(base: Any, over: Any, key: str = "") -> Any:
    if isinstance(over, _Override):
        return copy.deepcopy(over.value)
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _merge(base[k], v, k) if k in base else _plain(v)
        return out
    if isinstance(base, list) and isinstance(over, list) and key in _UNION:
        return base + [x for x in over if x not in base]
    return _plain(over)


def _plain(v: Any) -> Any:
    if isinstance(v, _Override):
        return copy.deepcopy(v.value)
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


def merged() -> dict[str, Any]:
    base = load_compose()
    over = yaml.load(CLUSTER.read_text(), Loader=_Loader)
    services = dict(base["services"])
    for name, svc in over["services"].items():
        ext = svc.get("extends")
        if ext is not None:
            assert ROOT / ext["file"] == COMPOSE, f"{name} extends {ext['file']}, not the base file"
            svc = _merge(copy.deepcopy(base["services"][ext["service"]]), {k: v for k, v in svc.items()
                                                                            if k != "extends"})
        services[name] = _merge(services[name], svc) if name in services else _plain(svc)
    out = {**base, "services": services}
    out["volumes"] = {**(base.get("volumes") or {}), **(over.get("volumes") or {})}
    return out


def _opt(cmd: list[str], flag: str) -> str:
    assert flag in cmd, f"{flag} missing from {cmd}"
    return cmd[cmd.index(flag) + 1]


def test_the_merged_cluster_file_matches_the_code() -> None:
    problems = compose_problems(merged())
    assert not problems, "docker-compose.cluster.yml over docker-compose.yml:\n  " + "\n  ".join(problems)


def test_nats_servers_form_one_cluster_and_every_client_knows_all_of_them() -> None:
    check_nats(merged())


def check_nats(data: dict[str, Any]) -> None:
    services = data["services"]
    servers = {n: s for n, s in services.items() if n == "nats" or (n.startswith("nats-") and n != "nats-exporter")}
    assert len(servers) == 3
    names, clusters = set(), set()
    for name, svc in servers.items():
        cmd = [interpolate(c, {}) for c in argv(svc["command"])]
        names.add(_opt(cmd, "--name"))
        clusters.add(_opt(cmd, "--cluster_name"))
        listen = urlsplit(_opt(cmd, "--cluster"))
        assert listen.port in container_ports(svc), f"{name} does not expose its route port"
        peers = {urlsplit(u).hostname for u in _opt(cmd, "--routes").split(",")}
        assert peers == set(servers) - {name}, f"{name} routes to {peers}"
        for u in _opt(cmd, "--routes").split(","):
            r = urlsplit(u)
            assert r.port == listen.port and (r.username, r.password) == (listen.username, listen.password), \
                f"{name}: route {u} does not match the peers' listener (port and credentials)"
            assert r.password and r.password != "", "routes are authenticated"
        assert "-js" in cmd and _opt(cmd, "-sd") == "/data"
        assert any(t == "/data" and s.endswith("data") for s, t in _binds(svc)), f"{name}: /data on a volume"
    assert len(names) == 3 and len(clusters) == 1
    data_volumes = [s for svc in servers.values() for s, t in _binds(svc) if t == "/data"]
    assert len(set(data_volumes)) == 3, "each server has its own JetStream store"
    for name, svc in services.items():
        env = environment(svc)
        if not is_vnet(svc) or "VNET_NATS_URL" not in env:
            continue
        urls = env["VNET_NATS_URL"].split(",")
        assert len(urls) == 3, f"{name} knows {len(urls)} NATS server(s)"
        if svc.get("network_mode") != "host":
            assert {urlsplit(u).hostname for u in urls} == set(servers)
            assert env.get("VNET_EVENTS_REPLICAS") == "3", f"{name}: VNET_EVENTS is not replicated on 3"
        for u in urls:
            p = urlsplit(u)
            assert service_at(data, p.hostname or "", p.port or 4222, from_svc=svc) is None


def _binds(svc: Mapping[str, Any]) -> list[tuple[str, str]]:
    out = []
    for v in svc.get("volumes") or []:
        parts = str(v).split(":")
        if len(parts) >= 2:
            out.append((parts[0], parts[1]))
    return out


def test_valkey_has_a_replica_with_the_same_users_and_sentinels_that_can_log_in() -> None:
    check_valkey(merged())


def check_valkey(data: dict[str, Any]) -> None:
    services = data["services"]
    primary = [interpolate(c, {}) for c in argv(services["valkey"]["command"])]
    replica_svc = services["valkey-replica"]
    replica = [interpolate(c, {}) for c in argv(replica_svc["command"])]
    entry = " ".join(argv(replica_svc.get("entrypoint")))
    assert "--replicaof valkey 6379" in entry, "the replica does not follow the primary"
    users = valkey_users(primary)
    assert valkey_users(replica) == users, "after a failover the replica must know the same users"
    rep_user, rep_pw = _opt(primary, "--masteruser"), _opt(primary, "--masterauth")
    assert users[rep_user]["password"] == rep_pw and "+psync" in users[rep_user]["rules"]
    assert "~vnet:*" not in users[rep_user]["rules"], "the replication user reads no keys"
    sentinels = {n: s for n, s in services.items() if n.startswith("valkey-sentinel-")}
    assert len(sentinels) == 3
    for name, svc in sentinels.items():
        script = argv(svc["command"])[-1]
        lines = {ln.split(None, 2)[1] if ln.startswith("sentinel ") else ln.split()[0]: ln
                 for ln in script.splitlines() if ln.strip() and not ln.startswith(("cat", "EOF", "exec"))}
        monitor = lines["monitor"].split()
        assert monitor[2:5] == ["vnet", "valkey", "6379"] and 2 <= int(monitor[5]) <= len(sentinels)
        s_user = lines["auth-user"].split()[3]
        assert s_user in users and {"+role", "+info", "+replicaof"} <= set(users[s_user]["rules"])
        pw_var = lines["auth-pass"].split()[3].lstrip("$")
        assert environment(svc).get(pw_var) == users[s_user]["password"], f"{name}: wrong Sentinel password"
        assert 26379 in container_ports(svc)
    for name, svc in services.items():
        env = environment(svc)
        if not is_vnet(svc) or "VNET_REDIS_URL" not in env:
            continue
        hosts = [h.rsplit(":", 1) for h in env.get("VNET_REDIS_SENTINELS", "").split(",") if h]
        assert {h for h, _ in hosts} == set(sentinels), f"{name} does not ask every Sentinel"
        assert all(int(p) in container_ports(services[h]) for h, p in hosts)
        assert env.get("VNET_REDIS_WAIT_REPLICAS") == "1", f"{name}: allocations do not wait for the replica"


def test_three_instances_of_every_service_but_metrics() -> None:
    services = merged()["services"]
    for name in ("ipam", "network", "endpoint", "policy"):
        assert (services[name].get("deploy") or {}).get("replicas") == 3, name
    assert (services["metrics"].get("deploy") or {}).get("replicas", 1) == 1, "metrics publishes a host port"


def test_the_checks_can_fail() -> None:
    def broken(edit: Any) -> dict[str, Any]:
        data = copy.deepcopy(merged())
        edit(data["services"])
        return data

    def drop_route(s: dict[str, Any]) -> None:
        cmd = s["nats-3"]["command"]
        cmd[cmd.index("--routes") + 1] = cmd[cmd.index("--routes") + 1].split(",")[0]

    def one_server(s: dict[str, Any]) -> None:
        s["ipam"]["environment"]["VNET_NATS_URL"] = "nats://nats:4222"

    def no_sentinel_user(s: dict[str, Any]) -> None:
        cmd = s["valkey-replica"]["command"] = list(s["valkey-replica"]["command"])
        i = cmd.index("vnet-sentinel")
        del cmd[i - 1:i + 2]

    def no_wait(s: dict[str, Any]) -> None:
        s["policy"]["environment"].pop("VNET_REDIS_WAIT_REPLICAS")

    for edit, check in ((drop_route, check_nats), (one_server, check_nats), (no_sentinel_user, check_valkey),
                        (no_wait, check_valkey)):
        with pytest.raises(AssertionError):
            check(broken(edit))


def test_the_merge_follows_compose() -> None:
    base = {"ports": ["a"], "command": ["x"], "environment": {"A": "1"}}
    out = _merge(base, {"ports": ["b"], "command": ["y"], "environment": {"B": "2"}}, "")
    assert out == {"ports": ["a", "b"], "command": ["y"], "environment": {"A": "1", "B": "2"}}
    assert _merge(base, {"ports": _Override(["c"])})["ports"] == ["c"]


def test_docker_compose_config_accepts_the_merged_files() -> None:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("the docker compose plugin is not installed (the merge is checked above without it)")
    r = subprocess.run([docker, "compose", "-f", str(COMPOSE), "-f", str(CLUSTER), "config", "-q"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
