"""``vnetctl network create ... --parent P --dry-run`` and ``vnetctl network rm --dry-run``:
the subnet a child would get and the paths deleting a network would close, nothing changed."""

from __future__ import annotations

from tests.cli.conftest import Ctl


async def test_child_create_and_delete_dry_runs(ctl: Ctl) -> None:
    await ctl.ok("network", "create", "fam", "--cidr", "10.234.0.0/16", "--isolation", "mesh_only")
    r = await ctl.ok("network", "create", "kid", "--parent", "fam", "--prefix-len", "24", "--isolation", "mesh_only",
                     "--dry-run")
    lines = r.stdout.splitlines()
    assert lines[0].startswith("would create network kid 10.234.") and "in parent" in lines[0], r.stdout
    assert lines[1] == "dry run: opens 0 paths, closes 0 (nothing changed)", r.stdout
    assert [n["name"] for n in (await ctl.json("network", "ls"))["items"]] == ["fam"]
    doc = await ctl.json("network", "create", "kid", "--parent", "fam", "--prefix-len", "24", "--dry-run")
    assert doc["dry_run"] is True and doc["reach"]["opens"] == 0 and doc["parent"]
    await ctl.ok("network", "create", "kid", "--parent", "fam", "--prefix-len", "24", "--isolation", "mesh_only")
    ids = {}
    for name, net in (("fa1", "fam"), ("ki1", "kid")):
        ids[name] = (await ctl.json("endpoint", "create", ctl.netns(name), "--network", net))["items"][0]["id"]
    r = await ctl.ok("network", "rm", "kid", "--force", "--dry-run")
    lines = r.stdout.splitlines()
    assert lines[0].startswith("would delete network kid ") and "1 endpoint(s) would be deleted" in lines[0], r.stdout
    assert lines[1] == "dry run: opens 0 paths, closes 2 (nothing changed)", r.stdout
    assert lines[2] == "change\tfrom\tto\tports\tpaths\te.g."
    assert sorted(lines[3:]) == [f"closes\tfam\tkid\tany\t1\t{ids['fa1']} -> {ids['ki1']}",
                                 f"closes\tkid\tfam\tany\t1\t{ids['ki1']} -> {ids['fa1']}"], r.stdout
    assert sorted(n["name"] for n in (await ctl.json("network", "ls"))["items"]) == ["fam", "kid"]
    doc = await ctl.json("network", "rm", "kid", "--force")
    assert doc["items"][0]["reach"]["closes"] == 2  # the real call's reply carries the diff
