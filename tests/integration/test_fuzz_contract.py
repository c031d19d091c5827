"""Fuzz every request subject from the JSON Schemas in ``docs/contract/`` (issue 11).

For every operation the contract document lists (``x-vnet-operations``), the test draws
requests from the operation's request schema (valid-shaped ones, which reach the service's
own checks and its store: :func:`from_schema` turns the JSON Schema subset msgspec emits into
a hypothesis strategy — hypothesis-jsonschema 0.23 does not run on this hypothesis), mutates some (a required field
dropped, an unknown field added, a field of the wrong type, a value out of range), and adds
bodies that are no request at all (random bytes, JSON of the wrong type, truncated JSON).
Each is sent to a real control plane (ipam, network, endpoint, policy, metrics and one
node worker on a test host namespace) as raw bytes on the operation's subject.

Asserted: every request is answered (no hang), no answer is a 5xx other than the documented
outcomes of a valid request (``pool_exhausted``, ``subnet_pool_exhausted``, ``limit_reached``,
``driver_unavailable``, ``encryption_unavailable``), no answer leaks a traceback, and every
service still answers its health check afterwards.

CI runs a few examples per subject (``VNET_FUZZ_EXAMPLES``, default 3; e.g. 50 by hand) with
a random seed printed on failure (``VNET_FUZZ_SEED`` replays one).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from tests.conftest import control_plane
from vnet.adapters import nats as nats_adapter
from vnet.runtime.config import VNetConfig
from vnet.runtime.service import Runtime

SCHEMAS = Path(__file__).resolve().parents[2] / "docs" / "contract" / "schemas.json"
EXAMPLES = int(os.environ.get("VNET_FUZZ_EXAMPLES", "3"))
SEED = int(os.environ.get("VNET_FUZZ_SEED", str(random.randrange(1 << 32))))
REPLY_TIMEOUT_S = 60.0  # generous: a loaded machine is slow, never wrong; a hang still fails
CONCURRENCY = 8
# 5xx codes that are a correct answer to a valid request (documented in docs/contract/errors.md)
ALLOWED_5XX = {"pool_exhausted", "subnet_pool_exhausted", "limit_reached", "driver_unavailable",
               "encryption_unavailable"}
SERVICES = ("ipam", "network", "endpoint", "policy", "metrics")


def _doc() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(SCHEMAS.read_text())
    return doc


def _schema(doc: dict[str, Any], name: str) -> dict[str, Any]:
    schema: dict[str, Any] = doc["$defs"][name]
    return schema


# Strings the services parse or look up: shapes (addresses, CIDRs, words) and, filled in once the
# fixture objects exist, their names and ids, so valid-shaped requests reach real records.
SHAPED: list[str] = ["10.1.0.0/24", "10.1.0.5", "fd00::/64", "fd00::5", "0.0.0.0/0", "eth0", "none", "bridge",
                     "overlay", "macvlan", "peer_only", "mesh_only", "full", "tcp", "udp", "icmp", "/proc/1/ns/net",
                     "a", "10.88.0.0/24", "10.88.0.7"]


def from_schema(schema: dict[str, Any], defs: dict[str, Any], depth: int = 0) -> st.SearchStrategy[Any]:
    """A strategy for the JSON values ``schema`` accepts (the keywords msgspec emits)."""
    if "$ref" in schema:
        return from_schema(defs[schema["$ref"].rsplit("/", 1)[1]], defs, depth + 1)
    if "anyOf" in schema:
        return st.one_of(*(from_schema(s, defs, depth + 1) for s in schema["anyOf"]))
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "const" in schema:
        return st.just(schema["const"])
    t = schema.get("type")
    if isinstance(t, list):
        return st.one_of(*(from_schema({**schema, "type": x}, defs, depth + 1) for x in t))
    if t == "null":
        return st.none()
    if t == "boolean":
        return st.booleans()
    if t == "integer":
        lo = schema.get("minimum", schema["exclusiveMinimum"] + 1 if "exclusiveMinimum" in schema else -(2**63))
        hi = schema.get("maximum", schema["exclusiveMaximum"] - 1 if "exclusiveMaximum" in schema else 2**63 - 1)
        return st.integers(lo, hi)
    if t == "number":
        return st.floats(schema.get("minimum", schema.get("exclusiveMinimum")),
                         schema.get("maximum", schema.get("exclusiveMaximum")), allow_nan=False,
                         allow_infinity=False, exclude_min="exclusiveMinimum" in schema,
                         exclude_max="exclusiveMaximum" in schema)
    if t == "string":
        lo, hi = schema.get("minLength", 0), min(schema.get("maxLength", 80), 300)
        shaped = st.sampled_from(SHAPED).filter(lambda x: lo <= len(x) <= hi)
        if "pattern" in schema:
            pat = re.compile(schema["pattern"])
            return st.one_of(shaped.filter(lambda x: pat.fullmatch(x) is not None),
                             st.from_regex(pat, fullmatch=True).filter(lambda x: lo <= len(x) <= hi))
        return st.one_of(st.text(min_size=lo, max_size=hi), shaped, shaped)
    if t == "array":
        item = from_schema(schema.get("items", {}), defs, depth + 1) if depth < 6 else st.none()
        return st.lists(item, min_size=schema.get("minItems", 0), max_size=min(schema.get("maxItems", 4), 4))
    if t == "object" or "properties" in schema:
        props: dict[str, Any] = schema.get("properties", {})
        required = set(schema.get("required", []))
        if not props:
            names = from_schema(schema.get("propertyNames", {"type": "string", "maxLength": 20}), defs, depth + 1)
            value = from_schema(schema.get("additionalProperties", {"type": "string"}), defs, depth + 1) \
                if isinstance(schema.get("additionalProperties"), dict) else st.text(max_size=10)
            return st.dictionaries(names, value, max_size=min(schema.get("maxProperties", 3), 3))
        fields = {k: from_schema(v, defs, depth + 1) if depth < 6 else st.none() for k, v in props.items()}

        @st.composite
        def obj(draw: st.DrawFn) -> dict[str, Any]:
            out = {}
            for k, strat in fields.items():
                if k in required or draw(st.booleans()):
                    out[k] = draw(strat)
            return out

        return obj()
    return st.one_of(st.none(), st.integers(), st.text(max_size=10))  # {}: anything


def _draw(strategy: st.SearchStrategy[Any], n: int, salt: int) -> list[Any]:
    """``n`` values of ``strategy`` (generation only: nothing to shrink, no database)."""
    out: list[Any] = []

    @seed(SEED ^ salt)
    @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(x: Any) -> None:
        if len(out) < n:
            out.append(x)

    collect()
    return out


WRONG: list[Any] = [None, 0, -1, 2**63, 1.5, "", "x" * 5000, [], [1, "a"], {}, {"a": {"b": []}}, True,
                    "../../etc/passwd", "10.0.0.0/33", "ff02::1%eth0", "\u0000\ud7ff"]


def _mutate(rng: random.Random, obj: Any, schema: dict[str, Any]) -> Any:
    """A valid-shaped request made invalid (or odd) in one place."""
    if not isinstance(obj, dict):
        return rng.choice(WRONG)
    props = list(schema.get("properties", {}))
    out = dict(obj)
    kind = rng.choice(["drop", "unknown", "wrong", "wrong", "nested"])
    required = schema.get("required", [])
    if kind == "drop" and required:
        out.pop(rng.choice(required), None)
    elif kind == "unknown" or not props:
        out["no_such_field_" + str(rng.randrange(100))] = rng.choice(WRONG)
    elif kind == "wrong":
        out[rng.choice(props)] = rng.choice(WRONG)
    else:
        out[rng.choice(props)] = {"deep": [[[{"x": rng.choice(WRONG)}]]]}
    return out


def _junk(rng: random.Random) -> list[bytes]:
    """Bodies that are no request at all."""
    return [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))),
            b"[1, 2, 3]", b'"a string"', b"42", b"null", b'{"unterminated": ', b"{" * 2000 + b"}" * 2000,
            json.dumps({"x": "y" * 100_000}).encode()]


class Outcome(msgspec.Struct):
    subject: str
    body: bytes
    status: int  # 0: answered without an error
    code: str
    message: str


async def _send(nc: Any, subject: str, body: bytes) -> Outcome:
    try:
        msg = await nc.request(subject, body, timeout=REPLY_TIMEOUT_S)
    except Exception as exc:  # no answer at all: a hang (or a crash) — what this test exists for
        return Outcome(subject, body, -1, type(exc).__name__, str(exc))
    hdr = msg.headers or {}
    status = int(hdr.get("Nats-Service-Error-Code", "0") or 0)
    code, message = "", ""
    if status:
        try:
            err = json.loads(msg.data)
            code, message = str(err.get("code", "")), str(err.get("message", ""))
        except ValueError:
            code, message = "?", msg.data[:200].decode(errors="replace")
    return Outcome(subject, body, status, code, message)


def _bad(o: Outcome) -> bool:
    if o.status == -1:
        return True
    if "Traceback" in o.message or 'File "' in o.message:
        return True
    return o.status >= 500 and o.code not in ALLOWED_5XX


@pytest.mark.skipif(os.geteuid() != 0, reason="the node worker's host namespace needs root")
async def test_fuzz_every_request_subject(config: VNetConfig, start_service: Callable[..., Awaitable[Runtime]],
                                          netns: Callable[[str], str], run_prefix: str) -> None:
    doc = _doc()
    ops: dict[str, dict[str, str]] = doc["x-vnet-operations"]
    node = f"{run_prefix}-fz"
    cfg = msgspec.structs.replace(config, request_timeout_s=REPLY_TIMEOUT_S)
    async with control_plane(cfg, start_service, netns, host="fzh", node=node, resync_s=3600,
                             services=SERVICES) as cp:
        nc = await nats_adapter.connect(cp.cfg, "test-fuzz")
        # Some real objects for the valid-shaped requests to hit (by name and by id).
        m = cp.m
        a = await m.create_network("fz-a", "10.88.0.0/24", isolation="peer_only")
        b = await m.create_network("fz-b", "10.88.1.0/24", isolation="mesh_only")
        kid = await m.create_network("fz-kid", parent="fz-b", prefix_len=26)
        await m.connect_networks("fz-a", "fz-b")
        await m.create_mesh("fzm", ["fz-b", "fz-kid"])
        ctr = netns("fzc")
        ep = await m.create_endpoint("fzc", a.id, netns=ctr, node=node, labels={"app": "web"}, wait=True,
                                     wait_timeout=60.0)
        SHAPED.extend([a.id, b.id, kid.id, "fz-a", "fz-b", "fz-kid", "fzm", ep.id, "fzc", ctr, node, "app"])
        rng = random.Random(SEED)
        bad: list[Outcome] = []
        statuses: list[int] = []
        sent = 0
        sem = asyncio.Semaphore(CONCURRENCY)

        async def one(subject: str, body: bytes) -> None:
            nonlocal sent
            async with sem:
                o = await _send(nc, subject, body)
                sent += 1
                statuses.append(o.status)
                if _bad(o):
                    bad.append(o)

        try:
            for i, (_name, op) in enumerate(sorted(ops.items())):
                subject = op["subject"].replace("{node}", node)
                schema = _schema(doc, op["request"])
                valid = _draw(from_schema(schema, doc["$defs"]), EXAMPLES, i)
                bodies = [json.dumps(v).encode() for v in valid]
                bodies += [json.dumps(_mutate(rng, v, doc["$defs"][op["request"]])).encode() for v in valid]
                bodies += rng.sample(_junk(rng), min(len(_junk(rng)), max(2, EXAMPLES)))
                await asyncio.gather(*(one(subject, b) for b in bodies))
            # every service (and the node worker) still answers
            for svc in SERVICES:
                assert (await cp.m.health(svc)).status in ("ok", "degraded"), svc
            assert (await cp.m.health("node", node=node)).status in ("ok", "degraded")
        finally:
            await nc.drain()
        seen = Counter(o for o in statuses)
        report = "\n".join(f"{o.subject} {o.status} {o.code}: {o.message[:300]} <- {o.body[:300]!r}" for o in bad)
        print(f"\nfuzz: {sent} requests over {len(ops)} subjects ({EXAMPLES} valid-shaped + as many mutated per "
              f"subject, plus junk), seed {SEED}: answers by status {dict(sorted(seen.items()))}, {len(bad)} bad")
        assert not bad, f"seed {SEED} (VNET_FUZZ_SEED={SEED} replays it):\n{report}"
