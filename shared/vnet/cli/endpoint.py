"""``vnetctl endpoint ...`` verbs: create (alias attach), ls, inspect, label, ports, rm, nodes.

``create`` waits for the node to report (``--no-wait`` returns at once); with several
containers or ``--count N`` it runs them concurrently behind a progress bar.
Every verb takes ``--json`` for machine-readable output.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from vnet.cli import output
from vnet.cli.main import cli, console, each, err_console, escape, load_config, report_batch, run_async
from vnet.cli.params import pairs as _pairs
from vnet.client import VNetManager
from vnet.contracts.endpoint import (
    DEFAULT_WAIT_S,
    EndpointDeleted,
    EndpointInfo,
    EndpointUpdated,
    NodeInfo,
    PortMapping,
)
from vnet.core.errors import VNetError

T = TypeVar("T")
STATUS_COLOR = {"ready": "green", "pending": "yellow", "failed": "red"}


def parse_publish(spec: str) -> PortMapping:
    """``8080:80``, ``8080:80/tcp``, ``5353:53/udp`` -> a PortMapping (ranges checked by the contract)."""
    body, _, proto = spec.partition("/")
    host, sep, cont = body.partition(":")
    proto = proto.lower() or "tcp"
    if not sep or not host.isdigit() or not cont.isdigit() or proto not in ("tcp", "udp"):
        raise click.BadParameter(f"{spec!r}: expected HOST:CONTAINER[/tcp|udp], e.g. 8080:80", param_hint="--publish")
    h, c = int(host), int(cont)
    if not (1 <= h <= 65535 and 1 <= c <= 65535):
        raise click.BadParameter(f"{spec!r}: ports are 1-65535", param_hint="--publish")
    return PortMapping(host_port=h, container_port=c, protocol="udp" if proto == "udp" else "tcp")


def _status(e: EndpointInfo) -> str:
    color = STATUS_COLOR.get(e.status, "white")
    return f"[{color}]{escape(e.status)}[/{color}]"


def _status_cell(e: EndpointInfo) -> Text:
    t = Text(e.status, style=STATUS_COLOR.get(e.status, "white"))
    if e.reason:
        t.append(f": {e.reason}")
    return t


def _line(e: EndpointInfo, net_name: str | None = None) -> str:
    addrs = " ".join(a for a in (e.ip_address, e.ipv6_address) if a) or "no address (host driver)"
    where = f"{e.interface_name} " if e.interface_name else ""
    text = (f"{escape(e.container_id)} → {escape(net_name or e.network_id)}: {escape(where + addrs)} "
            f"{escape(e.mac_address)} on {escape(e.node)} [dim]({escape(e.id)})[/dim] {_status(e)}")
    if e.ports:
        text += " publishes " + ", ".join(f"{p.host_port}->{p.container_port}/{p.protocol}" for p in e.ports)
    if e.reason:
        text += f": {escape(e.reason)}"
    return text


async def _many(items: list[T], fn: Callable[[T], Awaitable[Any]], parallel: int, label: str,
                show: bool) -> list[Any]:
    """Run ``fn`` over ``items`` with ``parallel`` in flight; a progress bar when ``show``."""
    sem = asyncio.Semaphore(parallel)
    results: list[Any] = [None] * len(items)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=err_console, disable=not show, transient=False)

    with progress:
        task = progress.add_task(label, total=len(items))

        async def one(i: int, item: T) -> None:
            async with sem:
                try:
                    results[i] = await fn(item)
                except VNetError as err:
                    results[i] = err
                progress.advance(task)

        await asyncio.gather(*(one(i, x) for i, x in enumerate(items)))
    return results


@cli.group()
def endpoint() -> None:
    """Endpoints: attach containers to networks, list, inspect, detach; the node registry."""


def _create_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    opts: list[Callable[[Callable[..., Any]], Callable[..., Any]]] = [
        click.argument("containers", nargs=-1, required=True),
        click.option("-n", "--network", required=True, help="Network id or name."),
        click.option("--ip", default=None, help="Static IPv4 (or IPv6) address (default: the next free one)."),
        click.option("--ipv6", default=None, help="Static IPv6 address (when the network has an IPv6 subnet)."),
        click.option("--mac", default=None, help="MAC address (default: random, locally administered)."),
        click.option("--node", default=None, help="Node the container runs on (default: the only registered one)."),
        click.option("--netns", default=None, help="Container network namespace: a name under /run/netns or a path "
                     "such as /proc/<pid>/ns/net (default: the namespace named like the container)."),
        click.option("--ifname", default=None, help="Interface name in the container (default: eth0, eth1, ...)."),
        click.option("-l", "--label", "labels", multiple=True, metavar="KEY=VALUE", help="Label (repeatable)."),
        click.option("-p", "--publish", "publish", multiple=True, metavar="HOST:CONTAINER[/tcp|udp]",
                     help="Publish a container port on the node's addresses (repeatable; tcp by default)."),
        click.option("--alias", "aliases", multiple=True, metavar="NAME",
                     help="Another name the container answers to in DNS (repeatable; docs/dns.md)."),
        click.option("--count", type=click.IntRange(1, 100000), default=None,
                     help="Attach N containers named CONTAINER-1 .. CONTAINER-N."),
        click.option("--wait/--no-wait", default=True, show_default=True,
                     help="Wait until the node reports ready or failed."),
        click.option("--timeout", type=click.FloatRange(0.1, 600), default=DEFAULT_WAIT_S, show_default=True,
                     help="How long to wait for the node (seconds)."),
        click.option("--parallel", type=click.IntRange(1, 256), default=16, show_default=True,
                     help="Attachments in flight when attaching several."),
        click.option("--json", "as_json", is_flag=True, help="Machine-readable output."),
        click.pass_context,
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _create(ctx: click.Context, containers: tuple[str, ...], network: str, ip: str | None, ipv6: str | None,
            mac: str | None, node: str | None, netns: str | None, ifname: str | None, labels: tuple[str, ...],
            count: int | None, wait: bool, timeout: float, parallel: int, as_json: bool,
            publish: tuple[str, ...] = (), aliases: tuple[str, ...] = ()) -> None:
    lbls = _pairs(labels, "--label")
    ports = [parse_publish(p) for p in publish]
    names = list(containers)
    if count is not None:
        if len(names) != 1:
            raise click.UsageError("--count takes one CONTAINER name (the containers are NAME-1 .. NAME-N)")
        names = [f"{names[0]}-{i}" for i in range(1, count + 1)]
    if len(names) > 1 and (any(v is not None for v in (ip, ipv6, mac, netns)) or ports or aliases):
        raise click.UsageError("--ip, --ipv6, --mac, --netns, --publish and --alias apply to one container; attach "
                               "them one by one")
    cfg = load_config(ctx)

    async def go(m: VNetManager) -> tuple[list[Any], dict[str, str]]:
        async def one(name: str) -> EndpointInfo:
            return await m.create_endpoint(name, network, ip, mac, node=node, netns=netns, ifname=ifname, ipv6=ipv6,
                                           labels=lbls, ports=ports, wait=wait, wait_timeout=timeout,
                                           aliases=aliases)

        if len(names) == 1:
            results: list[Any] = list(await each(names, one))  # a failure is reported, not raised
        else:
            results = await _many(names, one, parallel, f"attaching to {network}", show=not as_json)
        nets = {n.id: n.name for n in await m.all_networks()} if not as_json else {}
        return results, nets

    t0 = time.perf_counter()
    results, nets = run_async(go, cfg)
    elapsed = time.perf_counter() - t0
    eps = [r for r in results if isinstance(r, EndpointInfo)]
    _point_at_resolvers(eps)
    errors = [(n, r) for n, r in zip(names, results, strict=True) if isinstance(r, VNetError)]
    report_batch(names, results, EndpointInfo, as_json=as_json)
    if not as_json:
        if len(names) <= 20:
            for e in eps:
                console.print(_line(e, nets.get(e.network_id)))
        counts = {s: sum(1 for e in eps if e.status == s) for s in ("ready", "pending", "failed")}
        if len(names) > 1:
            console.print(f"{len(eps)} attached in {elapsed:.2f}s: {counts['ready']} ready, {counts['pending']} "
                          f"pending, {counts['failed']} failed; {len(errors)} refused")
            for e in eps:
                if e.status == "failed" and len(names) > 20:
                    console.print(_line(e, nets.get(e.network_id)))
    if errors or any(e.status == "failed" for e in eps):
        sys.exit(output.EXIT_ERROR)


def _point_at_resolvers(eps: list[EndpointInfo]) -> None:
    """Containers of `vnetctl container create` learn their resolver (docs/dns.md)."""
    if os.geteuid() != 0:
        return
    from vnet.cli.container import write_resolv_conf

    for e in eps:
        if e.dns is not None and e.status == "ready" and "/" not in e.netns:
            write_resolv_conf(e.netns, e.dns.nameservers, e.dns.search, e.dns.options)


@endpoint.command("create")
@_create_options
def create_cmd(ctx: click.Context, **kw: Any) -> None:
    """Attach CONTAINER(s) to a network (waits for the node by default)."""
    _create(ctx, **kw)


@endpoint.command("attach")
@_create_options
def attach_cmd(ctx: click.Context, **kw: Any) -> None:
    """Same as `create`."""
    _create(ctx, **kw)


ENDPOINT_COLUMNS = ("id", "container", "network", "node", "interface", "ipv4", "ipv6", "mac", "status", "labels")


def _rows(eps: list[EndpointInfo], nets: dict[str, str]) -> list[list[output.Cell]]:
    return [[e.id, e.container_id, nets.get(e.network_id, e.network_id), e.node, e.interface_name or "-",
             e.ip_address or "-", e.ipv6_address or "-", e.mac_address or "-", _status_cell(e),
             ",".join(f"{k}={v}" for k, v in sorted(e.labels.items()))] for e in eps]


@endpoint.command("ls")
@click.option("-n", "--network", default=None, help="Only this network (id or name).")
@click.option("--node", default=None, help="Only this node.")
@click.option("-c", "--container", default=None, help="Only this container.")
@click.option("-l", "--label", "labels", multiple=True, metavar="KEY=VALUE", help="Label filter (repeatable, AND).")
@click.option("--status", type=click.Choice(["pending", "ready", "failed"]), default=None)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def ls_cmd(ctx: click.Context, network: str | None, node: str | None, container: str | None,
           labels: tuple[str, ...], status: Any, as_json: bool) -> None:
    """List endpoints."""
    lbls = _pairs(labels, "--label")
    cfg = load_config(ctx)

    async def go(m: VNetManager) -> tuple[list[EndpointInfo], dict[str, str]]:
        eps = await m.list_endpoints(network=network, node=node, container=container, labels=lbls, status=status)
        nets = {n.id: n.name for n in await m.all_networks()} if eps and not as_json else {}
        return eps, nets

    eps, nets = run_async(go, cfg)
    if as_json:
        output.emit_items(eps)
        return
    filtered = any(x for x in (network, node, container, lbls, status))
    output.table(ENDPOINT_COLUMNS, _rows(eps, nets), empty="no endpoints" + (" match" if filtered else ""),
                 fold=("status", "labels"))


@endpoint.command("inspect")
@click.argument("endpoint_id")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def inspect_cmd(ctx: click.Context, endpoint_id: str, as_json: bool) -> None:
    """Show one endpoint."""
    cfg = load_config(ctx)
    e = run_async(lambda m: m.get_endpoint(endpoint_id), cfg)
    if as_json:
        output.emit(e)
        return
    rows: list[tuple[str, str]] = [
        ("id", e.id), ("container", e.container_id), ("network", e.network_id), ("driver", e.driver.value),
        ("node", e.node), ("netns", e.netns), ("interface", e.interface_name or "-"),
        ("ipv4", f"{e.ip_address}/{e.prefix_len}" if e.ip_address else "-"), ("gateway", e.gateway or "-"),
        ("ipv6", f"{e.ipv6_address}/{e.prefix_len_v6}" if e.ipv6_address else "-"),
        ("gateway v6", e.gateway_v6 or "-"), ("mac", e.mac_address or "-"), ("mtu", str(e.mtu)),
        ("status", e.status), ("reason", e.reason or "-"), ("status code", e.status_code or "-"),
        ("status at", e.status_at or "-"), ("labels", ",".join(f"{k}={v}" for k, v in sorted(e.labels.items())) or "-"),
        ("publishes", ", ".join(f"{p.host_port}->{p.container_port}/{p.protocol}" for p in e.ports) or "-"),
        ("revision", str(e.revision)), ("created", e.created_at),
    ]
    output.fields(rows, title=f"endpoint {e.id}")


def _label_args(items: tuple[str, ...]) -> tuple[dict[str, str], list[str]]:
    """``key=value`` sets a label, ``key-`` removes one (kubectl's shape)."""
    sets: dict[str, str] = {}
    removes: list[str] = []
    for item in items:
        k, sep, v = item.partition("=")
        if sep and k:
            sets[k] = v
        elif not sep and item.endswith("-") and len(item) > 1:
            removes.append(item[:-1])
        else:
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE (set) or KEY- (remove)", param_hint="LABELS")
    return sets, removes


def _show_update(rep: EndpointUpdated, dry_run: bool, names: dict[str, str], as_json: bool) -> None:
    from vnet.cli.reach import show_reach

    if as_json:
        output.emit(rep)
        return
    e = rep.endpoint
    what = ", ".join(rep.changes) or "nothing"
    if not dry_run:
        output.say(f"endpoint {escape(e.id)} ({escape(e.container_id)}): changed {what} (revision {e.revision})")
    elif not rep.changes:
        output.say(f"dry run: endpoint {escape(e.id)} would not change")
    lbls = ",".join(f"{k}={v}" for k, v in sorted(e.labels.items())) or "-"
    pubs = ", ".join(f"{p.host_port}->{p.container_port}/{p.protocol}" for p in e.ports) or "-"
    output.fields([("labels", lbls), ("publishes", pubs)], title=f"endpoint {e.id}" + (" (would be)" if dry_run
                                                                                          else ""))
    show_reach(rep.reach, dry_run=dry_run, names=names)


def _run_update(ctx: click.Context, as_json: bool, dry_run: bool, **kw: Any) -> None:
    from vnet.cli.reach import network_names

    cfg = load_config(ctx)

    async def go(m: VNetManager) -> tuple[EndpointUpdated, dict[str, str]]:
        rep = await m.update_endpoint(dry_run=dry_run, **kw)
        return rep, {} if as_json else await network_names(m, rep.reach)

    rep, names = run_async(go, cfg)
    _show_update(rep, dry_run, names, as_json)


def _update_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--json", "as_json", is_flag=True)(fn)
    fn = click.option("--dry-run", is_flag=True,
                      help="Change nothing: print the paths the change would open and close.")(fn)
    fn = click.option("--expect-revision", type=click.IntRange(0), default=None,
                      help="Only if the endpoint is still at this revision (`inspect` shows it).")(fn)
    return fn


@endpoint.command("label")
@click.argument("endpoint_id")
@click.argument("labels", nargs=-1, required=True)
@click.option("--replace", is_flag=True, help="The KEY=VALUE arguments replace all labels.")
@_update_options
@click.pass_context
def label_cmd(ctx: click.Context, endpoint_id: str, labels: tuple[str, ...], replace: bool,
              expect_revision: int | None, dry_run: bool, as_json: bool) -> None:
    """Set (KEY=VALUE) or remove (KEY-) labels of a live endpoint. Every host re-evaluates the
    allow rules that select by label within seconds; established connections keep flowing.

    \b
    vnetctl endpoint label EP role=db tier-     set role, remove tier
    vnetctl endpoint label EP role=db --dry-run  the paths it would open and close"""
    sets, removes = _label_args(labels)
    if replace and removes:
        raise click.BadParameter("--replace takes KEY=VALUE only (labels not named are removed)",
                                 param_hint="LABELS")
    _run_update(ctx, as_json, dry_run, endpoint=endpoint_id, labels=sets if replace else None,
                set_labels=None if replace else sets, remove_labels=removes, expected_revision=expect_revision)


@endpoint.command("ports")
@click.argument("endpoint_id")
@click.argument("publish", nargs=-1, metavar="[HOST:CONTAINER[/tcp|udp]]...")
@click.option("--none", "clear", is_flag=True, help="Unpublish every port.")
@_update_options
@click.pass_context
def ports_cmd(ctx: click.Context, endpoint_id: str, publish: tuple[str, ...], clear: bool,
              expect_revision: int | None, dry_run: bool, as_json: bool) -> None:
    """Replace the published ports of a live endpoint (the same HOST:CONTAINER[/proto] as
    `create --publish`); --none unpublishes all. A host port is taken atomically.

    \b
    vnetctl endpoint ports EP 8080:80 5353:53/udp
    vnetctl endpoint ports EP --none"""
    if bool(publish) == clear:
        raise click.UsageError("give the ports to publish, or --none to unpublish every port")
    ports = [parse_publish(p) for p in publish]
    _run_update(ctx, as_json, dry_run, endpoint=endpoint_id, published_ports=ports,
                expected_revision=expect_revision)


@endpoint.command("rm")
@click.argument("endpoint_ids", nargs=-1, required=True)
@click.option("--force", is_flag=True, help="Do not wait for the node; remove the record even if it is gone.")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait until the node tore it down.")
@click.option("--timeout", type=click.FloatRange(0.1, 600), default=DEFAULT_WAIT_S, show_default=True)
@click.option("--parallel", type=click.IntRange(1, 256), default=16, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def rm_cmd(ctx: click.Context, endpoint_ids: tuple[str, ...], force: bool, wait: bool, timeout: float,
           parallel: int, as_json: bool) -> None:
    """Detach endpoint(s): the node tears the interface down, the address is released."""
    cfg = load_config(ctx)
    ids = list(endpoint_ids)

    async def go(m: VNetManager) -> list[Any]:
        async def one(i: str) -> EndpointDeleted:
            return await m.delete_endpoint(i, force=force, wait=wait, wait_timeout=timeout)

        if len(ids) == 1:
            return list(await each(ids, one))
        return await _many(ids, one, parallel, "detaching", show=not as_json)

    results = run_async(go, cfg)
    done = [r for r in results if isinstance(r, EndpointDeleted)]
    errors = report_batch(ids, results, EndpointDeleted, as_json=as_json)
    if not as_json:
        for d in done[:20]:
            e = d.endpoint
            console.print(f"detached {escape(e.container_id)} from {escape(e.network_id)} [dim]({escape(e.id)})[/dim]"
                          + (f", released {escape(', '.join(d.released))}" if d.released else ""))
            for w in d.warnings:
                output.warn(w)
        if len(ids) > 20:
            console.print(f"{len(done)} detached, {len(errors)} failed")
    if errors:
        sys.exit(output.EXIT_ERROR)


def _drivers(n: NodeInfo) -> Text:
    t = Text()
    for i, (d, s) in enumerate(sorted(n.drivers.items())):
        t.append((" " if i else "") + (d if s.available else f"{d}✗"), style="green" if s.available else "red")
    return t


@endpoint.command("nodes")
@click.option("--all", "include_gone", is_flag=True, help="Also nodes whose heartbeat stopped.")
@click.option("-v", "--verbose", is_flag=True, help="Say why each unavailable driver is unavailable.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def nodes_cmd(ctx: click.Context, include_gone: bool, verbose: bool, as_json: bool) -> None:
    """Registered node workers: drivers their kernel supports, heartbeat, endpoints."""
    cfg = load_config(ctx)
    nodes = run_async(lambda m: m.nodes(include_gone=include_gone), cfg)
    if as_json:
        output.emit_items(nodes)
        return
    now = time.time()
    output.table(("node", "alive", "data plane", "host netns", "underlay", "endpoints", "drivers", "last seen"),
                 [[n.node, output.styled("yes", "green") if n.alive else output.styled("no", "red"),
                   "on" if n.dataplane else output.styled("off", "yellow"), n.host_netns or "(its own)",
                   n.underlay or "-", str(n.endpoints), _drivers(n), f"{now - n.last_seen:.0f}s ago"] for n in nodes],
                 empty="no node workers registered" if not include_gone else "no node workers ever registered",
                 title="nodes", fold=("drivers",))
    if verbose:
        for n in nodes:
            for d, s in sorted(n.drivers.items()):
                if not s.available:
                    console.print(f"{escape(n.node)} {escape(d)}: {escape(s.reason)}")
            if n.isolation is not None:
                console.print(f"{escape(n.node)} isolation: " + ("stateful (nftables + br_netfilter)"
                              if n.isolation.available else escape(n.isolation.reason)))
            for cap, s in sorted(n.capabilities.items()):  # encrypted_overlay: WireGuard here, or what to do
                console.print(f"{escape(n.node)} {escape(cap)}: " + (f"available ({escape(s.reason)})"
                              if s.available else f"unavailable: {escape(s.reason)}"))
