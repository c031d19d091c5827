"""``vnetctl ... --dry-run`` (the paths a change would open and close, nothing changed) and
``vnetctl exposure``, piped (tab-separated tables) and ``--json``."""

from __future__ import annotations

import json

from tests.cli.conftest import Ctl


async def _fabric(ctl: Ctl) -> dict[str, str]:
    await ctl.ok("network", "create", "rweb", "--cidr", "10.233.0.0/24", "--isolation", "peer_only")
    await ctl.ok("network", "create", "rdb", "--cidr", "10.233.1.0/24", "--isolation", "peer_only")
    ids = {}
    for name, net in (("rw1", "rweb"), ("rw2", "rweb"), ("rd1", "rdb")):
        doc = await ctl.json("endpoint", "create", ctl.netns(name), "--network", net, "--label", f"tier={net}")
        ids[name] = doc["items"][0]["id"]
    return ids


async def test_dry_runs_print_the_diff_and_change_nothing(ctl: Ctl) -> None:
    ids = await _fabric(ctl)
    # isolation: rdb to none opens its endpoint to and from the outside
    r = await ctl.ok("network", "update", "rdb", "--isolation", "none", "--dry-run")
    lines = r.stdout.splitlines()
    assert lines[0] == "dry run: opens 2 paths, closes 0 (nothing changed)", r.stdout
    assert lines[1] == "change\tfrom\tto\tports\tpaths\te.g."
    assert sorted(lines[2:]) == [f"opens\texternal\trdb\tany\t1\t192.0.2.1 -> {ids['rd1']}",
                                 f"opens\trdb\texternal\tany\t1\t{ids['rd1']} -> 192.0.2.1"]
    assert (await ctl.json("network", "inspect", "rdb"))["items"][0]["isolation_mode"] == "peer_only"
    doc = await ctl.json("network", "update", "rdb", "--isolation", "none", "--dry-run")
    assert doc["dry_run"] is True and doc["isolation_mode"] == "none" and doc["reach"]["opens"] == 2
    # connect + a rule: the connection alone opens nothing (peer_only keeps to itself)
    r = await ctl.ok("network", "connect", "rweb", "rdb", "--dry-run")
    assert r.stdout.splitlines()[0] == "dry run: opens 0 paths, closes 0 (nothing changed)"
    assert "no path changes" in r.stderr
    await ctl.ok("network", "connect", "rweb", "rdb")
    rule = {"id": "web-db", "from": [{"labels": {"tier": "rweb"}}], "to": [{"labels": {"tier": "rdb"}}],
            "ports": [{"protocol": "tcp", "port": 5432}]}
    r = await ctl.ok("policy", "set", json.dumps(rule), "--dry-run")
    assert r.stdout.splitlines()[0] == "dry run: opens 2 paths, closes 0 (nothing changed)"
    assert r.stdout.splitlines()[2].startswith("opens\trweb\trdb\ttcp/5432\t2\t")
    assert (await ctl.json("policy", "ls"))["items"] == []
    doc = await ctl.json("policy", "set", json.dumps(rule))  # the real call: its reply carries the diff
    assert doc["reach"]["opens"] == 2 and "dry_run" not in doc  # a rule omits its defaults
    r = await ctl.ok("policy", "rm", "web-db", "--dry-run")
    assert r.stdout.splitlines()[0] == "dry run: opens 0 paths, closes 2 (nothing changed)"
    assert (await ctl.json("policy", "get", "web-db"))["id"] == "web-db"
    r = await ctl.ok("policy", "rm", "nothing-here", "--dry-run")
    assert r.stdout.strip() == "no rule nothing-here (nothing would be deleted)"
    # mesh: both peer_only, so membership opens nothing; the verb still answers the diff
    r = await ctl.ok("network", "mesh", "create", "rg", "rweb", "rdb", "--dry-run")
    assert r.stdout.splitlines()[0].startswith("dry run: opens 0 paths")
    assert (await ctl.json("network", "mesh", "ls"))["items"] == []


async def test_exposure_table_and_json(ctl: Ctl) -> None:
    ids = await _fabric(ctl)
    r = await ctl.ok("exposure")
    assert "nothing is reachable from outside the fabric" in r.stderr and r.stdout == ""
    await ctl.ok("network", "update", "rdb", "--isolation", "none")
    rule = {"id": "ops", "from": [{"cidr": "198.51.100.0/24"}], "to": [{"network": (await ctl.json(
        "network", "inspect", "rweb"))["items"][0]["id"]}], "ports": [{"protocol": "tcp", "port": 22}]}
    await ctl.ok("policy", "set", json.dumps(rule))
    r = await ctl.ok("exposure")
    lines = r.stdout.splitlines()
    assert lines[0] == "kind\twhat\tfrom\tports\tendpoints\texposed"
    assert lines[1] == f"network\trdb\tany\tany\t1\t{ids['rd1']}"
    assert lines[2] == f"rule\tops\t198.51.100.0/24\ttcp/22\t2\t{', '.join(sorted([ids['rw1'], ids['rw2']]))}"
    assert "2 way(s) in, 3 endpoint(s) exposed" in r.stderr
    doc = await ctl.json("exposure")
    assert [x["kind"] for x in doc["exposures"]] == ["network", "rule"] and doc["endpoints"] == 3
