"""A repeated create that asks for something else is a 409 naming the fields (not the old
endpoint with exit 0); the subnet_overlap hint nests only in the direction that works."""

from __future__ import annotations

import pytest

from tests.cli.conftest import Ctl
from vnet.core import errors as E


async def test_repeated_endpoint_create_with_other_parameters_is_a_conflict(ctl: Ctl) -> None:
    await ctl.ok("network", "create", "rnet", "--cidr", "10.233.0.0/24")
    c1 = ctl.netns("r1")
    first = (await ctl.json("endpoint", "create", c1, "--network", "rnet", "--ip", "10.233.0.10", "--mac",
                            "02:42:0a:e9:00:0a", "--ifname", "lan0", "-l", "app=web"))["items"][0]
    # The same request again, or one that leaves the choices to the service: the first endpoint.
    for extra in (("--ip", "10.233.0.10", "--mac", "02:42:0A:E9:00:0A", "--ifname", "lan0", "-l", "app=web"), ()):
        again = await ctl.json("endpoint", "create", c1, "--network", "rnet", *extra)
        assert [e["id"] for e in again["items"]] == [first["id"]] and again["errors"] == []
    # Anything named differently: 409 conflict, exit 1, the fields that differ named.
    cases = {
        ("--ip", "10.233.0.11"): ["ip"],
        ("--mac", "02:42:0a:e9:00:0b"): ["mac"],
        ("--ifname", "eth5"): ["ifname"],
        ("-l", "app=db"): ["labels"],
        ("--node", "ghost"): ["node"],
        ("--netns", "/proc/1/ns/net"): ["netns"],
        ("-p", "8080:80"): ["ports"],
        ("--ip", "10.233.0.12", "--ifname", "lan1", "-l", "app=web", "-l", "x=y"): ["ifname", "ip", "labels"],
    }
    for extra, fields in cases.items():
        doc = await ctl.json("endpoint", "create", c1, "--network", "rnet", *extra, code=1)
        assert doc["items"] == [] and len(doc["errors"]) == 1, doc
        err = doc["errors"][0]
        assert (err["ref"], err["code"]) == (c1, "conflict") and err["details"]["fields"] == fields, (extra, err)
        assert first["id"] in err["message"] and "vnetctl endpoint rm" in err["message"]
    r = await ctl("endpoint", "create", c1, "--network", "rnet", "--ip", "10.233.0.11")
    assert r.exit_code == 1 and "(conflict)" in r.stderr and "ip is '10.233.0.10', asked '10.233.0.11'" in r.stderr
    # Nothing was allocated or recorded by the refused repeats.
    pools = await ctl.json("ipam", "pools", first["network_id"])
    assert [p["used"] for p in pools["items"]] == [1]
    assert [e["id"] for e in (await ctl.json("endpoint", "ls"))["items"]] == [first["id"]]


async def test_repeated_request_id_with_other_parameters_is_a_conflict(ctl: Ctl) -> None:
    net = await ctl.m.create_network("rid", "10.233.1.0/24")
    c2, c3 = ctl.netns("r2"), ctl.netns("r3")
    a = await ctl.m.create_endpoint(c2, net.id, request_id="req-7")
    assert (await ctl.m.create_endpoint(c2, net.id, request_id="req-7")).id == a.id
    with pytest.raises(E.Conflict) as ei:
        await ctl.m.create_endpoint(c2, net.id, "10.233.1.77", request_id="req-7")
    assert ei.value.code == "conflict" and ei.value.details["fields"] == ["ip"]
    assert "request_id 'req-7'" in ei.value.message
    with pytest.raises(E.Conflict) as ei:
        await ctl.m.create_endpoint(c3, net.id, request_id="req-7")
    assert ei.value.details["fields"] == ["container"]
    assert ei.value.details["differences"]["container"] == {"existing": c2, "requested": c3}
    # The network by name is the same network; another network is not.
    assert (await ctl.m.create_endpoint(c2, "rid", request_id="req-7")).id == a.id
    other = await ctl.m.create_network("rid2", "10.233.2.0/24")
    with pytest.raises(E.Conflict) as ei:
        await ctl.m.create_endpoint(c2, "rid2", request_id="req-7")
    assert ei.value.details["fields"] == ["network"]
    assert ei.value.details["differences"]["network"] == {"existing": net.id, "requested": "rid2"}
    assert [e.network_id for e in await ctl.m.list_endpoints()] == [net.id] and other.id != net.id


async def test_subnet_overlap_hint_points_the_right_way(ctl: Ctl) -> None:
    await ctl.ok("network", "create", "small", "--cidr", "172.20.1.0/24")
    # The README's order: the new network is the larger; it cannot be a child of the smaller.
    err = await ctl.error("network", "create", "big", "--cidr", "172.20.0.0/16")
    assert err["code"] == "subnet_overlap" and err["details"]["conflict_name"] == "small"
    assert "child" not in err["message"].split(";")[0]
    assert "parent 'small'" not in err["message"] and "--parent small" not in err["message"]
    assert "would contain 'small'" in err["message"] and "pick a free range" in err["message"]
    # The other way round nesting works, and the hint says how.
    await ctl.ok("network", "create", "wide", "--cidr", "172.21.0.0/16")
    err = await ctl.error("network", "create", "narrow", "--cidr", "172.21.3.0/24")
    assert err["code"] == "subnet_overlap" and "create it as a child with parent 'wide'" in err["message"]
    assert "--parent wide" in err["message"]
    await ctl.ok("network", "create", "narrow", "--cidr", "172.21.3.0/24", "--parent", "wide")
    # The same range again: taken, no nesting offered.
    err = await ctl.error("network", "create", "again", "--cidr", "172.20.1.0/24")
    assert "child" not in err["message"] and "172.20.1.0/24 is 'small''s" in err["message"]
