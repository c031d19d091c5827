"""``vnetctl`` entry point: one click group, verbs grouped by resource."""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib.metadata
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import click

import vnet
from vnet.cli import output
from vnet.cli.output import console, err_console, escape, styled
from vnet.client import VNetManager
from vnet.contracts import subjects
from vnet.core import errors as E
from vnet.core.errors import VNetError
from vnet.runtime.config import VNetConfig

__all__ = ["cli", "console", "each", "err_console", "escape", "load_config", "main", "print_json",
           "report_batch", "run_async", "styled"]

T = TypeVar("T")
R = TypeVar("R")


class VNetCli(click.Group):
    """The root group: knows before parsing whether ``--json`` was asked for, so that usage
    errors and failures come out as the JSON error document too (docs/cli.md)."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        # `--json` is a flag of every verb; one after `--` is an argument, not the flag.
        head = argv[:argv.index("--")] if "--" in argv else argv
        output.configure("--json" in head)
        try:
            rv = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as exc:
            if output.MODE.json:
                output.fail(E.USAGE.code, exc.format_message(), exit_code=exc.exit_code)
            exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:
            output.err_console.print("Aborted!")
            sys.exit(1)
        except VNetError as err:  # a verb that called the client directly
            output.fail_with(err)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


# The last word of a subject that changes something: its trace id is printed (stderr).
MUTATING_VERBS = frozenset({"create", "update", "delete", "connect", "disconnect", "add", "remove", "put",
                            "request", "release", "exclude", "gc", "attach", "detach", "resync", "teardown"})


def mutation_trace_ids(calls: Sequence[tuple[str, str | None]]) -> list[str]:
    """The trace ids of the calls that change something, once each, in order."""
    out: list[str] = []
    for template, tid in calls:
        if tid and template.rsplit(".", 1)[-1] in MUTATING_VERBS and tid not in out:
            out.append(tid)
    return out


def run_async(fn: Callable[[VNetManager], Awaitable[T]], config: VNetConfig) -> T:
    from vnet.telemetry import tracing

    # Every request of vnetctl is sampled: the services record the whole trace (to the OTLP
    # endpoint, else to the local trace files `vnetctl trace` reads).
    provider = tracing.make_tracer_provider("vnetctl", config.otlp_endpoint, sample_all=True)
    tracing.use_tracer_provider(provider)
    calls: list[tuple[str, str | None]] = []

    async def go() -> T:
        async with VNetManager(config) as m:
            try:
                return await fn(m)
            finally:
                calls.extend(m.trace_ids)

    try:
        result = asyncio.run(go())
    except VNetError as err:
        output.fail_with(err)
    finally:
        tracing.use_tracer_provider(None)
        shutdown = getattr(provider, "shutdown", None)
        if shutdown is not None:
            shutdown()  # flush the client's spans before the process ends
    for tid in mutation_trace_ids(calls):
        err_console.print(styled(f"trace id: {tid}", "dim"), highlight=False)
    return result


def print_json(obj: Any) -> None:
    output.emit(obj)


async def each(items: Sequence[str], fn: Callable[[str], Awaitable[R]]) -> list[R | VNetError]:
    """``fn`` over every argument of a multi-argument verb, in order; a failure is kept, not raised
    (the verb reports every result and exits 1 if any failed)."""
    out: list[R | VNetError] = []
    for item in items:
        try:
            out.append(await fn(item))
        except VNetError as err:
            out.append(err)
    return out


def report_batch(refs: Sequence[str], results: Sequence[Any], ok_type: type[Any], *,
                 as_json: bool) -> list[tuple[str, VNetError]]:
    """The results of a multi-argument verb: ``{"items", "errors"}`` under --json, else an error
    line per failure (the caller prints the successes). Returns the failures."""
    errors = [(r, x) for r, x in zip(refs, results, strict=True) if isinstance(x, VNetError)]
    if as_json:
        output.emit({"items": [x for x in results if isinstance(x, ok_type)],
                     "errors": [{"ref": r, **output.vnet_error_doc(e)} for r, e in errors]})
    else:
        for r, e in errors:
            output.print_error(e.code, e.message, trace_id=e.trace_id, subject=r)
    return errors


def _version() -> str:
    try:
        return importlib.metadata.version("vnet")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree without an install
        return vnet.__version__


@click.group(cls=VNetCli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(_version(), prog_name="vnetctl", message="%(prog)s %(version)s")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Config file (TOML/YAML/JSON); default $VNET_CONFIG.")
@click.option("--nats", "nats_url", default=None, help="NATS URL (default $VNET_NATS_URL or the running local stack).")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, nats_url: str | None) -> None:
    """VNet: isolated networks for containers.

    Every verb takes --json (one JSON document on stdout, errors included); piped output is
    tab-separated. Exit codes: 0 ok, 1 a request failed, 2 usage or config, 3 `status`: a
    service is not running, 4 `health`: degraded.
    """
    ctx.ensure_object(dict)
    ctx.obj["config_path"] = config_path
    ctx.obj["nats_url"] = nats_url


def load_config(ctx: click.Context) -> VNetConfig:
    from vnet.runtime import stack

    overrides: dict[str, Any] = {}
    if ctx.obj.get("nats_url"):
        overrides["nats_url"] = ctx.obj["nats_url"]
    try:
        cfg = VNetConfig.load(ctx.obj.get("config_path"), **overrides)
    except VNetError as err:
        output.fail_with(err, output.EXIT_USAGE)
    return stack.apply_running_stack(cfg, explicit_nats=bool(overrides))


def _uptime(started: str) -> str:
    try:
        t = dt.datetime.fromisoformat(started.replace("Z", "+00:00"))
    except ValueError:
        return "?"
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    s = int((dt.datetime.now(dt.UTC) - t).total_seconds())
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Every running VNet service: instances, version, uptime, requests and errors.

    Exit code 3 when a service (or the node worker) is not running."""
    cfg = load_config(ctx)
    rows = run_async(lambda m: m.services(), cfg)
    seen = {r.name for r in rows}
    missing = [s for s in (*subjects.SERVICES, subjects.NODE_SERVICE) if s not in seen]
    if as_json:
        output.emit_items(rows, missing=missing)
    else:
        cells: list[list[output.Cell]] = [
            [r.name, r.metadata.get("vnet.node", ""), r.id, r.version, _uptime(r.started), str(r.requests),
             str(r.errors)] for r in rows]
        cells += [[styled(s, "red"), "", styled("not running", "red"), "", "", "", ""] for s in missing]
        output.table(("service", "node", "instance", "version", "uptime", "requests", "errors"), cells,
                     empty="no VNet service answered", title=f"VNet services on {cfg.nats_url}",
                     right=("requests", "errors"))
    if missing:
        sys.exit(output.EXIT_NOT_RUNNING)


@cli.command()
@click.argument("service", type=click.Choice([*subjects.SERVICES, subjects.NODE_SERVICE]))
@click.option("--node", default=None, help="Node id (for the node worker).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def health(ctx: click.Context, service: str, node: str | None, as_json: bool) -> None:
    """Ask one service (or a node worker) for its health (exit code 4 when degraded)."""
    if service == subjects.NODE_SERVICE and not node:
        raise click.UsageError("the health of a node worker needs --node NODE (`vnetctl endpoint nodes` lists them)")
    cfg = load_config(ctx)
    rep = run_async(lambda m: m.health(service, node=node), cfg)
    if as_json:
        output.emit(rep)
    else:
        color = "green" if rep.status == "ok" else "yellow"
        output.say(f"{escape(rep.service)} [{color}]{escape(rep.status)}[/{color}] instance {escape(rep.instance)} "
                   f"v{escape(rep.version)} up {rep.uptime_s:.0f}s")
        for k, v in rep.checks.items():
            output.say(f"  {escape(k)}: {escape(str(v))}")
    if rep.status != "ok":
        # Healthchecks (compose, supervisors) read the exit code: degraded is not healthy.
        sys.exit(output.EXIT_DEGRADED)


def main() -> None:
    # Each module registers its verbs on `cli` when imported.
    register()
    cli(obj={})


def register() -> None:
    """Import the verb modules (each adds its verbs to ``cli``); tests call this before invoking."""
    from vnet.cli import (  # noqa: F401
        cni,
        container,
        demo,
        endpoint,
        ipam,
        network,
        node,
        node_drift,  # after node: adds `drift` to its group
        policy,
        reach,
        stack,
        trace,
    )


if __name__ == "__main__":
    main()
