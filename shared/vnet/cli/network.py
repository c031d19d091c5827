"""``vnetctl network ...`` verbs: create, ls, inspect, update, rm, connect, disconnect,
mesh ..., topology, hostroutes. Every verb takes ``--json`` for machine-readable output."""

from __future__ import annotations

import sys
from collections.abc import Awaitable
from typing import Any, Protocol, TypeVar

import click
from rich.tree import Tree

from vnet.cli import output
from vnet.cli.main import cli, console, each, escape, load_config, print_json, report_batch, run_async
from vnet.cli.params import pairs as _pairs
from vnet.cli.reach import dry_run_option, network_names, show_reach
from vnet.client import VNetManager
from vnet.contracts.network import MeshGroup, NetworkDeleted, NetworkReply
from vnet.core import topology
from vnet.core.errors import VNetError
from vnet.core.model import DriverType, IsolationMode, VirtualNetwork
from vnet.core.reach import ReachDiff

DRIVERS = [d.value for d in DriverType]
ISOLATIONS = [m.value for m in IsolationMode]


def _kv(d: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(d.items()))


def _names(ids: list[str], by_id: dict[str, VirtualNetwork]) -> str:
    return ", ".join(by_id[i].name if i in by_id else i for i in ids)


def _network_rows(nets: list[VirtualNetwork], by_id: dict[str, VirtualNetwork]) -> list[list[output.Cell]]:
    rows: list[list[output.Cell]] = []
    for n in nets:
        cidr = n.cidr + (f"\n{n.cidr_v6}" if n.cidr_v6 else "")
        gw = n.gateway + (f"\n{n.gateway_v6}" if n.gateway_v6 else "")
        rel = []
        if n.children:
            rel.append(f"{len(n.children)} child(ren)")
        if n.connected:
            rel.append(f"↔ {_names(n.connected, by_id)}")
        if n.mesh_groups:
            rel.append(f"mesh {', '.join(n.mesh_groups)}")
        parent = by_id[n.parent].name if n.parent in by_id else (n.parent or "")
        rows.append([n.name, n.id, cidr, gw, n.driver_type.value, n.isolation_mode.value, parent, "; ".join(rel),
                     _kv(n.labels)])
    return rows


NETWORK_COLUMNS = ("name", "id", "cidr", "gateway", "driver", "isolation", "parent", "relations", "labels")


def _show_network(n: VirtualNetwork) -> None:
    rows: list[tuple[str, Any]] = [
        ("id", n.id), ("name", n.name), ("cidr", n.cidr), ("gateway", n.gateway),
        ("cidr_v6", n.cidr_v6 or "-"), ("gateway_v6", n.gateway_v6 or "-"),
        ("driver", n.driver_type.value), ("isolation", n.isolation_mode.value),
        ("options", _kv(n.options) or "-"), ("labels", _kv(n.labels) or "-"),
        ("parent", n.parent or "-"), ("children", ", ".join(n.children) or "-"),
        ("connected", ", ".join(n.connected) or "-"), ("mesh groups", ", ".join(n.mesh_groups) or "-"),
        ("created", n.created_at), ("updated", n.updated_at),
    ]
    output.fields([(k, str(v)) for k, v in rows], title=f"network {n.name}")


@cli.group()
def network() -> None:
    """Networks: create, list, inspect, update, delete, and their topology."""


@network.command("create")
@click.argument("name")
@click.option("--cidr", default=None, help="IPv4 subnet, e.g. 172.20.1.0/24 (default: the next free one).")
@click.option("--gateway", default=None, help="Gateway address (default: the first usable address).")
@click.option("--driver", type=click.Choice(DRIVERS, case_sensitive=False), default=None,
              help="Driver (default: the service's default_driver).")
@click.option("--isolation", type=click.Choice(ISOLATIONS, case_sensitive=False), default=None,
              help="Isolation mode (default: the service's default_isolation).")
@click.option("-o", "--opt", "opts", multiple=True, metavar="KEY=VALUE", help="Driver option (repeatable).")
@click.option("-l", "--label", "labels", multiple=True, metavar="KEY=VALUE", help="Label (repeatable).")
@click.option("--parent", default=None, help="Create as a child of this network (id or name).")
@click.option("--prefix-len", type=click.IntRange(1, 32), default=None, help="Size of an automatic IPv4 subnet.")
@click.option("--ipv6/--no-ipv6", default=None, help="Give the network an IPv6 subnet too (default: config).")
@click.option("--cidr-v6", default=None, help="IPv6 subnet, e.g. fd00:20:1::/64.")
@click.option("--gateway-v6", default=None, help="IPv6 gateway (default: the first usable address).")
@click.option("--prefix-len-v6", type=click.IntRange(1, 128), default=None, help="Size of an automatic IPv6 subnet.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@dry_run_option
@click.pass_context
def create_cmd(ctx: click.Context, name: str, cidr: str | None, gateway: str | None, driver: str | None,
               isolation: str | None, opts: tuple[str, ...], labels: tuple[str, ...], parent: str | None,
               prefix_len: int | None, ipv6: bool | None, cidr_v6: str | None, gateway_v6: str | None,
               prefix_len_v6: int | None, as_json: bool, dry_run: bool) -> None:
    """Create network NAME (--dry-run: print the subnet it would get and the paths creating
    it would open; nothing changes)."""
    options, lbls = _pairs(opts, "--opt"), _pairs(labels, "--label")
    cfg = load_config(ctx)

    async def go(m: VNetManager) -> tuple[VirtualNetwork, ReachDiff | None, dict[str, str]]:
        args = (name, cidr, gateway, driver, isolation, options, lbls)
        kw: dict[str, Any] = dict(parent=parent, prefix_len=prefix_len, ipv6=ipv6, cidr_v6=cidr_v6,
                                  gateway_v6=gateway_v6, prefix_len_v6=prefix_len_v6)
        if not dry_run:
            return await m.create_network(*args, **kw), None, {}
        would = await m.create_network(*args, **kw, dry_run=True)
        return would, would.reach, {} if as_json else await network_names(m, would.reach)

    net, diff, names = run_async(go, cfg)
    if as_json:
        print_json(net)
        return
    v6 = f" + {net.cidr_v6}" if net.cidr_v6 else ""
    verb = "would create" if dry_run else "created"
    ident = "" if dry_run else f" {net.id}"
    console.print(f"{verb} network [bold]{escape(net.name)}[/bold]{ident} {net.cidr}{v6} gateway {net.gateway} "
                  f"({net.driver_type.value}, {net.isolation_mode.value})"
                  + (f" in parent {escape(net.parent)}" if net.parent else ""))
    show_reach(diff, dry_run=dry_run, names=names)


@network.command("ls")
@click.option("-l", "--label", "labels", multiple=True, metavar="KEY=VALUE",
              help="Only networks with this label (repeatable: all must match).")
@click.option("--parent", default=None, help="Only the children of this network.")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True, help="Page size.")
@click.option("--cursor", default=None, help="Continue after this cursor (printed below a full page).")
@click.option("--all", "all_pages", is_flag=True, help="Every page.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def ls_cmd(ctx: click.Context, labels: tuple[str, ...], parent: str | None, limit: int, cursor: str | None,
           all_pages: bool, as_json: bool) -> None:
    """List networks, ordered by name."""
    sel = _pairs(labels, "--label")
    cfg = load_config(ctx)

    async def go(m: VNetManager) -> tuple[list[VirtualNetwork], str | None]:
        if all_pages:
            return await m.all_networks(sel, parent=parent), None
        page = await m.list_networks(sel, limit=limit, cursor=cursor, parent=parent)
        return page.networks, page.next_cursor

    nets, nxt = run_async(go, cfg)
    if as_json:
        output.emit_items(nets, next_cursor=nxt)
        return
    output.table(NETWORK_COLUMNS, _network_rows(nets, {n.id: n for n in nets}),
                 empty="no networks" + (" match" if sel or parent or cursor else ""), fold=("relations", "labels"))
    if nxt:
        output.err_console.print(f"[dim]more: vnetctl network ls --cursor {escape(nxt)}[/dim]")


@network.command("inspect")
@click.argument("networks", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def inspect_cmd(ctx: click.Context, networks: tuple[str, ...], as_json: bool) -> None:
    """Show networks (by id or name) with their relations."""
    cfg = load_config(ctx)

    results = run_async(lambda m: each(networks, m.get_network), cfg)
    errors = report_batch(networks, results, VirtualNetwork, as_json=as_json)
    if not as_json:
        for i, n in enumerate(r for r in results if isinstance(r, VirtualNetwork)):
            if i and not output.stdout_is_terminal():
                click.echo()
            _show_network(n)
    if errors:
        sys.exit(output.EXIT_ERROR)


@network.command("update")
@click.argument("network_ref", metavar="NETWORK")
@click.option("-l", "--label", "labels", multiple=True, metavar="KEY=VALUE", help="Set a label (repeatable).")
@click.option("--unlabel", multiple=True, metavar="KEY", help="Remove a label (repeatable).")
@click.option("--replace-labels", is_flag=True, help="The --label values replace all labels.")
@click.option("--isolation", type=click.Choice(ISOLATIONS, case_sensitive=False), default=None)
@click.option("--json", "as_json", is_flag=True)
@dry_run_option
@click.pass_context
def update_cmd(ctx: click.Context, network_ref: str, labels: tuple[str, ...], unlabel: tuple[str, ...],
               replace_labels: bool, isolation: str | None, as_json: bool, dry_run: bool) -> None:
    """Change a network's labels or isolation mode (--dry-run: print the paths an isolation
    change would open and close; nothing changes)."""
    lbls = _pairs(labels, "--label")
    cfg = load_config(ctx)

    async def go(m: VNetManager) -> tuple[NetworkReply, dict[str, str]]:
        net = await m.update_network(
            network_ref, labels=lbls if replace_labels else None, set_labels=None if replace_labels else lbls,
            remove_labels=unlabel, isolation=isolation, dry_run=dry_run)
        return net, {} if as_json else await network_names(m, net.reach)

    net, names = run_async(go, cfg)
    if as_json:
        print_json(net)
        return
    if not dry_run:
        _show_network(net)
    show_reach(net.reach, dry_run=dry_run, names=names)


@network.command("rm")
@click.argument("networks", nargs=-1, required=True)
@click.option("-f", "--force", is_flag=True, help="Also delete the networks' endpoints.")
@click.option("--json", "as_json", is_flag=True)
@dry_run_option
@click.pass_context
def rm_cmd(ctx: click.Context, networks: tuple[str, ...], force: bool, as_json: bool, dry_run: bool) -> None:
    """Delete networks (refused while they have endpoints, unless --force; --dry-run: print
    the paths deleting each would close; nothing changes)."""
    cfg = load_config(ctx)

    async def go(m: VNetManager) -> tuple[list[NetworkDeleted | VNetError], dict[str, str]]:
        res = await each(networks, lambda n: m.delete_network(n, force=force, dry_run=dry_run))
        names: dict[str, str] = {}
        if dry_run and not as_json:
            for d in res:
                if isinstance(d, NetworkDeleted) and d.reach is not None and (d.reach.opened or d.reach.closed):
                    names = {n.id: n.name for n in await m.all_networks()}
                    break
        return res, names

    results, names = run_async(go, cfg)
    errors = report_batch(networks, results, NetworkDeleted, as_json=as_json)
    for d in results if not as_json else ():
        if not isinstance(d, NetworkDeleted):
            continue
        n_eps, n_kids = len(d.endpoints_deleted), len(d.children_detached)
        verb = "would delete" if dry_run else "deleted"
        extra = f", {n_eps} endpoint(s) {'would be ' if dry_run else ''}deleted" if n_eps else ""
        if n_kids:
            extra += f", {n_kids} child network(s) {'would be' if dry_run else 'now'} top-level"
        console.print(f"{verb} network [bold]{escape(d.network.name)}[/bold] {d.network.id}{extra}")
        for w in d.warnings:
            output.warn(w)
        show_reach(d.reach, dry_run=dry_run, names=names)
    if errors:
        sys.exit(output.EXIT_ERROR)


@network.command("connect")
@click.argument("a")
@click.argument("b")
@click.option("--json", "as_json", is_flag=True)
@dry_run_option
@click.pass_context
def connect_cmd(ctx: click.Context, a: str, b: str, as_json: bool, dry_run: bool) -> None:
    """Connect networks A and B (symmetric, not transitive)."""
    rep, names = run_async(lambda m: _with_names(m, m.connect_networks(a, b, dry_run=dry_run), as_json),
                           load_config(ctx))
    if as_json:
        print_json(rep)
        return
    if not dry_run:
        state = "connected" if rep.changed else "already connected"
        console.print(f"{escape(rep.network_a.name)} ↔ {escape(rep.network_b.name)}: {state}")
    elif not rep.changed:
        console.print(f"{escape(rep.network_a.name)} ↔ {escape(rep.network_b.name)}: already connected")
    show_reach(rep.reach, dry_run=dry_run, names=names)


@network.command("disconnect")
@click.argument("a")
@click.argument("b")
@click.option("--json", "as_json", is_flag=True)
@dry_run_option
@click.pass_context
def disconnect_cmd(ctx: click.Context, a: str, b: str, as_json: bool, dry_run: bool) -> None:
    """Remove the connection between networks A and B."""
    rep, names = run_async(lambda m: _with_names(m, m.disconnect_networks(a, b, dry_run=dry_run), as_json),
                           load_config(ctx))
    if as_json:
        print_json(rep)
        return
    if not dry_run:
        state = "disconnected" if rep.changed else "were not connected"
        console.print(f"{escape(rep.network_a.name)} / {escape(rep.network_b.name)}: {state}")
    elif not rep.changed:
        console.print(f"{escape(rep.network_a.name)} / {escape(rep.network_b.name)}: were not connected")
    show_reach(rep.reach, dry_run=dry_run, names=names)


@network.group("mesh")
def mesh() -> None:
    """Mesh groups: every member network is related to every other."""


@mesh.command("create")
@click.argument("name")
@click.argument("members", nargs=-1)
@click.option("--json", "as_json", is_flag=True)
@dry_run_option
@click.pass_context
def mesh_create_cmd(ctx: click.Context, name: str, members: tuple[str, ...], as_json: bool, dry_run: bool) -> None:
    """Create mesh group NAME with MEMBERS (ids or names)."""
    g, names = run_async(lambda m: _with_names(m, m.create_mesh(name, members, dry_run=dry_run), as_json),
                         load_config(ctx))
    if as_json:
        print_json(g)
        return
    if not dry_run:
        console.print(f"created mesh group [bold]{escape(g.name)}[/bold] with {len(g.members)} member(s)")
    show_reach(g.reach, dry_run=dry_run, names=names)


@mesh.command("add")
@click.argument("mesh_name", metavar="MESH")
@click.argument("network_ref", metavar="NETWORK")
@click.option("--json", "as_json", is_flag=True)
@dry_run_option
@click.pass_context
def mesh_add_cmd(ctx: click.Context, mesh_name: str, network_ref: str, as_json: bool, dry_run: bool) -> None:
    """Add NETWORK to mesh group MESH."""
    rep, names = run_async(lambda m: _with_names(m, m.add_to_mesh(mesh_name, network_ref, dry_run=dry_run),
                                                 as_json), load_config(ctx))
    if as_json:
        print_json(rep)
        return
    if not dry_run or not rep.changed:
        state = "added to" if rep.changed else "already in"
        console.print(f"{escape(network_ref)} {state} mesh {escape(mesh_name)} ({len(rep.mesh.members)} member(s))")
    show_reach(rep.reach, dry_run=dry_run, names=names)


@mesh.command("remove")
@click.argument("mesh_name", metavar="MESH")
@click.argument("network_ref", metavar="NETWORK")
@click.option("--json", "as_json", is_flag=True)
@dry_run_option
@click.pass_context
def mesh_remove_cmd(ctx: click.Context, mesh_name: str, network_ref: str, as_json: bool, dry_run: bool) -> None:
    """Remove NETWORK from mesh group MESH."""
    rep, names = run_async(lambda m: _with_names(m, m.remove_from_mesh(mesh_name, network_ref, dry_run=dry_run),
                                                 as_json), load_config(ctx))
    if as_json:
        print_json(rep)
        return
    if not dry_run or not rep.changed:
        state = "removed from" if rep.changed else "was not in"
        console.print(f"{escape(network_ref)} {state} mesh {escape(mesh_name)} ({len(rep.mesh.members)} member(s))")
    show_reach(rep.reach, dry_run=dry_run, names=names)


@mesh.command("delete")
@click.argument("mesh_name", metavar="MESH")
@click.option("--json", "as_json", is_flag=True)
@dry_run_option
@click.pass_context
def mesh_delete_cmd(ctx: click.Context, mesh_name: str, as_json: bool, dry_run: bool) -> None:
    """Delete mesh group MESH (its networks stay)."""
    g, names = run_async(lambda m: _with_names(m, m.delete_mesh(mesh_name, dry_run=dry_run), as_json),
                         load_config(ctx))
    if as_json:
        print_json(g)
        return
    if not dry_run:
        console.print(f"deleted mesh group [bold]{escape(g.name)}[/bold]")
    show_reach(g.reach, dry_run=dry_run, names=names)


class _HasReach(Protocol):
    @property
    def reach(self) -> ReachDiff | None: ...


R = TypeVar("R", bound=_HasReach)


async def _with_names(m: VNetManager, call: Awaitable[R], as_json: bool) -> tuple[R, dict[str, str]]:
    """The reply, and the network names its diff shows (none for --json)."""
    rep = await call
    return rep, {} if as_json else await network_names(m, rep.reach)


@mesh.command("ls")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def mesh_ls_cmd(ctx: click.Context, as_json: bool) -> None:
    """List mesh groups and their members."""

    async def go(m: VNetManager) -> tuple[list[MeshGroup], list[VirtualNetwork]]:
        return await m.list_meshes(), await m.all_networks()

    groups, nets = run_async(go, load_config(ctx))
    if as_json:
        output.emit_items(groups)
        return
    by_id = {n.id: n for n in nets}
    output.table(("mesh", "members", "created"), [[g.name, _names(g.members, by_id) or "-", g.created_at]
                                                  for g in groups], empty="no mesh groups", fold=("members",))


def _label(n: VirtualNetwork, by_id: dict[str, VirtualNetwork]) -> str:
    s = (f"[bold]{escape(n.name)}[/bold] {n.cidr}" + (f" {n.cidr_v6}" if n.cidr_v6 else "")
         + f" [dim]{n.driver_type.value}/{n.isolation_mode.value} {n.id}[/dim]")
    if n.connected:
        s += f"  [cyan]↔ {escape(_names(n.connected, by_id))}[/cyan]"
    if n.mesh_groups:
        s += f"  [magenta]mesh: {escape(', '.join(n.mesh_groups))}[/magenta]"
    return s


def render_topology(nets: list[VirtualNetwork], groups: list[MeshGroup]) -> Tree:
    """Parents with their children nested; connections and mesh groups listed after."""
    by_id = {n.id: n for n in nets}
    root = Tree(f"[bold]networks[/bold] ({len(nets)})")

    def add(parent: Tree, node: topology.TreeNode) -> None:
        branch = parent.add(_label(node.network, by_id))
        for c in node.children:
            add(branch, c)

    for node in topology.build_tree(nets):
        add(root, node)
    conns = topology.connections(nets)
    ctree = root.add(f"[bold cyan]connections[/bold cyan] ({len(conns)})")
    for a, b in conns:
        ctree.add(f"{escape(_names([a], by_id))} ↔ {escape(_names([b], by_id))}")
    mtree = root.add(f"[bold magenta]mesh groups[/bold magenta] ({len(groups)})")
    for g in groups:
        mtree.add(f"{escape(g.name)}: {escape(_names(g.members, by_id)) or '(no members)'}")
    return root


@network.command("topology")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def topology_cmd(ctx: click.Context, as_json: bool) -> None:
    """Networks and their relations as a tree: parents with children nested, then
    connections and mesh groups."""

    async def go(m: VNetManager) -> tuple[list[VirtualNetwork], list[MeshGroup]]:
        _, nets, groups = await m.network_topology()
        return nets, groups

    nets, groups = run_async(go, load_config(ctx))
    if as_json:
        print_json({"networks": nets, "connections": [list(p) for p in topology.connections(nets)],
                    "mesh_groups": groups})
        return
    console.print(render_topology(nets, groups))


@network.command("hostroutes")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def hostroutes_cmd(ctx: click.Context, as_json: bool) -> None:
    """Routes and addresses node workers reported from their hosts (automatic subnets avoid
    them), and those that are not VNet's and overlap a network (each also an event,
    vnet.evt.network.route_overlap.<network>, when the node reports it)."""
    info = run_async(lambda m: m.host_routes(), load_config(ctx))
    if as_json:
        print_json(info)
        return
    output.table(("node", "prefixes", "overlaps", "expires in"),
                 [[n.node, ", ".join(n.prefixes) or "-",
                   ", ".join(f"{o.prefix} ~ {o.network_name}" for o in n.overlaps) or "-",
                   f"{n.expires_in_s:.0f}s"] for n in info.nodes],
                 empty="no node reported host routes", fold=("prefixes", "overlaps"))
    for n in info.nodes:
        for o in n.overlaps:
            output.warn(f"node {n.node}: host route {o.prefix} overlaps network {o.network_name} ({o.cidr}): "
                        "its traffic may leave through the host's route instead of the network")
