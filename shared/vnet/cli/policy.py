"""``vnetctl policy ...`` verbs: explain, ls, get, set, rm, ruleset."""

from __future__ import annotations

from typing import Literal, cast

import click
import msgspec
from rich.markup import escape
from rich.table import Table

from vnet.cli.main import cli, console, load_config, print_json, run_async
from vnet.client import VNetManager
from vnet.contracts.policy import AllowRule, RuleDeleted, RulesetReply, Verdict

PROTOCOLS = ["tcp", "udp", "sctp", "icmp"]


@cli.group()
def policy() -> None:
    """Allow rules and explain (isolation modes: `vnetctl network update --isolation`)."""


@policy.command("explain")
@click.argument("src")
@click.argument("dst")
@click.option("--proto", "protocol", type=click.Choice(PROTOCOLS), default="tcp", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=None)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def explain_cmd(ctx: click.Context, src: str, dst: str, protocol: str, port: int | None, as_json: bool) -> None:
    """Can SRC open a connection to DST (endpoint ids or addresses), and why."""
    cfg = load_config(ctx)
    proto = cast(Literal["tcp", "udp", "sctp", "icmp"], protocol)

    async def go(m: VNetManager) -> Verdict:
        return await m.explain(src, dst, protocol=proto, port=port)

    v = run_async(go, cfg)
    if as_json:
        print_json(v)
        return
    word = "[green]ALLOWED[/green]" if v.allowed else "[red]DENIED[/red]"
    flow = f"{protocol}/{port}" if port else protocol
    console.print(f"{word} {escape(v.src.address)} -> {escape(v.dst.address)} {flow} (by {v.by})")
    for r in v.reasons:
        console.print(f"  - {escape(r)}")


@policy.command("ls")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def ls_cmd(ctx: click.Context, as_json: bool) -> None:
    """List the allow rules."""
    cfg = load_config(ctx)
    rules = run_async(lambda m: m.list_rules(), cfg)
    if as_json:
        print_json(rules)
        return
    table = Table()
    for col in ("id", "from", "to", "ports"):
        table.add_column(col, overflow="fold")
    for r in rules:
        enc = msgspec.json.encode
        table.add_row(escape(r.id), escape(enc(r.from_).decode()), escape(enc(r.to).decode()),
                      escape(enc(r.ports).decode() if r.ports else "all"))
    console.print(table)


@policy.command("set")
@click.argument("rule_json")
@click.pass_context
def set_cmd(ctx: click.Context, rule_json: str) -> None:
    """Create or replace a rule given as JSON: '{"id":"r","from":[...],"to":[...],"ports":[...]}'."""
    cfg = load_config(ctx)
    try:
        rule = msgspec.json.decode(rule_json, type=AllowRule)
    except msgspec.DecodeError as exc:
        raise click.BadParameter(str(exc), param_hint="RULE_JSON") from None
    print_json(run_async(lambda m: m.put_rule(rule), cfg))


@policy.command("rm")
@click.argument("rule_id")
@click.pass_context
def rm_cmd(ctx: click.Context, rule_id: str) -> None:
    """Delete a rule."""
    cfg = load_config(ctx)
    out: RuleDeleted = run_async(lambda m: m.delete_rule(rule_id), cfg)
    print_json(out)


@policy.command("ruleset")
@click.argument("node")
@click.pass_context
def ruleset_cmd(ctx: click.Context, node: str) -> None:
    """Print node NODE's compiled nft script."""
    cfg = load_config(ctx)
    out: RulesetReply = run_async(lambda m: m.node_ruleset(node), cfg)
    click.echo(f"# version {out.version}: {out.endpoints} endpoint(s), {out.rules} rule(s)")
    click.echo(out.script, nl=False)
