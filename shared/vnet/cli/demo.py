"""``vnetctl demo``: the main job end to end against the running stack."""

from __future__ import annotations

import asyncio
import sys

import click

from vnet.cli.main import cli, err_console, load_config
from vnet.core.errors import VNetError


@cli.command()
@click.option("--keep", is_flag=True, help="Leave the networks, endpoints and namespaces for a look around.")
@click.pass_context
def demo(ctx: click.Context, keep: bool) -> None:
    """Two networks, three containers, who reaches whom and why explain says so."""
    from vnet.runtime.demo import run_demo

    cfg = load_config(ctx)
    try:
        code = asyncio.run(run_demo(cfg, say=click.echo, keep=keep))
    except VNetError as err:
        err_console.print(f"[red]error[/red]: {err.message} [dim]({err.code})[/dim]")
        sys.exit(1)
    sys.exit(code)
