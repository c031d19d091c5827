"""``vnetctl node drift NODE``: what the node worker repaired after the kernel told it
something of ours changed — when, what, how long the repair took, and which process made
the change when the kernel names it (docs/operations.md, "Drift").

::

    vnetctl node drift node1                 # newest first, the last 20
    vnetctl node drift node1 --limit 200 --json
"""

from __future__ import annotations

import datetime as dt

import click

from vnet.cli import output
from vnet.cli.main import cli, console, escape, load_config, run_async, styled
from vnet.contracts.node import DriftRecord, DriftReply


def node_group() -> click.Group:
    """The ``node`` group (made here when no other module made it first)."""
    g = cli.commands.get("node")
    if isinstance(g, click.Group):
        return g

    @cli.group("node")
    def node() -> None:
        """Node workers: the drift they repaired."""

    return node


def who(r: DriftRecord) -> str:
    s = r.sender
    if s.pid:
        cmd = s.cmdline or s.comm or "?"
        return f"pid {s.pid} ({cmd})"
    if s.port:
        return f"netlink port {s.port} (process gone)" + (f" {s.comm}" if s.comm else "")
    return "unknown (the kernel does not say)"


def render(rep: DriftReply) -> None:
    if not rep.watching:
        output.warn(f"node {rep.node} does not follow kernel notifications ({rep.reason or 'unknown reason'}): "
                    "drift is repaired by its periodic resync only")
    rows = []
    for r in rep.records:
        when = dt.datetime.fromtimestamp(r.at).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        state = styled(f"{r.repaired_s * 1000:.0f} ms", "green") if r.repaired else styled("failed", "red")
        rows.append((when, r.kind, escape(r.target), escape(r.owner), escape(r.detail if not r.error else
                                                                              f"{r.detail}: {r.error}"),
                     escape(who(r)), state, str(r.writes)))
    output.table(("when", "kind", "target", "owner", "what", "by", "repair", "writes"), rows,
                 empty=f"node {rep.node}: no drift repaired since its worker started",
                 title=f"node {rep.node}: {rep.total} repair(s) since start (the last {rep.capacity} kept)",
                 right=("repair", "writes"), fold=("what", "by"))


@node_group().command("drift")
@click.argument("node_id")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True, help="Newest repairs to show.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def drift_cmd(ctx: click.Context, node_id: str, limit: int, as_json: bool) -> None:
    """Drift NODE_ID's worker repaired (newest first): what, when, by which process."""
    cfg = load_config(ctx)
    rep = run_async(lambda m: m.node_drift(node_id, limit=limit), cfg)
    if as_json:
        output.emit(rep)
        return
    render(rep)
    if rep.records:
        console.print(styled(f"{len(rep.records)} of {rep.total} shown", "dim"), highlight=False)
