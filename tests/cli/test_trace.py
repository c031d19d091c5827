"""Every vnetctl mutation prints its trace id; ``vnetctl trace`` prints that trace's spans
from the local trace files (no OTLP endpoint in the tests)."""

from __future__ import annotations

import asyncio
import re

from tests.cli.conftest import Ctl

TRACE_LINE = re.compile(r"^trace id: ([0-9a-f]{32})$", re.M)


async def test_mutation_prints_its_trace_id_and_trace_shows_the_tree(ctl: Ctl) -> None:
    r = await ctl.ok("network", "create", "trnet", "--cidr", "10.234.0.0/24")
    ids = TRACE_LINE.findall(r.stderr)
    assert len(ids) == 1, r.stderr
    tid = ids[0]
    r = await ctl.ok("network", "ls")  # a read prints none
    assert "trace id" not in r.stderr
    doc: dict[str, object] = {}
    for _ in range(300):  # spans reach the files from the processors' threads: poll, generous deadline
        r = await ctl("trace", tid, "--json")
        if r.exit_code == 0:
            doc = __import__("json").loads(r.stdout)
            names = [s["name"] for s in doc["spans"]]  # type: ignore[index]
            if "process vnet.network.create" in names and "process vnet.ipam.pool.create" in names:
                break
        await asyncio.sleep(0.1)
    spans = doc["spans"]
    assert isinstance(spans, list)
    by_name = {s["name"]: s for s in spans}
    root = spans[0]
    assert root["name"] == "publish vnet.network.create" and root["depth"] == 0
    assert by_name["process vnet.network.create"]["depth"] == 1
    assert by_name["process vnet.ipam.pool.create"]["depth"] > by_name["process vnet.network.create"]["depth"]
    assert all(s["trace_id"] == tid for s in spans)
    r = await ctl.ok("trace", tid[:12])
    lines = r.stdout.splitlines()
    assert lines[0] == "start\tduration\tprocess\tspan"
    assert lines[1].startswith("+0.0 ms\t") and lines[1].endswith("\tpublish vnet.network.create")
    assert any(x.endswith("\t  process vnet.network.create") for x in lines)
    assert re.search(rf"trace {tid}: \d+ spans in \d+ process\(es\), [\d.]+ ms", r.stderr)
    err = await ctl.error("trace", "0123456789abcdef0123456789abcdef")
    assert err["code"] == "not_found" and "OTLP" in err["message"]
    err = await ctl.error("trace", "xyz", code=2)
    assert err["code"] == "invalid_request"
