"""Reachability output for ``vnetctl``: the diff a change opens and closes (``--dry-run`` and
the real call), and ``vnetctl exposure``.

A dry run prints ``dry run: opens N paths, closes M (nothing changed)`` and one table row
per group of paths (``change``, ``from``, ``to``, ``ports``, ``paths``, ``e.g.``); networks
are shown by name. A real call prints what it always printed (its ``--json`` reply and its
event carry the diff).
With ``--json`` the verb prints its reply as it is (``reach`` inside it), per docs/cli.md.
"""

from __future__ import annotations

import click

from vnet.cli import output
from vnet.cli.main import cli, load_config, run_async
from vnet.client import VNetManager
from vnet.contracts.policy import ExposureReply
from vnet.core.reach import EXTERNAL, PathGroup, ReachDiff

REACH_COLUMNS = ("change", "from", "to", "ports", "paths", "e.g.")


def dry_run_option(fn: click.decorators.FC) -> click.decorators.FC:
    return click.option("--dry-run", is_flag=True,
                        help="Change nothing: print the paths the change would open and close.")(fn)


async def network_names(m: VNetManager, diff: ReachDiff | None) -> dict[str, str]:
    """Network id -> name, fetched only when there is something to show."""
    if diff is None or not (diff.opened or diff.closed):
        return {}
    return {n.id: n.name for n in await m.all_networks()}


def _side(label: str, names: dict[str, str]) -> str:
    if label == EXTERNAL or label.startswith(f"{EXTERNAL}:"):
        return label
    return names.get(label, label)


def _rows(diff: ReachDiff, names: dict[str, str]) -> list[list[output.Cell]]:
    rows: list[list[output.Cell]] = []
    for word, style, groups in (("opens", "green", diff.opened), ("closes", "red", diff.closed)):
        g: PathGroup
        for g in groups:
            rows.append([output.styled(word, style), _side(g.src, names), _side(g.dst, names), g.ports,
                         str(g.paths), g.sample[0] if g.sample else ""])
    return rows


def show_reach(diff: ReachDiff | None, *, dry_run: bool, names: dict[str, str]) -> None:
    """The summary line and the table of groups (nothing for a real call without a diff)."""
    if diff is None:
        if dry_run:
            output.note("no reachability diff")
        return
    if not dry_run:
        return  # a real call prints what it always printed; its reply (--json) and event carry the diff
    paths = f"{diff.opens} path{'s' if diff.opens != 1 else ''}"
    output.say(f"dry run: opens {paths}, closes {diff.closes} (nothing changed)")
    output.table(REACH_COLUMNS, _rows(diff, names), empty="no path changes", right=("paths",))


@cli.command("exposure")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def exposure_cmd(ctx: click.Context, as_json: bool) -> None:
    """Everything reachable from outside the fabric, broadest first: published ports,
    `none`-mode networks and allow rules from CIDRs, with the endpoints each exposes."""
    cfg = load_config(ctx)

    async def go(m: VNetManager) -> tuple[ExposureReply, dict[str, str]]:
        rep = await m.exposure()
        names = {n.id: n.name for n in await m.all_networks()} if rep.exposures and not as_json else {}
        return rep, names

    rep, names = run_async(go, cfg)
    if as_json:
        output.emit(rep)
        return
    rows: list[list[output.Cell]] = []
    for x in rep.exposures:
        what = names.get(x.ident, x.ident) if x.kind == "network" else x.ident
        shown = ", ".join(x.endpoints[:5]) + (f" (+{len(x.endpoints) - 5})" if len(x.endpoints) > 5 else "")
        rows.append([x.kind, what, ", ".join(x.sources), x.ports, str(len(x.endpoints)), shown or "-"])
    output.table(("kind", "what", "from", "ports", "endpoints", "exposed"), rows,
                 empty="nothing is reachable from outside the fabric", right=("endpoints",), fold=("exposed",),
                 title=f"{len(rep.exposures)} way(s) in, {rep.endpoints} endpoint(s) exposed")
