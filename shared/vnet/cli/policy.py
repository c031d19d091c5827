"""``vnetctl policy ...`` verbs: explain, ls, get, set, rm, ruleset.

``explain SRC DST`` takes endpoint ids, container names or addresses. Its first line is
``ALLOWED``, ``DENIED`` or ``NOT GOVERNED`` (neither side is an endpoint: VNet neither
allows nor blocks the flow), then the reasons.
"""

from __future__ import annotations

from typing import Literal, cast

import click
import msgspec

from vnet.cli import output
from vnet.cli.main import cli, console, escape, load_config, run_async
from vnet.cli.reach import dry_run_option, network_names, show_reach
from vnet.client import VNetManager
from vnet.contracts.policy import AllowRule, RuleDeleted, RuleReply, RulesetReply, Verdict
from vnet.core.policy import Party

PROTOCOLS = ["tcp", "udp", "sctp", "icmp"]


@cli.group()
def policy() -> None:
    """Allow rules and explain (isolation modes: `vnetctl network update --isolation`)."""


def _party(p: Party, names: dict[str, str]) -> str:
    net = names.get(p.network or "", p.network)  # people know networks by name
    if p.kind == "endpoint":
        return f"{p.address} (endpoint {p.endpoint} in {net})"
    if p.kind == "external":
        return f"{p.address} (external)"
    return f"{p.address} ({'a host address' if p.kind == 'host' else 'unassigned'} in {net})"


def _by(v: Verdict) -> str:
    if v.by == "rule":
        return f"allowed by rule{'s' if len(v.rules) > 1 else ''} {', '.join(v.rules)}"
    if v.by == "mode":
        return "allowed by the isolation modes" if v.allowed else "blocked by the isolation modes"
    return "no isolation mode or allow rule allows it"


@policy.command("explain")
@click.argument("src")
@click.argument("dst")
@click.option("--proto", "protocol", type=click.Choice(PROTOCOLS), default="tcp", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=None)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def explain_cmd(ctx: click.Context, src: str, dst: str, protocol: str, port: int | None, as_json: bool) -> None:
    """Can SRC open a connection to DST, and why. Each is an endpoint id, a container name or an
    address; a container on several networks is explained over the endpoint pair the flow would use."""
    cfg = load_config(ctx)
    proto = cast(Literal["tcp", "udp", "sctp", "icmp"], protocol)

    async def go(m: VNetManager) -> tuple[Verdict, dict[str, str]]:
        v = await m.explain(src, dst, protocol=proto, port=port)
        names = {n.id: n.name for n in await m.all_networks()} if not as_json and (v.src.network or v.dst.network) \
            else {}
        return v, names

    v, names = run_async(go, cfg)
    if as_json:
        output.emit(v)
        return
    flow = f"{protocol}/{v.port}" if v.port else protocol
    parties = f"{escape(_party(v.src, names))} -> {escape(_party(v.dst, names))} {flow}"
    if v.by == "ungoverned":
        # Not DENIED: nothing of VNet's is on this path, so it neither allows nor blocks it.
        console.print(f"[yellow]NOT GOVERNED[/yellow] {parties}: neither side is an endpoint, so VNet neither "
                      "allows nor blocks this flow", highlight=False)
    else:
        word = "[green]ALLOWED[/green]" if v.allowed else "[red]DENIED[/red]"
        console.print(f"{word} {parties} ({escape(_by(v))})", highlight=False)
    for r in v.reasons:
        console.print(f"  - {escape(r)}", highlight=False)


def _rules_rows(rules: list[AllowRule]) -> list[list[output.Cell]]:
    enc = msgspec.json.encode
    return [[r.id, enc(r.from_).decode(), enc(r.to).decode(), enc(r.ports).decode() if r.ports else "all"]
            for r in rules]


RULE_COLUMNS = ("id", "from", "to", "ports")


@policy.command("ls")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def ls_cmd(ctx: click.Context, as_json: bool) -> None:
    """List the allow rules."""
    cfg = load_config(ctx)
    rules = run_async(lambda m: m.list_rules(), cfg)
    if as_json:
        output.emit_items(rules)
        return
    output.table(RULE_COLUMNS, _rules_rows(rules), empty="no allow rules", fold=("from", "to", "ports"))


@policy.command("get")
@click.argument("rule_id")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def get_cmd(ctx: click.Context, rule_id: str, as_json: bool) -> None:
    """Show one allow rule."""
    rule = run_async(lambda m: m.get_rule(rule_id), load_config(ctx))
    if as_json:
        output.emit(rule)
        return
    output.table(RULE_COLUMNS, _rules_rows([rule]), empty="", fold=("from", "to", "ports"))


@policy.command("set")
@click.argument("rule_json")
@click.option("--json", "as_json", is_flag=True)
@dry_run_option
@click.pass_context
def set_cmd(ctx: click.Context, rule_json: str, as_json: bool, dry_run: bool) -> None:
    """Create or replace a rule given as JSON: '{"id":"r","from":[...],"to":[...],"ports":[...]}'.
    Prints the paths it opened and closed (--dry-run: would open and close, nothing changes)."""
    try:
        rule = msgspec.json.decode(rule_json, type=AllowRule)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise click.BadParameter(str(exc), param_hint="RULE_JSON") from None
    cfg = load_config(ctx)

    async def go(m: VNetManager) -> tuple[RuleReply, dict[str, str]]:
        out = await m.put_rule(rule, dry_run=dry_run)
        return out, {} if as_json else await network_names(m, out.reach)

    out, names = run_async(go, cfg)
    if as_json:
        output.emit(out)
        return
    if not dry_run:
        console.print(f"rule [bold]{escape(out.id)}[/bold] set", highlight=False)
        output.table(RULE_COLUMNS, _rules_rows([out]), empty="", fold=("from", "to", "ports"))
    show_reach(out.reach, dry_run=dry_run, names=names)


@policy.command("rm")
@click.argument("rule_id")
@click.option("--json", "as_json", is_flag=True)
@dry_run_option
@click.pass_context
def rm_cmd(ctx: click.Context, rule_id: str, as_json: bool, dry_run: bool) -> None:
    """Delete a rule (deleting one that does not exist is not an error: it says so)."""
    cfg = load_config(ctx)

    async def go(m: VNetManager) -> tuple[RuleDeleted, dict[str, str]]:
        out = await m.delete_rule(rule_id, dry_run=dry_run)
        return out, {} if as_json else await network_names(m, out.reach)

    out, names = run_async(go, cfg)
    if as_json:
        output.emit(out)
        return
    if not out.deleted:
        console.print(f"no rule {escape(out.id)} (nothing {'would be ' if dry_run else ''}deleted)", highlight=False)
    elif not dry_run:
        console.print(f"deleted rule {escape(out.id)}", highlight=False)
    show_reach(out.reach, dry_run=dry_run and out.deleted, names=names)


@policy.command("ruleset")
@click.argument("node")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def ruleset_cmd(ctx: click.Context, node: str, as_json: bool) -> None:
    """Print node NODE's compiled nft script."""
    cfg = load_config(ctx)
    out: RulesetReply = run_async(lambda m: m.node_ruleset(node), cfg)
    if as_json:
        output.emit(out)
        return
    click.echo(f"# version {out.version}: {out.endpoints} endpoint(s), {out.rules} rule(s)")
    click.echo(out.script, nl=False)
