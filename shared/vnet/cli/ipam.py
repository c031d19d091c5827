"""`vnetctl ipam ...` verbs: pools, request/release (debugging), gc, check.

::

    vnetctl ipam pools                      # every pool: capacity, used, free, cursor, rates, time to full
    vnetctl ipam pools web --json
    vnetctl ipam request web ep-1 [--address 10.1.0.9] [--family 6]
    vnetctl ipam release web ep-1
    vnetctl ipam check [web]                # leaks and inconsistencies; changes nothing; exit 1 if any
    vnetctl ipam gc [--grace 60]            # release orphans older than the grace period
"""

from __future__ import annotations

import sys
import time

import click
from rich.text import Text

from vnet.cli import output
from vnet.cli.main import cli, console, escape, load_config, print_json, run_async
from vnet.contracts.ipam import CheckReply, GcReply, PoolInfo
from vnet.core.forecast import human_duration


@cli.group()
def ipam() -> None:
    """IP address management: pools, allocations, garbage collection and checks."""


def _pct(used: int, capacity: int) -> str:
    return f"{100.0 * used / capacity:.1f}%" if capacity else "-"


POOL_COLUMNS = ("network", "family", "cidr", "gateway", "capacity", "used", "free", "use", "cursor", "alloc/h",
                "release/h", "full in")


def _forecast_cells(p: PoolInfo) -> list[output.Cell]:
    """Rates over the last 15 minutes and the time to exhaustion at that rate ("never": not filling)."""
    f = p.forecast
    if f is None:
        return ["-", "-", "-"]
    eta = f.exhaustion_s
    style = "red" if eta is not None and eta < 3600 else ("yellow" if eta is not None and eta < 86400 else "")
    return [f"{f.alloc_per_h:g}", f"{f.release_per_h:g}", Text(human_duration(eta), style=style)]


def _pools_table(pools: list[PoolInfo], title: str, empty: str = "no IPAM pools") -> None:
    rows: list[list[output.Cell]] = []
    for p in pools:
        cidr = Text(p.cidr)
        if p.window and p.capacity and p.window < _size(p.cidr):
            cidr.append(f" (first {p.window:,})", style="dim")
        color = "red" if p.free == 0 else ("yellow" if p.capacity and p.free / p.capacity < 0.1 else "")
        rows.append([p.network_id, f"IPv{p.family}", cidr, p.gateway or "-", f"{p.capacity:,}", f"{p.used:,}",
                     Text(f"{p.free:,}", style=color), _pct(p.used, p.capacity), p.cursor or "-",
                     *_forecast_cells(p)])
    output.table(POOL_COLUMNS, rows, empty=empty, title=title,
                 right=("capacity", "used", "free", "use", "alloc/h", "release/h", "full in"))


def _size(cidr: str) -> int:
    import ipaddress

    return ipaddress.ip_network(cidr).num_addresses


@ipam.command("pools")
@click.argument("network", required=False)
@click.option("--family", type=click.Choice(["4", "6"]), default=None, help="Only this address family.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def pools_cmd(ctx: click.Context, network: str | None, family: str | None, as_json: bool) -> None:
    """Pools (of NETWORK, or all): capacity, used, free, the serial cursor, allocations and
    releases per hour (last 15 minutes) and the time until full at that rate."""
    cfg = load_config(ctx)
    fam = int(family) if family else None
    rows = run_async(lambda m: m.pools(network, fam), cfg)
    if as_json:
        output.emit_items(rows)
        return
    _pools_table(rows, f"IPAM pools{' of ' + network if network else ''}",
                 empty=f"no IPAM pools{' for network ' + network if network else ''}")


@ipam.command("pool-create")
@click.argument("network")
@click.argument("cidr")
@click.option("--gateway", default=None, help="Gateway address (never handed out).")
@click.option("--reserved", multiple=True, help="An address never handed out (repeatable).")
@click.option("--exclude", "excluded", multiple=True, help="A child subnet carved out of the pool (repeatable).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def pool_create_cmd(ctx: click.Context, network: str, cidr: str, gateway: str | None, reserved: tuple[str, ...],
                    excluded: tuple[str, ...], as_json: bool) -> None:
    """Create NETWORK's pool for CIDR (the network service does this; for debugging)."""
    cfg = load_config(ctx)
    p = run_async(lambda m: m.create_pool(network, cidr, gateway, reserved=reserved, excluded=excluded), cfg)
    if as_json:
        print_json(p)
        return
    _pools_table([p], f"pool of {network}")


@ipam.command("pool-delete")
@click.argument("network")
@click.option("--family", type=click.Choice(["4", "6"]), default=None, help="Only this family (default: all).")
@click.option("--force", is_flag=True, help="Delete even with addresses allocated (they are dropped).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def pool_delete_cmd(ctx: click.Context, network: str, family: str | None, force: bool, as_json: bool) -> None:
    """Delete NETWORK's pool(s) (the network service does this; for debugging)."""
    cfg = load_config(ctx)
    rep = run_async(lambda m: m.delete_pool(network, int(family) if family else None, force=force), cfg)
    if as_json:
        print_json(rep)
        return
    if not rep.pools:
        console.print(f"network {escape(network)} had no pool")
    for p in rep.pools:
        console.print(f"deleted the IPv{p.family} pool {p.cidr} of {escape(network)}"
                      + (f" ([yellow]{p.used} allocations dropped[/yellow])" if p.used else ""))


@ipam.command("pool-exclude")
@click.argument("network")
@click.argument("cidrs", nargs=-1, required=True)
@click.option("--remove", is_flag=True, help="Give the subnets back to the pool instead.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def pool_exclude_cmd(ctx: click.Context, network: str, cidrs: tuple[str, ...], remove: bool, as_json: bool) -> None:
    """Carve child subnets CIDRS out of NETWORK's pool (or give them back with --remove)."""
    cfg = load_config(ctx)
    p = run_async(lambda m: m.exclude_from_pool(network, remove=cidrs) if remove
                  else m.exclude_from_pool(network, add=cidrs), cfg)
    if as_json:
        print_json(p)
        return
    _pools_table([p], f"pool of {network}")
    console.print(f"excluded: {escape(', '.join(p.excluded)) or '-'}")


@ipam.command("request")
@click.argument("network")
@click.argument("owner")
@click.option("--address", default=None, help="Ask for this address (static) instead of the next free one.")
@click.option("--family", type=click.Choice(["4", "6"]), default="4", show_default=True)
@click.option("--request-id", default=None, help="Idempotency key.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def request_cmd(ctx: click.Context, network: str, owner: str, address: str | None, family: str,
                request_id: str | None, as_json: bool) -> None:
    """Allocate an address of NETWORK to OWNER (an endpoint id) — for debugging."""
    cfg = load_config(ctx)
    rep = run_async(lambda m: m.request_address(network, owner, family=int(family), address=address,
                                                request_id=request_id), cfg)
    if as_json:
        print_json(rep)
        return
    console.print(f"{rep.address}/{rep.prefix_len} → {escape(rep.owner)} (gateway {rep.gateway or '-'}, "
                  f"allocated {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(rep.allocated_at))})")


@ipam.command("release")
@click.argument("network")
@click.argument("owner")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def release_cmd(ctx: click.Context, network: str, owner: str, as_json: bool) -> None:
    """Release every address OWNER holds in NETWORK (idempotent)."""
    cfg = load_config(ctx)
    released = run_async(lambda m: m.release_address(network, owner), cfg)
    if as_json:
        print_json({"released": released})
        return
    console.print(f"released {', '.join(released)}" if released
                  else f"{escape(owner)} held nothing in {escape(network)}")


@ipam.command("gc")
@click.option("--grace", "grace_s", type=float, default=None,
              help="Collect only what is older than this many seconds (default: the service's, 60).")
@click.option("--network", default=None, help="Only this network's pools.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def gc_cmd(ctx: click.Context, grace_s: float | None, network: str | None, as_json: bool) -> None:
    """Release allocations whose endpoint is gone and delete pools whose network is gone."""
    cfg = load_config(ctx)
    rep: GcReply = run_async(lambda m: m.ipam_gc(grace_s=grace_s, network_id=network), cfg)
    if as_json:
        print_json(rep)
        return
    console.print(f"scanned {rep.pools_scanned} pools (grace {rep.grace_s:g}s): released {len(rep.released)} "
                  f"allocations, deleted {len(rep.pools_deleted)} orphan pools, repaired {rep.index_repaired} "
                  "index entries")
    if rep.released:
        output.table(("network", "address", "owner", "allocated"),
                     [[a.network_id, a.address, a.owner, time.strftime("%Y-%m-%d %H:%M:%S",
                                                                       time.localtime(a.allocated_at))]
                      for a in rep.released], empty="", title="released")
    for p in rep.pools_deleted:
        console.print(f"deleted the IPv{p.family} pool {p.cidr} of {escape(p.network_id)} (network gone; "
                      f"{p.released} allocations dropped)")
    for s in rep.skipped:
        console.print(f"[yellow]skipped[/yellow] {escape(s)}")


@ipam.command("check")
@click.argument("network", required=False)
@click.option("--grace", "grace_s", type=float, default=None, help="Mark leaks older than this collectable.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def check_cmd(ctx: click.Context, network: str | None, grace_s: float | None, as_json: bool) -> None:
    """Report leaks and inconsistencies without changing anything (exit 1 if any)."""
    cfg = load_config(ctx)
    rep: CheckReply = run_async(lambda m: m.ipam_check(network_id=network, grace_s=grace_s), cfg)
    if as_json:
        print_json(rep)
    else:
        _print_check(rep)
    if not rep.clean:
        sys.exit(1)


def _print_check(rep: CheckReply) -> None:
    verdict = "[green]clean[/green]" if rep.clean else "[red]problems found[/red]"
    console.print(f"checked {rep.pools_checked} pools, {rep.allocations} allocations: {verdict}")
    if rep.leaks:
        output.table(("network", "family", "address", "owner", "age", "next GC"),
                     [[lk.network_id, f"IPv{lk.family}", lk.address, lk.owner, f"{lk.age_s:.0f}s",
                       "releases it" if lk.collectable else "waits (grace)"] for lk in rep.leaks],
                     empty="", title="leaks (owner not in the endpoint index)", right=("age",))
    if rep.inconsistencies:
        output.table(("network", "family", "kind", "detail"),
                     [[i.network_id, f"IPv{i.family}", i.kind, i.message] for i in rep.inconsistencies],
                     empty="", title="inconsistencies", fold=("detail",))
    if rep.orphan_pools:
        output.table(("network", "family", "cidr", "used", "age", "next GC"),
                     [[o.network_id, f"IPv{o.family}", o.cidr, str(o.used), f"{o.age_s:.0f}s",
                       "deletes it" if o.collectable else "waits (grace)"] for o in rep.orphan_pools],
                     empty="", title="orphan pools (network not in the network index)")
    for n in rep.notes:
        console.print(f"[dim]note: {escape(n)}[/dim]")
