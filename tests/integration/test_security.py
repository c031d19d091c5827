"""Secure by default (issue 10), against the real nats-server and valkey-server.

The servers here run the configuration the embedded stack runs (generated from the
permission matrix, :mod:`vnet.contracts.permissions`, and written by
:mod:`vnet.runtime.credentials`): every identity of the matrix tries every probed subject
family and the server must answer exactly what the matrix says; then the attacks of the
issue are played against real services (forged status, a fake node, reading another's
replies, a node writing policy) and each must fail. The last tests start the real
``vnetctl up`` and check what another local user can reach: nothing.

(The session fixtures of tests/conftest.py run NATS and Valkey without authentication
for the other integration tests; these start their own.)
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

from vnet.adapters import nats as nats_adapter
from vnet.contracts import codec, permissions, subjects
from vnet.contracts.endpoint import EndpointStatusEvent, NodeDeregister, NodeRegister, NodeRegistered
from vnet.core import errors as E
from vnet.core.dataplane_model import Support
from vnet.runtime import credentials, servers
from vnet.runtime.config import VNetConfig

NODES = ("n1", "n2")
WAIT_S = 20.0  # generous: the machine is shared and slow at times


@dataclass
class Secured:
    dir: Path
    creds: credentials.Credentials
    nats: servers.ServerProc
    valkey: servers.ServerProc

    def cfg(self, user: permissions.User, **kw: Any) -> VNetConfig:
        """The config of ``user``: its NATS identity; Valkey credentials for services only."""
        extra: dict[str, Any] = {}
        if user.role == permissions.SERVICE and user.service:
            ru = credentials.service_redis_user(user.service)
            extra = {"redis_username": ru, "redis_password": self.creds.redis[ru]}
        return VNetConfig.load(env={}, nats_url=self.nats.url, redis_url=self.valkey.url, nats_user=user.name,
                               nats_password=self.creds.nats[user.name], metrics_http_port=0,
                               metrics_report_interval_s=0.5, **extra, **kw)


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory, run_prefix: str) -> Iterator[Secured]:
    d = tmp_path_factory.mktemp(f"{run_prefix}-secured")
    creds = credentials.ensure(d, NODES)
    nconf = credentials.write_nats_conf(d, creds, NODES)
    vconf = credentials.write_valkey_conf(d, creds)
    n = servers.start_nats(d / "nats", config_file=nconf)
    try:
        v = servers.start_valkey(d / "valkey", config_file=vconf)
    except BaseException:
        n.stop()
        raise
    try:
        yield Secured(d, creds, n, v)
    finally:
        v.stop()
        n.stop()


class Conn:
    """A raw connection as one identity that records the permission violations reported."""

    def __init__(self, nc: Client, errors: list[str]) -> None:
        self.nc = nc
        self.errors = errors

    async def violations(self) -> set[tuple[str, str]]:
        # The server reports a violation before it answers the PING that follows, and
        # nats-py runs the error callback inline in its reader: after the flush, all are in.
        await nats_adapter.flush(self.nc)
        out = set()
        for e in self.errors:
            m = re.search(r"permissions violation for (publish|subscription) to \"([^\"]+)\"", e, re.I)
            if m:
                out.add(("pub" if m.group(1).lower() == "publish" else "sub", m.group(2).lower()))
        return out


async def connect_as(s: Secured, user: permissions.User | None, *, password: str | None = None) -> Conn:
    errors: list[str] = []

    async def on_error(e: Exception) -> None:
        errors.append(str(e))

    kw: dict[str, Any] = {}
    if user is not None:
        kw = {"user": user.name, "password": password or s.creds.nats[user.name],
              "inbox_prefix": user.inbox_prefix}
    nc = await nats.connect(s.nats.url, error_cb=on_error, allow_reconnect=False, connect_timeout=5, **kw)
    return Conn(nc, errors)


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


# --- attacks against the real services -------------------------------------------------------------

@pytest.fixture
async def services(secured: Secured) -> AsyncIterator[Secured]:
    from vnet.runtime import launcher
    from vnet.runtime import service as svc_runtime

    r = aioredis.Redis.from_url(secured.valkey.url, username=credentials.service_redis_user("ipam"),
                                password=secured.creds.redis[credentials.service_redis_user("ipam")])
    started = []
    try:
        for name in ("ipam", "network", "endpoint", "policy"):
            started.append(await svc_runtime.start(launcher.load_service(name),
                                                   secured.cfg(permissions.service_user(name))))
        yield secured
    finally:
        for rt in reversed(started):
            await rt.stop(drain_timeout=2.0)
        keys = [k async for k in r.scan_iter("vnet:*")]
        if keys:
            await r.delete(*keys)
        await r.aclose()


async def _register(c: Conn, node: str, body_node: str | None = None) -> NodeRegistered:
    req = NodeRegister(node=body_node or node, instance=f"i-{node}", heartbeat_s=60.0,
                       drivers={"bridge": Support(available=True)})
    rep, _ = await nats_adapter.request(c.nc, subjects.NODE_REGISTER, req, NodeRegistered, params={"node": node},
                                        timeout=WAIT_S)
    return rep


async def _status(c: Conn, node: str, ep: str, body_node: str, status: str, reason: str, version: int) -> None:
    ev = EndpointStatusEvent(endpoint_id=ep, node=body_node, status=status,  # type: ignore[arg-type]
                             reason=reason, version=version)
    subj = subjects.EVT_ENDPOINT_STATUS.format(node=node, id=ep)
    ack = await c.nc.request(subj, codec.encode(ev), timeout=WAIT_S,
                             headers={"Nats-Msg-Id": f"{node}.{ep}.{version}.{reason}"})
    assert b"error" not in ack.data, ack.data  # stored in VNET_EVENTS


async def _poll(what: str, check: Any) -> Any:
    deadline = time.monotonic() + WAIT_S
    while True:
        got = await check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {WAIT_S}s")
        await asyncio.sleep(0.1)


async def test_forged_status_and_fake_nodes_are_rejected(services: Secured, run_prefix: str) -> None:
    """Node n1 owns the endpoint; n2 (a registered node too) and a client try to change its
    status and to speak for n1. None of it takes effect; n1's own report does."""
    from vnet.client import VNetManager

    s = services
    n1 = await connect_as(s, permissions.node_user("n1"))
    n2 = await connect_as(s, permissions.node_user("n2"))
    client = await connect_as(s, permissions.client_user())
    m = VNetManager(s.cfg(permissions.admin_user()))
    try:
        assert (await _register(n1, "n1")).node == "n1"
        assert (await _register(n2, "n2")).node == "n2"
        net = await m.create_network(f"{run_prefix}-sec", "10.231.0.0/24")
        ep = await m.create_endpoint(f"{run_prefix}-c1", net.id, node="n1", netns=f"{run_prefix}-c1")
        v0 = time.time_ns() // 1000
        await _status(n1, "n1", ep.id, "n1", "ready", "", v0)

        async def ready() -> bool:
            return (await m.get_endpoint(ep.id)).status == "ready"

        await _poll("n1's ready report applied", ready)

        # Forgeries carry a far-future version: had one been applied, n1's later report
        # (a smaller version) would be stale and the record would keep the forger's text.
        future = v0 + 10**12
        # n2 on n1's subject: the bus refuses it.
        await n2.nc.publish(subjects.EVT_ENDPOINT_STATUS.format(node="n1", id=ep.id), codec.encode(
            EndpointStatusEvent(endpoint_id=ep.id, node="n1", status="failed", reason="forged-1", version=future)))
        # n2 on its own subject claiming to be n1: the endpoint service drops it.
        await _status(n2, "n2", ep.id, "n1", "failed", "forged-2", future + 1)
        # n2 as itself: the endpoint does not live on n2.
        await _status(n2, "n2", ep.id, "n2", "failed", "forged-3", future + 2)
        # A client may publish no event at all.
        await client.nc.publish(subjects.EVT_ENDPOINT_STATUS.format(node="n1", id=ep.id), codec.encode(
            EndpointStatusEvent(endpoint_id=ep.id, node="n1", status="failed", reason="forged-4", version=future)))
        # n1's own next report comes after all of them in the stream, and must be applied.
        await _status(n1, "n1", ep.id, "n1", "failed", "marker-from-n1", v0 + 1)

        async def marker() -> Any:
            info = await m.get_endpoint(ep.id)
            return info if info.reason == "marker-from-n1" else None

        info = await _poll("n1's marker report applied (so the forgeries before it were handled)", marker)
        assert info.status == "failed" and "forged" not in info.reason
        assert await n2.violations() == {("pub", subjects.EVT_ENDPOINT_STATUS.format(node="n1", id=ep.id).lower())}
        assert await client.violations() == {
            ("pub", subjects.EVT_ENDPOINT_STATUS.format(node="n1", id=ep.id).lower())}

        # A fake node: n2 registering as n1 on its own subject is refused; on n1's, the bus refuses.
        with pytest.raises(E.VNetError) as ei:
            await _register(n2, "n2", body_node="n1")
        assert ei.value.code == "invalid_request" and "own subject" in ei.value.message
        await n2.nc.publish(subjects.NODE_REGISTER.format(node="n1"), b"{}")
        await client.nc.publish(subjects.NODE_REGISTER.format(node="n3"), b"{}")
        assert ("pub", "vnet.node.n1.register") in await n2.violations()
        assert ("pub", "vnet.node.n3.register") in await client.violations()
        assert {n.node for n in await m.nodes()} == {"n1", "n2"}
        # Host routes: n2 may report only its own (the network service checks the body).
        from vnet.contracts.network import HostRoutesReply, HostRoutesReport

        rep, _ = await nats_adapter.request(n2.nc, subjects.NETWORK_HOSTROUTES_REPORT,
                                            HostRoutesReport(node="n2", prefixes=["10.233.0.0/24"], interval_s=60.0),
                                            HostRoutesReply, params={"node": "n2"}, timeout=WAIT_S)
        assert rep.accepted == 1
        with pytest.raises(E.VNetError) as ei:
            await nats_adapter.request(n2.nc, subjects.NETWORK_HOSTROUTES_REPORT,
                                       HostRoutesReport(node="n1", prefixes=["10.234.0.0/24"], interval_s=60.0),
                                       HostRoutesReply, params={"node": "n2"}, timeout=WAIT_S)
        assert ei.value.code == "invalid_request"
        await n2.nc.publish(subjects.NETWORK_HOSTROUTES_REPORT.format(node="n1"), b"{}")
        assert ("pub", "vnet.network.hostroutes.report.n1") in await n2.violations()
        # n2 deregistering n1 is ignored; its own deregistration (after it, same subscription) is not.
        await n2.nc.publish(subjects.NODE_DEREGISTER.format(node="n2"),
                            codec.encode(NodeDeregister(node="n1", instance="i-n1")))
        await n2.nc.publish(subjects.NODE_DEREGISTER.format(node="n2"),
                            codec.encode(NodeDeregister(node="n2", instance="i-n2")))

        async def n2_gone() -> bool:
            return "n2" not in {n.node for n in await m.nodes()}

        await _poll("n2's own deregistration", n2_gone)
        assert "n1" in {n.node for n in await m.nodes()}

        # A node cannot write policy, create or delete networks or endpoints.
        for subj in (subjects.POLICY_RULE_PUT, subjects.POLICY_RULE_DELETE, subjects.NETWORK_DELETE,
                     subjects.ENDPOINT_DELETE):
            await n1.nc.publish(subj.template, b"{}")
        got = await n1.violations()
        assert {x for _, x in got} >= {s.template for s in (subjects.POLICY_RULE_PUT, subjects.POLICY_RULE_DELETE,
                                                            subjects.NETWORK_DELETE, subjects.ENDPOINT_DELETE)}
        await m.delete_endpoint(ep.id)
        await m.delete_network(net.id)
    finally:
        await m.close()
        for c in (n1, n2, client):
            await c.nc.close()


# --- the embedded stack: files, credentials, another local user ------------------------------------

VNETCTL = str(Path(sys.executable).parent / "vnetctl")
NOBODY = 65534


def _env(state_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VNET_") or k == "VNET_RUN_PREFIX"}
    env["VNET_STATE_DIR"] = str(state_dir)
    return env


def _modes(root: Path) -> dict[str, int]:
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for p in root.rglob("*"):
        if not p.is_symlink():
            out[str(p.relative_to(root))] = stat.S_IMODE(p.stat().st_mode)
    return out


# Run by /usr/bin/python3 as a throwaway uid: the venv's interpreter lives under /root (0700).
_OTHER_USER = r"""
import json, os, socket, sys
state, nport, rport = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = {"uid": os.getuid()}
def attempt(name, fn):
    try:
        out[name] = "ok: " + str(fn())[:80]
    except Exception as e:
        out[name] = "refused: " + type(e).__name__
attempt("list", lambda: os.listdir(state))
attempt("creds", lambda: open(os.path.join(state, "credentials.json")).read())
attempt("stack", lambda: open(os.path.join(state, "stack.json")).read())
def nats_talk():
    s = socket.create_connection(("127.0.0.1", nport), timeout=5)
    s.recv(4096)  # INFO
    s.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\nPING\r\n')
    return s.recv(4096).decode(errors="replace").strip()
def valkey_talk():
    s = socket.create_connection(("127.0.0.1", rport), timeout=5)
    s.sendall(b"PING\r\n")
    return s.recv(4096).decode(errors="replace").strip()
attempt("nats", nats_talk)
attempt("valkey", valkey_talk)
print(json.dumps(out))
"""


@pytest.mark.stack
@pytest.mark.timeout(180)
def test_embedded_stack_is_private_and_authenticated(tmp_path: Path, run_prefix: str) -> None:
    state = tmp_path / f"{run_prefix}-secstack"
    # As an older version left it: world-readable directory and files.
    (state / "logs").mkdir(parents=True)
    state.chmod(0o755)
    (state / "logs" / "old.log").write_text("old\n")
    (state / "logs" / "old.log").chmod(0o644)
    env = _env(state)
    up = subprocess.run([VNETCTL, "up", "--detach", "--state-dir", str(state), "--stop-timeout", "5"], env=env,
                        capture_output=True, text=True, timeout=120, check=False)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        st = json.loads((state / "stack.json").read_text())
        assert st["auth"] is True
        # 0700 directories, 0600 files, everything (data, logs, configs, stack.json).
        modes = _modes(state)
        for name in ("credentials.json", "nats.conf", "valkey.conf", "stack.json", "logs/nats-server.log",
                     "logs/old.log"):
            assert modes.get(name) == 0o600, (name, oct(modes.get(name, 0)))
        wrong = {k: oct(v) for k, v in modes.items() if v & 0o077}
        assert not wrong, f"readable by others: {wrong}"
        assert modes["."] == 0o700
        # Passwords are on no command line (every local user can read /proc/<pid>/cmdline).
        creds = json.loads((state / "credentials.json").read_text())
        secrets = [*creds["nats"].values(), *creds["redis"].values()]
        for name, p in st["processes"].items():
            cmd = Path(f"/proc/{p['pid']}/cmdline").read_bytes().decode(errors="replace")
            assert not any(pw in cmd for pw in secrets), f"{name} has a password on its command line"
        # Each process has its own identity; the node worker has no Valkey credentials.
        def environ(pid: int) -> dict[str, str]:
            raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            return dict(x.decode().split("=", 1) for x in raw if b"=" in x)

        node_env = environ(st["processes"]["node"]["pid"])
        assert node_env["VNET_NATS_USER"] == f"vnet-node-{st['node_id']}"
        assert "VNET_REDIS_PASSWORD" not in node_env and "VNET_REDIS_USERNAME" not in node_env
        ipam_env = environ(st["processes"]["ipam"]["pid"])
        assert ipam_env["VNET_NATS_USER"] == "vnet-svc-ipam" and ipam_env["VNET_REDIS_USERNAME"] == "vnet-svc-ipam"
        # The owner's vnetctl finds the credentials by itself.
        status = subprocess.run([VNETCTL, "status"], env=env, capture_output=True, text=True, timeout=60,
                                check=False)
        assert status.returncode == 0 and "node" in status.stdout, status.stdout + status.stderr
        # Another local user gets nothing: no listing, no file, no NATS, no Valkey.
        other = subprocess.run(["/usr/bin/python3", "-c", _OTHER_USER, str(state), str(st["nats_port"]),
                                str(st["redis_port"])], user=NOBODY, group=NOBODY, capture_output=True, text=True,
                               timeout=60, check=False, cwd="/", env={"PATH": "/usr/bin:/bin"})
        assert other.returncode == 0, other.stderr
        seen = json.loads(other.stdout)
        assert seen["uid"] == NOBODY
        for k in ("list", "creds", "stack"):
            assert seen[k] == "refused: PermissionError", seen
        assert "Authorization Violation" in seen["nats"], seen
        assert "NOAUTH" in seen["valkey"], seen
    finally:
        down = subprocess.run([VNETCTL, "down", "--state-dir", str(state)], env=env, capture_output=True, text=True,
                              timeout=60, check=False)
        assert down.returncode == 0, down.stdout + down.stderr


def test_rotating_credentials_makes_new_ones(tmp_path: Path) -> None:
    first = credentials.ensure(tmp_path, ["n1"])
    assert credentials.ensure(tmp_path, ["n1"]) == first  # kept across restarts
    more = credentials.ensure(tmp_path, ["n1", "n2"])  # a new node id gets its own
    assert "vnet-node-n2" in more.nats and more.nats["vnet-admin"] == first.nats["vnet-admin"]
    assert credentials.rotate(tmp_path)
    again = credentials.ensure(tmp_path, ["n1"])
    assert set(again.nats) == set(first.nats)
    assert all(again.nats[u] != first.nats[u] for u in first.nats)
    assert stat.S_IMODE((tmp_path / credentials.CREDENTIALS_FILE).stat().st_mode) == 0o600


def test_identities_of_the_stack(tmp_path: Path) -> None:
    from vnet.runtime.stack import _Identities

    creds = credentials.ensure(tmp_path, ["h1"])
    ids = _Identities(VNetConfig.load(env={}, redis_password="leak"), creds, creds)
    node = ids.node("h1")
    assert node.nats_user == "vnet-node-h1" and node.redis_password is None and node.redis_username is None
    svc = ids.service("policy")
    assert svc.nats_user == "vnet-svc-policy" and svc.redis_username == "vnet-svc-policy"
    assert svc.redis_password == creds.redis["vnet-svc-policy"] != creds.nats["vnet-svc-policy"]
    assert ids.admin().nats_user == "vnet-admin"
    # An existing NATS the stack does not manage: the user's own settings stand.
    plain = _Identities(VNetConfig.load(env={}, nats_user="mine"), None, None)
    assert plain.node("h1").nats_user == "mine"
    assert msgspec.structs.asdict(plain.admin())["nats_user"] == "mine"


# --- TLS: a node worker on another machine ----------------------------------------------------------

@pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command is not installed")
async def test_node_worker_connects_over_tls_and_is_refused_without_it(tmp_path: Path) -> None:
    """NATS with the stack's TLS (its own CA): the real node worker connects with the CA and
    its node credentials; without the CA it cannot (the certificate is not trusted), and a
    plain-text client is refused by the server."""
    from vnet.client import VNetManager
    from vnet.runtime import launcher, tls
    from vnet.runtime import service as svc_runtime

    creds = credentials.ensure(tmp_path, ["tn1"])
    block = tls.nats_tls_block(tmp_path)
    conf = credentials.write_nats_conf(tmp_path, creds, ["tn1"], tls=block)
    assert "tls {" in conf.read_text()
    srv = servers.start_nats(tmp_path / "nats", config_file=conf)
    try:
        def cfg(user: permissions.User, **kw: Any) -> VNetConfig:
            return VNetConfig.load(env={}, nats_url=srv.url, nats_user=user.name,
                                   nats_password=creds.nats[user.name], connect_timeout_s=5.0, **kw)

        node = permissions.node_user("tn1")
        rt = await svc_runtime.start(launcher.load_service("node"), cfg(node, nats_tls_ca=block["ca_file"]),
                                     params={"node": "tn1"})
        try:
            async with VNetManager(cfg(permissions.admin_user(), nats_tls_ca=block["ca_file"])) as m:
                # It answers over TLS (degraded: no endpoint service here to register with).
                assert (await m.health("node", node="tn1")).status in ("ok", "degraded")
        finally:
            await rt.stop(drain_timeout=2.0)
        with pytest.raises(E.VNetError) as ei:  # no CA: the server's certificate is not trusted
            await svc_runtime.start(launcher.load_service("node"), cfg(node), params={"node": "tn1"})
        assert ei.value.code == "unavailable" and "certificate" in ei.value.message.lower()
        # Plain text, right credentials: the server wants TLS first.
        import socket as _socket

        with _socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            info = s.recv(4096)
            assert b'"tls_required":true' in info
            s.sendall(b'CONNECT {"verbose":false,"user":"vnet-node-tn1","pass":"%s"}\r\nPING\r\n'
                      % creds.nats["vnet-node-tn1"].encode())
            assert b"PONG" not in s.recv(4096)
    finally:
        srv.stop()


@pytest.mark.stack
@pytest.mark.timeout(180)
@pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command is not installed")
def test_embedded_stack_with_tls(tmp_path: Path, run_prefix: str) -> None:
    """``VNET_STACK_TLS=true vnetctl up``: NATS wants TLS with the stack's own CA; every process
    of the stack and the owner's vnetctl use it by themselves; the CA key stays 0600."""
    state = tmp_path / f"{run_prefix}-tlsstack"
    env = {**_env(state), "VNET_STACK_TLS": "true"}
    up = subprocess.run([VNETCTL, "up", "--detach", "--state-dir", str(state), "--stop-timeout", "5"], env=env,
                        capture_output=True, text=True, timeout=120, check=False)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        st = json.loads((state / "stack.json").read_text())
        assert st["nats_tls_ca"] == str(state / "tls" / "ca.pem") and "TLS" in up.stdout
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in (state / "tls").iterdir())
        status = subprocess.run([VNETCTL, "status"], env=_env(state), capture_output=True, text=True, timeout=60,
                                check=False)
        assert status.returncode == 0 and "node" in status.stdout, status.stdout + status.stderr
        assert "Violation" not in (state / "logs" / "nats-server.log").read_text()
    finally:
        down = subprocess.run([VNETCTL, "down", "--state-dir", str(state)], env=_env(state), capture_output=True,
                              text=True, timeout=60, check=False)
        assert down.returncode == 0, down.stdout + down.stderr


# --- bad input on this path --------------------------------------------------------------------------

async def test_bad_input_answers_400_not_500(services: Secured, run_prefix: str) -> None:
    """A NUL byte in a namespace name, an IPv6 zone id in a CIDR, gateway or address."""
    from vnet.client import VNetManager

    n1 = await connect_as(services, permissions.node_user("n1"))
    m = VNetManager(services.cfg(permissions.admin_user()))
    try:
        await _register(n1, "n1")
        for kw in ({"cidr": "fd00::%eth0/64"}, {"cidr": "10.232.0.0/24", "cidr_v6": "fd00:232::%lo/64"}):
            with pytest.raises(E.VNetError) as ei:
                await m.create_network(f"{run_prefix}-bad", **kw)  # type: ignore[arg-type]
            assert (ei.value.status, ei.value.code) == (400, "invalid_cidr"), ei.value
        net = await m.create_network(f"{run_prefix}-bad6", "10.232.0.0/24", ipv6=True, cidr_v6="fd00:232::/64")
        for kw2 in ({"netns": "web\x00x"}, {"netns": "/run/netns/a\x00b"}, {"netns": "a\nb"}):
            with pytest.raises(E.VNetError) as ei:
                await m.create_endpoint(f"{run_prefix}-bad-c", net.id, node="n1", **kw2)
            assert (ei.value.status, ei.value.code) == (400, "invalid_netns"), ei.value
        with pytest.raises(E.VNetError) as ei:
            await m.create_endpoint(f"{run_prefix}-bad-c", net.id, node="n1", netns=f"{run_prefix}-bad-c",
                                    ipv6="fd00:232::5%eth0")
        assert ei.value.status == 400, ei.value
        await m.delete_network(net.id)
    finally:
        await m.close()
        await n1.nc.close()
