"""Is the stack up? Health and discovery probes over the bus while the stack starts.

The supervisor asks every component's health subject and, on a NATS it does not own,
looks for new instances of its own on ``$SRV.STATS``. It speaks to the bus through the
NATS adapter and the wire contract, not through the Python client (``vnet.client`` is a
layer above the runtime: the import-linter contracts in pyproject.toml keep it so).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import msgspec
from nats.aio.client import Client

from vnet.adapters import nats as nats_adapter
from vnet.contracts import subjects
from vnet.contracts.messages import Empty, HealthReply
from vnet.core.errors import VNetError
from vnet.runtime.config import VNetConfig
from vnet.runtime.stack.layout import COMPONENTS, NATS, NODE, Child
from vnet.runtime.stackfile import StackError, tail

SUPERVISOR_CLIENT = "vnet-supervisor"


async def _health(nc: Client, config: VNetConfig, name: str, node_id: str) -> HealthReply:
    if name == NODE:
        rep, _ = await nats_adapter.request(nc, subjects.NODE_HEALTH, Empty(), HealthReply, params={"node": node_id},
                                            timeout=config.request_timeout_s)
    else:
        rep, _ = await nats_adapter.request(nc, subjects.health(name), Empty(), HealthReply,
                                            timeout=config.request_timeout_s)
    return rep


async def _discover(nc: Client) -> list[tuple[str, str, dict[str, str]]]:
    """(service name, instance id, metadata) of every VNet instance on the bus."""
    out = []
    for r in await nats_adapter.discover(nc, wait=0.3):
        name = str(r.get("name", ""))
        if name.startswith("vnet-"):
            meta = {str(k): str(v) for k, v in (r.get("metadata") or {}).items()}
            out.append((name.removeprefix("vnet-"), str(r.get("id", "")), meta))
    return out


async def instances(config: VNetConfig) -> set[str]:
    """Ids of the VNet service instances on the bus now (only asked of an existing NATS)."""
    try:
        nc = await nats_adapter.connect(config, SUPERVISOR_CLIENT)
    except VNetError as err:
        raise StackError(err.message) from None
    try:
        return {iid for _, iid, _ in await _discover(nc)}
    finally:
        await nc.drain()


async def wait_ready(config: VNetConfig, *, node_id: str, before: set[str] | None, timeout: float,
                     stop: asyncio.Event, children: Mapping[str, Child], nats_url: str, redis_url: str,
                     logs_dir: Path) -> dict[str, str]:
    """Poll health of every component until all answer; returns those not "ok" and why.

    On an existing NATS (``before`` holds the instances already there) a replica of
    another stack may answer a service's health, so each component must also show a
    new instance of its own before it counts.
    """
    cfg = msgspec.structs.replace(config, request_timeout_s=1.0)
    pending = set(COMPONENTS)
    unseen = set(COMPONENTS) if before is not None else set()
    last: dict[str, str] = {}
    degraded: dict[str, str] = {}
    deadline = time.monotonic() + timeout

    async def probe(nc: Client, name: str) -> None:
        try:
            rep = await _health(nc, cfg, name, node_id)
        except VNetError as err:
            # The adapter's own hint ("is the stack up?") would mislead here.
            last[name] = {"unavailable": "nothing answers its health yet",
                          "timeout": "its health request timed out"}.get(err.code, err.message)
            return
        pending.discard(name)
        if rep.status != "ok":
            degraded[name] = ", ".join(f"{k}: {v}" for k, v in rep.checks.items() if v != "ok")

    async def look(nc: Client) -> None:
        for name, iid, meta in await _discover(nc):
            if before is not None and iid in before:
                continue
            if name == NODE and meta.get("vnet.node") != node_id:
                continue
            unseen.discard(name)
        for name in unseen:
            last[name] = "answers health, but no new instance of this stack's own is on the bus yet"

    try:
        nc = await nats_adapter.connect(cfg, SUPERVISOR_CLIENT)
    except VNetError as err:  # connecting to NATS itself failed
        raise StackError(f"{err.message} (log: {logs_dir / (NATS + '.log')})") from None
    try:
        while not stop.is_set():
            if pending:
                await asyncio.gather(*(probe(nc, n) for n in sorted(pending)))
            if not pending and unseen:
                await look(nc)
            if not pending and not unseen:
                break
            if time.monotonic() > deadline:
                raise StackError(not_ready_message(pending | unseen, last, children=children, timeout=timeout,
                                                   nats_url=nats_url, redis_url=redis_url))
            await asyncio.sleep(0.2)
    finally:
        await nc.drain()
    return degraded


def not_ready_message(pending: Iterable[str], last: Mapping[str, str], *, children: Mapping[str, Child],
                      timeout: float, nats_url: str, redis_url: str) -> str:
    lines = [f"not ready within {timeout:.0f}s: {', '.join(sorted(pending))} did not answer "
             "health; everything is being stopped"]
    for name in sorted(pending):
        child = children[name]
        lines.append(f"- {name}: {last.get(name, 'no answer')} (restarts: {child.restarts}; "
                     f"log {child.spec.log})")
        t = tail(child.spec.log, 8)
        if "\n" not in t:
            lines.append("    (nothing logged since it started: stuck connecting to NATS or Redis?)")
        else:
            lines.extend("    " + ln for ln in t.splitlines())
    lines.append(f"NATS is {nats_url}, Redis is {redis_url}; raise the limit with "
                 "--ready-timeout if this machine is just slow")
    return "\n".join(lines)
