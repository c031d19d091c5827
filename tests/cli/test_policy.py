"""``vnetctl policy``: explain by container name, endpoint id or address (and never DENIED
next to "not governed"), and every rule verb: set, get, ls, rm, ruleset."""

from __future__ import annotations

import json

from tests.cli.conftest import Ctl


async def _two_containers(ctl: Ctl) -> tuple[str, str, dict[str, str]]:
    await ctl.ok("network", "create", "pfree", "--cidr", "10.232.0.0/24", "--isolation", "none")
    await ctl.ok("network", "create", "pshut", "--cidr", "10.232.1.0/24", "--isolation", "full")
    a, b = ctl.netns("pa"), ctl.netns("pb")
    ids = {}
    for c, net in ((a, "pfree"), (b, "pfree"), (a, "pshut")):
        doc = await ctl.json("endpoint", "create", c, "--network", net)
        ids[f"{c}@{net}"] = doc["items"][0]["id"]
    return a, b, ids


async def test_explain_takes_container_names_ids_and_addresses(ctl: Ctl) -> None:
    a, b, ids = await _two_containers(ctl)
    ea, eb = ids[f"{a}@pfree"], ids[f"{b}@pfree"]
    by_id = await ctl.json("policy", "explain", ea, eb, "--proto", "icmp")
    assert by_id["allowed"] and by_id["by"] == "mode" and by_id["src"]["endpoint"] == ea
    addr_a = by_id["src"]["address"]
    # a is on two networks: the flow to b takes the one they share (pfree), and the reasons say so.
    by_name = await ctl.json("policy", "explain", a, b, "--proto", "icmp")
    assert (by_name["src"]["endpoint"], by_name["dst"]["endpoint"]) == (ea, eb) and by_name["allowed"]
    assert by_name["reasons"][0].startswith(f"container {a}: endpoint {ea} of 2")
    assert by_name["reasons"][1].startswith(f"container {b}: endpoint {eb} (")
    mixed = await ctl.json("policy", "explain", b, addr_a, "--proto", "icmp")
    assert (mixed["src"]["endpoint"], mixed["dst"]["endpoint"]) == (eb, ea) and mixed["allowed"]
    # From b to the container's other network: related? no: DENIED, in words, not "(by denied)".
    shut = ids[f"{a}@pshut"]
    r = await ctl.ok("policy", "explain", b, shut, "--port", "80")
    first = r.stdout.splitlines()[0]
    assert first.startswith("DENIED ") and "tcp/80" in first and "by denied" not in first
    assert "no isolation mode or allow rule allows it" in first
    r = await ctl.ok("policy", "explain", a, b, "--proto", "icmp")
    assert r.stdout.startswith(f"ALLOWED {by_name['src']['address']} (endpoint {ea} in pfree) -> ")  # by name
    err = await ctl.error("policy", "explain", "no-such-container", b)
    assert err["code"] == "endpoint_not_found" and "no-such-container" in err["message"]
    assert "container" in err["message"]


async def test_explain_ungoverned_flow_is_not_denied(ctl: Ctl) -> None:
    r = await ctl.ok("policy", "explain", "1.2.3.4", "5.6.7.8")
    assert r.stdout.startswith("NOT GOVERNED 1.2.3.4 (external) -> 5.6.7.8 (external) tcp"), r.stdout
    assert "DENIED" not in r.stdout and "ALLOWED" not in r.stdout and "does not govern" in r.stdout
    v = await ctl.json("policy", "explain", "1.2.3.4", "5.6.7.8")
    assert v["by"] == "ungoverned" and v["allowed"] is True and v["path"] == []
    # Mixed families of two outside addresses: still not VNet's business.
    v = await ctl.json("policy", "explain", "1.2.3.4", "2001:db8::1")
    assert v["by"] == "ungoverned"


async def test_rule_verbs(ctl: Ctl) -> None:
    a, b, ids = await _two_containers(ctl)
    shut = ids[f"{a}@pshut"]
    await ctl.ok("endpoint", "create", b, "--network", "pshut")
    before = await ctl.json("policy", "explain", b, shut, "--port", "8080")
    assert not before["allowed"] and before["by"] == "denied" and before["path"] == ["same"]
    nid = (await ctl.json("network", "inspect", "pshut"))["items"][0]["id"]  # selectors name networks by id
    rule = {"id": "web-in", "from": [{"network": nid}], "to": [{"network": nid}],
            "ports": [{"protocol": "tcp", "port": 8080}], "description": "[b]not markup[/b]"}
    r = await ctl.ok("policy", "set", json.dumps(rule))
    assert r.stdout.startswith("rule web-in set") and "web-in\t" in r.stdout
    assert await ctl.json("policy", "get", "web-in") == rule
    r = await ctl.ok("policy", "get", "web-in")
    assert r.stdout.splitlines()[0] == "id\tfrom\tto\tports"
    assert (await ctl.json("policy", "ls"))["items"] == [rule]
    r = await ctl.ok("policy", "ls")
    assert r.stdout.splitlines()[1].startswith(f'web-in\t[{{"network":"{nid}"}}]')
    # A rule replaced whole, through --json.
    rule2 = {**rule, "ports": [{"protocol": "tcp", "port": 9090}]}
    got = await ctl.json("policy", "set", json.dumps(rule2))
    reach = got.pop("reach")  # the reply carries the paths the change opened and closed
    assert got == rule2 and reach["opens"] == reach["closes"] > 0  # 8080 closed, 9090 opened
    # The node's compiled script; the same as JSON.
    r = await ctl.ok("policy", "ruleset", ctl.node)
    assert r.stdout.startswith("# version ") and "rule(s)" in r.stdout.splitlines()[0]
    rs = await ctl.json("policy", "ruleset", ctl.node)
    assert rs["node"] == ctl.node and rs["rules"] == 1 and rs["version"] in r.stdout
    v = await ctl.json("policy", "explain", b, shut, "--port", "9090")
    assert (v["allowed"], v["by"], v["rules"]) == (True, "rule", ["web-in"])
    r = await ctl.ok("policy", "explain", b, shut, "--port", "9090")
    assert r.stdout.startswith("ALLOWED ") and "(allowed by rule web-in)" in r.stdout.splitlines()[0]
    # Delete: said so; again: nothing to delete (not an error); then get is rule_not_found.
    r = await ctl.ok("policy", "rm", "web-in")
    assert r.stdout.strip() == "deleted rule web-in"
    assert await ctl.json("policy", "rm", "web-in") == {"id": "web-in", "deleted": False, "dry_run": False,
                                                         "reach": None}
    err = await ctl.error("policy", "get", "web-in")
    assert err["code"] == "rule_not_found"
    # A rule the engine refuses: the server's message, as the JSON error.
    err = await ctl.error("policy", "set", '{"id": "bad", "from": [{}], "to": [{"endpoint": "x"}]}')
    assert err["code"] == "invalid_request"
