"""``vnetctl demo``: the main job end to end against the running stack."""

from __future__ import annotations

import asyncio
import sys

import click

from vnet.cli import output
from vnet.cli.main import cli, load_config
from vnet.core.errors import VNetError


@cli.command()
@click.option("--keep", is_flag=True, help="Leave the networks, endpoints and namespaces for a look around.")
@click.option("--json", "as_json", is_flag=True,
              help='Print {"ok": bool, "exit_code": n, "lines": [...]} (the narration) at the end.')
@click.pass_context
def demo(ctx: click.Context, keep: bool, as_json: bool) -> None:
    """Two networks, three containers, who reaches whom and why explain says so."""
    from vnet.demo import run_demo

    cfg = load_config(ctx)
    lines: list[str] = []
    try:
        code = asyncio.run(run_demo(cfg, say=lines.append if as_json else click.echo, keep=keep))
    except VNetError as err:
        output.fail_with(err)
    if as_json:
        output.emit({"ok": code == 0, "exit_code": code, "lines": lines})
    sys.exit(code)
