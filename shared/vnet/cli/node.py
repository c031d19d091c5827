"""``vnetctl node ...``: operations on one node worker.

``teardown NODE`` asks the running worker over NATS (``vnet.node.<node>.teardown``, an
admin operation) to stop reconciling and remove everything it made: bridges, veths,
VXLAN devices, macvlan shims and endpoints, its nftables tables, wireguard-go (process,
control socket, interface). It goes on past errors and reports all of them (exit code 1
when one failed). The worker stays up as "torn down" until its process is stopped; the
endpoint records stay in the control plane (a restarted worker rebuilds them). With the
worker stopped, ``vnet-node --teardown`` on the node does the same locally
(docs/dataplane.md, "Node lifecycle").
"""

from __future__ import annotations

import click

from vnet.cli import output
from vnet.cli.main import cli, console, escape, load_config, run_async, styled


@cli.group("node")
def node() -> None:
    """Node workers: tear one down (`vnetctl endpoint nodes` lists them)."""


@node.command("teardown")
@click.argument("node_id")
@click.option("--keep-registration", is_flag=True,
              help="Do not deregister (the node stays listed until its heartbeat times out).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds to wait for the node.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def teardown_cmd(ctx: click.Context, node_id: str, keep_registration: bool, yes: bool, timeout: float,
                 as_json: bool) -> None:
    """Remove everything NODE_ID made in its kernel and stop it reconciling."""
    if not yes and not as_json:
        click.confirm(f"Remove every interface, rule and tunnel node {node_id} made (its containers lose their "
                      "network)?", abort=True)
    cfg = load_config(ctx)
    rep = run_async(lambda m: m.node_teardown(node_id, deregister=not keep_registration, timeout=timeout), cfg)
    if as_json:
        output.emit(rep)
    else:
        for item in rep.removed:
            console.print(f"removed {escape(item)}")
        for err in rep.errors:
            console.print(styled("error", "red") + f": {escape(err)}")
        verdict = styled("torn down", "green") if rep.ok else styled("torn down with errors", "red")
        console.print(f"node {escape(rep.node)} {verdict} in {rep.duration_s:.2f} s: {len(rep.removed)} removed, "
                      f"{len(rep.errors)} error(s)")
    if not rep.ok:
        ctx.exit(output.EXIT_ERROR)
