"""Secure by default (issue 10), against the real nats-server and valkey-server: no connection
without the right credentials, every identity of the permission matrix tries every probed
subject family and the server (the embedded stack's config and the compose one) must answer
exactly what the matrix says, and nobody reads another's replies.
"""

# ruff: noqa: F811 (a test's argument secured is security_env's fixture, imported for pytest)

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

from tests.integration.security_env import (
    NODES,
    WAIT_S,
    Secured,
    connect_as,
    secured,  # noqa: F401  (the fixture)
)
from vnet.adapters import nats as nats_adapter
from vnet.contracts import permissions, subjects
from vnet.core import errors as E
from vnet.runtime import credentials, servers
from vnet.runtime.config import VNetConfig

# --- authentication ---------------------------------------------------------------------------

async def test_nats_refuses_a_connection_without_or_with_wrong_credentials(secured: Secured) -> None:
    for kw in ({}, {"user": "vnet-admin", "password": "guess"}, {"user": "nobody", "password": "x"}):
        with pytest.raises(Exception) as ei:
            await nats.connect(secured.nats.url, allow_reconnect=False, max_reconnect_attempts=0,
                               connect_timeout=5, **kw)
        assert "authorization" in str(ei.value).lower(), ei.value
    # Our adapter says so as `unavailable`, naming the URL.
    with pytest.raises(E.VNetError) as ve:
        await nats_adapter.connect(VNetConfig.load(env={}, nats_url=secured.nats.url, connect_timeout_s=3.0), "t",
                                   allow_reconnect=False)
    assert ve.value.code == "unavailable"


async def test_valkey_refuses_without_a_password_and_holds_services_to_their_keys(secured: Secured) -> None:
    anon = aioredis.Redis.from_url(secured.valkey.url)
    try:
        with pytest.raises((AuthenticationError, ResponseError)) as ei:
            await anon.ping()
        assert isinstance(ei.value, AuthenticationError) or "noauth" in str(ei.value).lower(), ei.value
        with pytest.raises((AuthenticationError, ResponseError)):
            await anon.execute_command("AUTH", "default", "anything")
    finally:
        await anon.aclose()
    user = credentials.service_redis_user("ipam")
    r = aioredis.Redis.from_url(secured.valkey.url, username=user, password=secured.creds.redis[user])
    try:
        await r.set("vnet:{test:sec}:k", b"1")
        assert await r.get("vnet:{test:sec}:k") == b"1"
        with pytest.raises(NoPermissionError):
            await r.set("other-key", b"1")  # outside VNet's keys
        for cmd in (("FLUSHALL",), ("CONFIG", "GET", "requirepass"), ("KEYS", "*"), ("ACL", "LIST")):
            with pytest.raises(NoPermissionError):
                await r.execute_command(*cmd)
    finally:
        await r.delete("vnet:{test:sec}:k")
        await r.aclose()


# --- the matrix, exactly ------------------------------------------------------------------------

@pytest.fixture(params=["embedded", "compose"])
def matrix_server(request: pytest.FixtureRequest, secured: Secured, tmp_path: Path) -> Iterator[Secured]:
    """The embedded stack's generated config (passwords inline), or the compose one
    (ops/nats/nats.conf's rendering, passwords from the environment)."""
    if request.param == "embedded":
        yield secured
        return
    conf = tmp_path / "compose-nats.conf"
    conf.write_text(permissions.compose_nats_config(list(NODES)))
    env = {permissions.password_env(u): secured.creds.nats[u.name] for u in permissions.users(NODES)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # nats-server reads $NATS_PASSWORD_* from its environment
    try:
        srv = servers.start_nats(tmp_path / "nats", config_file=conf)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        yield Secured(secured.dir, secured.creds, srv, secured.valkey)
    finally:
        srv.stop()


async def test_every_identity_gets_exactly_what_the_matrix_says(matrix_server: Secured) -> None:
    """For every identity and every probed subject family, publish and subscribe: the server
    refuses exactly what the matrix denies (the configs are generated from it, so this checks
    the rendering and the matcher used for docs/security.md against nats-server), with the
    embedded stack's config and with the compose stack's."""
    secured = matrix_server
    checked = 0
    for user in permissions.users(NODES):
        c = await connect_as(secured, user)
        try:
            expected: set[tuple[str, str]] = set()
            for _what, op, template in permissions.PROBES:
                subj = template.format(node=user.node or "n1", other="n2", user=user.name)
                if op == "pub":
                    await c.nc.publish(subj, b"{}")
                    allowed = user.may_publish(subj)
                else:
                    await c.nc.subscribe(subj)
                    allowed = user.may_subscribe(subj)
                if not allowed:
                    expected.add((op, subj.lower()))
                checked += 1
            got = await c.violations()
            assert got == expected, (f"{user.name}: the server refused {sorted(got - expected)} beyond the matrix "
                                     f"and allowed {sorted(expected - got)} that it denies")
        finally:
            await c.nc.close()
    assert checked == len(permissions.PROBES) * len(permissions.users(NODES))


def test_the_matrix_denies_the_attacks_of_issue_10() -> None:
    """Independent of the rendering: the answers the issue asks for, written out by hand."""
    P = permissions
    client, node, other = P.client_user(), P.node_user("n1"), P.node_user("n2")
    assert not client.may_subscribe("_INBOX.>") and not client.may_subscribe(">")
    assert not client.may_subscribe("_INBOX.vnet-admin.>") and client.may_subscribe("_INBOX.vnet-client.>")
    for subj in ("vnet.network.hostroutes.report.n1", "vnet.node.n1.resync", "vnet.evt.network.created.x",
                 "vnet.evt.endpoint.status.n1.e1", "vnet.node.n1.register", "vnet.metrics.report.ipam.i"):
        assert not client.may_publish(subj), subj
    for subj in ("vnet.policy.rule.put", "vnet.policy.rule.delete", "vnet.network.create",
                 "vnet.endpoint.create", "vnet.evt.endpoint.status.n2.e1", "vnet.node.n2.register",
                 "vnet.evt.node.left.n2", "vnet.evt.network.created.x", "$JS.API.STREAM.DELETE.VNET_EVENTS",
                 "$JS.API.CONSUMER.DELETE.VNET_EVENTS.vnet-endpoint-status-v2"):
        assert not node.may_publish(subj), subj
    assert node.may_publish("vnet.evt.endpoint.status.n1.e1") and node.may_publish("vnet.node.n1.register")
    assert not node.may_subscribe("vnet.node.n2.health") and not node.may_subscribe("vnet.evt.>")
    assert other.may_publish("vnet.evt.endpoint.status.n2.e1")
    for svc in subjects.SERVICES:
        u = P.service_user(svc)
        assert not u.may_publish("vnet.evt.endpoint.status.n1.e1"), svc
        assert not u.may_subscribe("_INBOX.>"), svc
    assert P.service_user("network").may_subscribe("vnet.network.hostroutes.report.*")
    assert node.may_publish("vnet.network.hostroutes.report.n1")
    assert not node.may_publish("vnet.network.hostroutes.report.n2")
    assert not P.service_user("ipam").may_publish("vnet.evt.network.created.x")


# --- private replies ----------------------------------------------------------------------------

async def test_nobody_reads_anothers_replies(secured: Secured) -> None:
    svc = await connect_as(secured, permissions.service_user("network"))
    admin = await connect_as(secured, permissions.admin_user())
    client = await connect_as(secured, permissions.client_user())
    try:
        async def answer(msg: Any) -> None:
            await msg.respond(b"secret-for-admin")

        await svc.nc.subscribe("vnet.network.secprobe", cb=answer)
        await nats_adapter.flush(svc.nc)
        seen: list[bytes] = []

        async def spy(msg: Any) -> None:
            seen.append(msg.data)

        for pattern in ("_INBOX.>", "_INBOX.vnet-admin.>", ">", "_INBOX.*.>"):
            await client.nc.subscribe(pattern, cb=spy)
        rep = await admin.nc.request("vnet.network.secprobe", b"{}", timeout=WAIT_S)
        assert rep.data == b"secret-for-admin" and rep.subject.startswith("_INBOX.vnet-admin.")
        got = await client.violations()
        assert got == {("sub", p.lower()) for p in ("_INBOX.>", "_INBOX.vnet-admin.>", ">", "_INBOX.*.>")}
        assert seen == []
        # The client's own request works, through its own inbox.
        rep = await client.nc.request("vnet.network.secprobe", b"{}", timeout=WAIT_S)
        assert rep.subject.startswith("_INBOX.vnet-client.")
    finally:
        for c in (svc, admin, client):
            await c.nc.close()


async def test_a_node_answers_only_the_create_forwarded_to_it_and_only_once(secured: Secured) -> None:
    """A create that waits is answered by the endpoint's node (docs/endpoints.md, "Who answers a
    create"): the endpoint service forwards its caller's reply subject with the node's copy of
    the event, and the node's ``allow_responses`` lets it publish there once. It may not
    answer again, nor answer a request nobody forwarded to it."""
    svc = await connect_as(secured, permissions.service_user("endpoint"))
    node = await connect_as(secured, permissions.node_user("n1"))
    client = await connect_as(secured, permissions.client_user())
    try:
        copies: list[Any] = []

        async def forward(msg: Any) -> None:
            await svc.nc.publish("vnet.node.n1.evt.endpoint.created.ep1", b"{}", reply=msg.reply)

        async def answer(msg: Any) -> None:
            copies.append(msg)
            await node.nc.publish(msg.reply, b"ready-from-node")

        await svc.nc.subscribe("vnet.endpoint.secprobe", cb=forward)
        await node.nc.subscribe("vnet.node.n1.evt.endpoint.>", cb=answer)
        await nats_adapter.flush(svc.nc)
        await nats_adapter.flush(node.nc)
        rep = await client.nc.request("vnet.endpoint.secprobe", b"{}", timeout=WAIT_S)
        assert rep.data == b"ready-from-node" and rep.subject.startswith("_INBOX.vnet-client.")
        assert await node.violations() == set()
        # once: a second answer on the same reply subject is refused
        await node.nc.publish(copies[0].reply, b"again")
        assert await node.violations() == {("pub", copies[0].reply.lower())}
        # and a reply subject that was never forwarded to it is refused too
        await node.nc.publish("_INBOX.vnet-client.other.1", b"forged")
        assert ("pub", "_inbox.vnet-client.other.1") in await node.violations()
    finally:
        for c in (svc, node, client):
            await c.nc.close()
