"""``vnetctl`` driven through click's CliRunner against a real control plane: nats-server and
valkey from the session fixtures, the five services and a node worker in this process.

The CLI runs each request with ``asyncio.run`` in its own thread (as in a real process),
while the services keep serving on the test's event loop. CliRunner's stdout is not a
terminal, so every table comes out in the piped (tab-separated) form.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from tests.conftest import control_plane
from vnet.cli import main as cli_main
from vnet.client import VNetManager
from vnet.runtime.config import VNetConfig
from vnet.runtime.service import Runtime

cli_main.register()


@dataclass
class Ctl:
    """``await ctl("network", "ls")`` runs ``vnetctl --nats URL network ls``."""

    cfg: VNetConfig
    m: VNetManager
    node: str
    netns: Callable[[str], str]
    state_dir: Path
    run_prefix: str
    start: Callable[..., Awaitable[Runtime]]
    made_netns: list[str]

    async def __call__(self, *args: str, nats: bool = True) -> Result:
        argv = (["--nats", self.cfg.nats_url] if nats else []) + list(args)
        # Only one CliRunner at a time: it swaps sys.stdout/stderr process-wide.
        return await asyncio.to_thread(CliRunner().invoke, cli_main.cli, argv,
                                       env={"VNET_STATE_DIR": str(self.state_dir), "COLUMNS": "80"},
                                       catch_exceptions=False)

    async def ok(self, *args: str) -> Result:
        r = await self(*args)
        assert r.exit_code == 0, (args, r.output)
        return r

    async def json(self, *args: str, code: int = 0) -> Any:
        """``--json`` output parsed; stdout must be exactly one JSON document."""
        r = await self(*args, "--json")
        assert r.exit_code == code, (args, r.exit_code, r.output)
        return json.loads(r.stdout)

    async def error(self, *args: str, code: int = 1) -> dict[str, Any]:
        """The ``{"error": {...}}`` document of a failing ``--json`` command."""
        doc = await self.json(*args, code=code)
        assert set(doc) == {"error"}, doc
        assert set(doc["error"]) == {"code", "message", "details", "trace_id"}, doc
        err: dict[str, Any] = doc["error"]
        return err


@pytest.fixture
def made_netns() -> Iterator[list[str]]:
    """Namespaces a test has `vnetctl container create` make: deleted at teardown, pass or fail."""
    made: list[str] = []
    yield made
    for ns in made:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


@pytest.fixture
async def ctl(netns: Callable[[str], str], made_netns: list[str], start_service: Callable[..., Awaitable[Runtime]],
              config: VNetConfig, run_prefix: str, tmp_path: Path) -> AsyncIterator[Ctl]:
    async with control_plane(config, start_service, netns, host="clih", node=f"{run_prefix}-cli",
                             resync_s=2, services=("ipam", "network", "endpoint", "policy", "metrics")) as cp:
        yield Ctl(cp.cfg, cp.m, cp.node, netns, tmp_path / "state", run_prefix, start_service, made_netns)
