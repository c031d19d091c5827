"""The verbs that had no test: container, network disconnect / hostroutes / mesh
add|remove|delete|ls, ipam pool-exclude, and the exit codes of status and health."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result

from tests.cli.conftest import Ctl
from tests.conftest import fresh_db_config
from vnet.cli import main as cli_main
from vnet.runtime.config import VNetConfig
from vnet.runtime.service import Runtime, ServiceDef


def _netns_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


async def test_container_verbs(ctl: Ctl) -> None:
    k1, k2 = f"{ctl.run_prefix}-k1", f"{ctl.run_prefix}-k2"
    ctl.made_netns += [k1, k2]
    doc = await ctl.json("container", "create", k1, k2)
    assert [c["name"] for c in doc["items"]] == [k1, k2] and doc["errors"] == []
    assert _netns_exists(k1) and _netns_exists(k2)
    lo = await asyncio.to_thread(subprocess.run, ["ip", "-n", k1, "-o", "link", "show", "lo"], capture_output=True,
                                 text=True, check=True)
    assert "<LOOPBACK,UP" in lo.stdout  # loopback up inside
    rows = {c["name"]: c for c in (await ctl.json("container", "ls"))["items"]}
    assert set(rows) == {k1, k2} and rows[k1]["exists"] and rows[k1]["netns"] == f"/run/netns/{k1}"
    r = await ctl.ok("container", "ls")
    assert r.stdout.splitlines()[0] == "name\tnamespace\texists\tprocesses\tcreated"
    assert any(line.startswith(f"{k1}\t/run/netns/{k1}\tyes\t0\t") for line in r.stdout.splitlines())
    # A container made here attaches like any other.
    await ctl.ok("network", "create", "knet", "--cidr", "10.234.8.0/24")
    assert (await ctl.json("endpoint", "create", k1, "--network", "knet"))["items"][0]["status"] == "ready"
    # Again: name_taken, nothing else touched.
    doc = await ctl.json("container", "create", k1, code=1)
    assert doc["items"] == [] and doc["errors"][0]["code"] == "name_taken" and "made by vnetctl" in \
        doc["errors"][0]["message"]
    # A namespace vnetctl did not make is not deleted without --force; a missing one is not_found.
    other = ctl.netns("notmine")
    doc = await ctl.json("container", "rm", other, f"{ctl.run_prefix}-nothere", code=1)
    assert [(e["ref"], e["code"]) for e in doc["errors"]] == [(other, "conflict"), (f"{ctl.run_prefix}-nothere",
                                                                                  "not_found")]
    assert _netns_exists(other)
    r = await ctl("container", "rm", other)
    assert r.exit_code == 1 and "--force" in r.stderr and r.stdout == ""
    # Ours go.
    r = await ctl.ok("container", "rm", k1)
    assert r.stdout.startswith(f"deleted container {k1}")
    assert (await ctl.json("container", "rm", k2))["items"] == [{"name": k2, "deleted": True, "forgotten": False}]
    assert not _netns_exists(k1) and not _netns_exists(k2)
    assert (await ctl.json("container", "ls"))["items"] == []
    r = await ctl.ok("container", "ls")
    assert r.stdout == "" and "no containers" in r.stderr
    # Bad names are usage errors before anything runs.
    err = await ctl.error("container", "create", "-bad", code=2)
    assert err["code"] == "usage"


async def test_network_disconnect_hostroutes_and_mesh(ctl: Ctl) -> None:
    for name, cidr in (("ma", "10.234.0.0/24"), ("mb", "10.234.1.0/24"), ("mc", "10.234.2.0/24")):
        await ctl.ok("network", "create", name, "--cidr", cidr)
    await ctl.ok("network", "connect", "ma", "mb")
    r = await ctl.ok("network", "disconnect", "ma", "mb")
    assert r.stdout.strip() == "ma / mb: disconnected"
    rep = await ctl.json("network", "disconnect", "ma", "mb")
    assert rep["changed"] is False
    assert (await ctl.ok("network", "disconnect", "mb", "ma")).stdout.strip() == "mb / ma: were not connected"
    assert (await ctl.json("network", "inspect", "ma"))["items"][0]["connected"] == []
    err = await ctl.error("network", "disconnect", "ma", "nope")
    assert err["code"] == "network_not_found"

    hr = await ctl.json("network", "hostroutes")
    assert ctl.node in [n["node"] for n in hr["nodes"]]
    r = await ctl.ok("network", "hostroutes")
    assert r.stdout.splitlines()[0] == "node\tprefixes\toverlaps\texpires in" and ctl.node in r.stdout

    await ctl.ok("network", "mesh", "create", "m1", "ma")
    r = await ctl.ok("network", "mesh", "add", "m1", "mb")
    assert r.stdout.strip() == "mb added to mesh m1 (2 member(s))"
    assert (await ctl.ok("network", "mesh", "add", "m1", "mb")).stdout.strip() == "mb already in mesh m1 (2 member(s))"
    assert (await ctl.json("network", "mesh", "add", "m1", "mc"))["changed"] is True
    groups = (await ctl.json("network", "mesh", "ls"))["items"]
    assert [g["name"] for g in groups] == ["m1"] and len(groups[0]["members"]) == 3
    r = await ctl.ok("network", "mesh", "ls")
    assert r.stdout.splitlines()[0] == "mesh\tmembers\tcreated"
    mesh, members, _ = r.stdout.splitlines()[1].split("\t")
    assert mesh == "m1" and sorted(members.split(", ")) == ["ma", "mb", "mc"]  # names, not ids
    r = await ctl.ok("network", "mesh", "remove", "m1", "mc")
    assert r.stdout.strip() == "mc removed from mesh m1 (2 member(s))"
    assert (await ctl.ok("network", "mesh", "remove", "m1", "mc")).stdout.strip() == "mc was not in mesh m1 " \
        "(2 member(s))"
    assert (await ctl.json("network", "inspect", "mc"))["items"][0]["mesh_groups"] == []
    assert "m1" in (await ctl.json("network", "inspect", "ma"))["items"][0]["mesh_groups"]
    r = await ctl.ok("network", "mesh", "delete", "m1")
    assert r.stdout.strip() == "deleted mesh group m1"
    assert (await ctl.json("network", "mesh", "ls"))["items"] == []
    err = await ctl.error("network", "mesh", "delete", "m1")
    assert err["code"] == "mesh_not_found"
    assert (await ctl.json("network", "inspect", "ma"))["items"][0]["mesh_groups"] == []


async def test_ipam_pool_exclude(ctl: Ctl) -> None:
    net = await ctl.json("network", "create", "px", "--cidr", "10.234.4.0/22")
    before = (await ctl.json("ipam", "pools", net["id"]))["items"][0]
    p = await ctl.json("ipam", "pool-exclude", net["id"], "10.234.5.0/24", "10.234.6.0/25")
    assert p["excluded"] == ["10.234.5.0/24", "10.234.6.0/25"] and p["capacity"] == before["capacity"] - 256 - 128
    r = await ctl.ok("ipam", "pool-exclude", net["id"], "10.234.6.0/25", "--remove")
    assert r.stdout.splitlines()[-1] == "excluded: 10.234.5.0/24"
    assert "network\tfamily\tcidr" in r.stdout and "pool of" in r.stderr  # the title goes to stderr when piped
    p = (await ctl.json("ipam", "pools", net["id"]))["items"][0]
    assert p["excluded"] == ["10.234.5.0/24"] and p["capacity"] == before["capacity"] - 256
    # An address handed out in a subnet blocks carving it out, with the holder named.
    c = ctl.netns("px1")
    await ctl.ok("endpoint", "create", c, "--network", "px", "--ip", "10.234.7.9")
    err = await ctl.error("ipam", "pool-exclude", net["id"], "10.234.7.0/24")
    assert err["code"] == "address_in_use"


# --- status and health: their exit codes ------------------------------------------------------

async def _invoke(cfg: VNetConfig, *args: str) -> Result:
    return await asyncio.to_thread(CliRunner().invoke, cli_main.cli, ["--nats", cfg.nats_url, *args],
                                   catch_exceptions=False)


async def _failing(rt: Runtime) -> tuple[str, str]:
    return "probe", "failing: the test says so [b]:warning:[/b]"  # neither markup nor an emoji code


async def test_status_and_health_exit_codes(ctl: Ctl) -> None:
    # Everything runs: 0.
    r = await ctl.ok("status")
    assert r.stdout.splitlines()[0] == "service\tnode\tinstance\tversion\tuptime\trequests\terrors"
    assert "not running" not in r.stdout
    for svc in ("ipam", "network", "endpoint", "policy", "metrics"):
        r = await ctl("health", svc)
        assert r.exit_code == 0 and r.stdout.startswith(f"{svc} ok "), r.output
    rep = await ctl.json("health", "node", "--node", ctl.node)
    assert rep["status"] == "ok"
    # The node worker without --node: a usage error (2), before any request.
    err = await ctl.error("health", "node", code=2)
    assert err["code"] == "usage" and "--node" in err["message"]
    err = await ctl.error("health", "bogus", code=2)
    assert err["code"] == "usage"


async def test_status_3_and_health_4(config: VNetConfig, start_service: Callable[..., Awaitable[Runtime]]) -> None:
    cfg = fresh_db_config(config)
    await start_service("ipam", cfg=cfg)
    # A service whose own check fails answers health "degraded": exit 4 (what compose healthchecks read).
    await start_service(ServiceDef("network", "a stand-in whose health check fails", health_checks=[_failing],
                                   uses_redis=False), cfg=cfg)
    r = await _invoke(cfg, "status")
    assert r.exit_code == 3, r.output
    rows = {line.split("\t")[0]: line for line in r.stdout.splitlines()[1:]}
    assert "\tnot running\t" in rows["endpoint"] and "\tnot running\t" in rows["node"] and "ipam" in rows
    doc: dict[str, Any] = json.loads((await _invoke(cfg, "status", "--json")).stdout)
    assert sorted(doc["missing"]) == ["endpoint", "metrics", "node", "policy"]
    assert {s["name"] for s in doc["items"]} == {"ipam", "network"}
    assert (await _invoke(cfg, "status", "--json")).exit_code == 3
    r = await _invoke(cfg, "health", "network")
    assert r.exit_code == 4 and "degraded" in r.stdout
    assert "probe: failing: the test says so [b]:warning:[/b]" in r.stdout
    r = await _invoke(cfg, "health", "network", "--json")
    assert r.exit_code == 4 and json.loads(r.stdout)["status"] == "degraded"
    assert (await _invoke(cfg, "health", "ipam")).exit_code == 0
    # A service that is not running at all: an error (1), as JSON under --json.
    r = await _invoke(cfg, "health", "policy", "--json")
    assert r.exit_code == 1 and json.loads(r.stdout)["error"]["code"] in ("unavailable", "timeout"), r.stdout
