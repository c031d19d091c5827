"""``vnetctl`` entry point: one click group, verbs grouped by resource."""

from __future__ import annotations

import asyncio
import datetime as dt
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click
import msgspec
from rich.console import Console
from rich.table import Table

from vnet.client import VNetManager
from vnet.contracts import subjects
from vnet.core.errors import VNetError
from vnet.runtime.config import VNetConfig

T = TypeVar("T")
console = Console()
err_console = Console(stderr=True)


def run_async(fn: Callable[[VNetManager], Awaitable[T]], config: VNetConfig) -> T:
    async def go() -> T:
        async with VNetManager(config) as m:
            return await fn(m)

    try:
        return asyncio.run(go())
    except VNetError as err:
        err_console.print(f"[red]error[/red]: {err.message} [dim]({err.code})[/dim]")
        if err.trace_id:
            err_console.print(f"[dim]trace id: {err.trace_id}[/dim]")
        sys.exit(1)


def print_json(obj: Any) -> None:
    click.echo(msgspec.json.format(msgspec.json.encode(obj)).decode())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Config file (TOML/YAML/JSON); default $VNET_CONFIG.")
@click.option("--nats", "nats_url", default=None, help="NATS URL (default $VNET_NATS_URL or the running local stack).")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, nats_url: str | None) -> None:
    """VNet: isolated networks for containers."""
    ctx.ensure_object(dict)
    ctx.obj["config_path"] = config_path
    ctx.obj["nats_url"] = nats_url


def load_config(ctx: click.Context) -> VNetConfig:
    from vnet.runtime import stack

    overrides: dict[str, Any] = {}
    if ctx.obj.get("nats_url"):
        overrides["nats_url"] = ctx.obj["nats_url"]
    try:
        cfg = VNetConfig.load(ctx.obj.get("config_path"), **overrides)
    except VNetError as err:
        err_console.print(f"[red]error[/red]: {err.message}")
        sys.exit(2)
    return stack.apply_running_stack(cfg, explicit_nats=bool(overrides))


def _uptime(started: str) -> str:
    try:
        t = dt.datetime.fromisoformat(started.replace("Z", "+00:00"))
    except ValueError:
        return "?"
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    s = int((dt.datetime.now(dt.UTC) - t).total_seconds())
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Every running VNet service: instances, version, uptime, requests and errors."""
    cfg = load_config(ctx)
    rows = run_async(lambda m: m.services(), cfg)
    if as_json:
        print_json(rows)
        return
    table = Table(title=f"VNet services on {cfg.nats_url}")
    for col in ("service", "node", "instance", "version", "uptime", "requests", "errors"):
        table.add_column(col, justify="right" if col in ("requests", "errors") else "left")
    seen = set()
    for r in rows:
        seen.add(r.name)
        table.add_row(r.name, r.metadata.get("vnet.node", ""), r.id, r.version, _uptime(r.started),
                      str(r.requests), str(r.errors))
    missing = [s for s in (*subjects.SERVICES, subjects.NODE_SERVICE) if s not in seen]
    for s in missing:
        table.add_row(f"[red]{s}[/red]", "", "[red]not running[/red]", "", "", "", "")
    console.print(table)
    if missing:
        sys.exit(3)


@cli.command()
@click.argument("service", type=click.Choice([*subjects.SERVICES, subjects.NODE_SERVICE]))
@click.option("--node", default=None, help="Node id (for the node worker).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def health(ctx: click.Context, service: str, node: str | None, as_json: bool) -> None:
    """Ask one service (or a node worker) for its health."""
    cfg = load_config(ctx)
    rep = run_async(lambda m: m.health(service, node=node), cfg)
    if as_json:
        print_json(rep)
        sys.exit(0 if rep.status == "ok" else 4)
    color = "green" if rep.status == "ok" else "yellow"
    console.print(f"{rep.service} [{color}]{rep.status}[/{color}] instance {rep.instance} "
                  f"v{rep.version} up {rep.uptime_s:.0f}s")
    for k, v in rep.checks.items():
        console.print(f"  {k}: {v}")
    if rep.status != "ok":
        # Healthchecks (compose, supervisors) read the exit code: degraded is not healthy.
        sys.exit(4)


def main() -> None:
    # Each module registers its verbs on `cli` when imported.
    from vnet.cli import container, demo, endpoint, ipam, network, policy, stack  # noqa: F401

    cli(obj={})


if __name__ == "__main__":
    main()
