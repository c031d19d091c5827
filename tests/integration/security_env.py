"""What the ``test_security_*.py`` modules share: the ``secured`` fixture (a nats-server and a
valkey-server running the configuration the embedded stack runs, generated from the
permission matrix, :mod:`vnet.contracts.permissions`, and written by
:mod:`vnet.runtime.credentials`; module-scoped: one pair per test module) and a raw NATS
connection as one identity that records the permission violations the server reports.

(The session fixtures of tests/conftest.py run NATS and Valkey with one test identity each for the
other integration tests; these start their own.)
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client

from vnet.adapters import nats as nats_adapter
from vnet.contracts import permissions
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
