"""``vnetctl endpoint label`` and ``vnetctl endpoint ports`` (live endpoint updates), piped
(tab-separated tables) and ``--json``, with ``--dry-run`` and the usage errors."""

from __future__ import annotations

import json

from tests.cli.conftest import Ctl


async def test_label_and_ports_verbs(ctl: Ctl) -> None:
    await ctl.ok("network", "create", "lweb", "--cidr", "10.234.0.0/24", "--isolation", "full")
    ids = {}
    for name, labels in (("lw1", []), ("ld1", ["--label", "role=db"])):
        doc = await ctl.json("endpoint", "create", ctl.netns(name), "--network", "lweb", *labels)
        ids[name] = doc["items"][0]["id"]
    rule = {"id": "web-db", "from": [{"labels": {"role": "web"}}], "to": [{"labels": {"role": "db"}}],
            "ports": [{"protocol": "tcp", "port": 5432}]}
    await ctl.ok("policy", "set", json.dumps(rule))
    w = ids["lw1"]

    # --dry-run: the diff as a table, nothing changed
    r = await ctl.ok("endpoint", "label", w, "role=web", "tier=front", "--dry-run")
    print(r.stdout)
    lines = r.stdout.splitlines()
    assert "dry run: opens 1 path, closes 0 (nothing changed)" in lines, r.stdout
    assert f"opens\tlweb\tlweb\ttcp/5432\t1\t{w} -> {ids['ld1']}" in lines, r.stdout
    assert (await ctl.json("endpoint", "inspect", w))["labels"] == {}

    # the real call: set two, then remove one (KEY-); --json carries the same diff
    doc = await ctl.json("endpoint", "label", w, "role=web", "tier=front")
    assert doc["changes"] == ["labels"] and doc["endpoint"]["labels"] == {"role": "web", "tier": "front"}
    assert doc["reach"]["opens"] == 1 and doc["endpoint"]["revision"] == 1
    r = await ctl.ok("endpoint", "label", w, "tier-")
    print(r.stdout)
    assert f"endpoint {w}" in r.stdout and "changed labels (revision 2)" in r.stdout, r.stdout
    assert (await ctl.json("endpoint", "inspect", w))["labels"] == {"role": "web"}
    # --replace: the arguments are all the labels; --expect-revision guards a stale read
    err = await ctl.error("endpoint", "label", w, "role=web", "--replace", "--expect-revision", "1")
    assert err["code"] == "stale_revision", err
    doc = await ctl.json("endpoint", "label", w, "role=api", "--replace", "--expect-revision", "2")
    assert doc["endpoint"]["labels"] == {"role": "api"} and doc["reach"]["closes"] == 1

    # ports: publish, a taken host port is port_in_use naming the holder, --none unpublishes
    r = await ctl.ok("endpoint", "ports", w, "8080:80", "5353:53/udp", "--dry-run")
    print(r.stdout)
    assert "dry run: opens 2 paths, closes 0 (nothing changed)" in r.stdout.splitlines(), r.stdout
    doc = await ctl.json("endpoint", "ports", w, "8080:80", "5353:53/udp")
    assert doc["changes"] == ["ports"] and [p["host_port"] for p in doc["endpoint"]["ports"]] == [8080, 5353]
    err = await ctl.error("endpoint", "ports", ids["ld1"], "8080:81")
    assert err["code"] == "port_in_use" and err["details"]["holder"] == w, err
    r = await ctl.ok("endpoint", "inspect", w)
    assert "8080->80/tcp, 5353->53/udp" in r.stdout, r.stdout
    doc = await ctl.json("endpoint", "ports", w, "--none")
    assert doc["endpoint"]["ports"] == [] and doc["reach"]["closes"] == 2
    await ctl.ok("endpoint", "ports", ids["ld1"], "8080:81")  # free again

    # usage errors: exit 2, nothing sent
    for args in (("endpoint", "label", w, "novalue"), ("endpoint", "label", w, "a-", "--replace"),
                 ("endpoint", "ports", w), ("endpoint", "ports", w, "80:80", "--none"),
                 ("endpoint", "ports", w, "8080")):
        r = await ctl(*args)
        assert r.exit_code == 2, (args, r.output)
    # an unknown endpoint: 404, exit 1
    err = await ctl.error("endpoint", "label", "nope", "a=b")
    assert err["code"] == "endpoint_not_found", err
