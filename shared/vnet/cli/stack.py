"""``vnetctl up`` / ``vnetctl down``: the embedded local stack (see docs/local-stack.md)."""

from __future__ import annotations

import asyncio
import datetime as dt
import sys
import time
from pathlib import Path
from typing import NoReturn

import click
import msgspec

from vnet.cli import output
from vnet.cli.main import cli
from vnet.core import errors as E
from vnet.core.errors import VNetError
from vnet.runtime import stack
from vnet.runtime.config import VNetConfig

PORT = click.IntRange(1, 65535)


def _echo(msg: str) -> None:
    # Under --json stdout holds only the JSON document: progress goes to stderr.
    click.echo(msg, err=output.MODE.json)


def _event(msg: str) -> None:
    # Timestamped: in a detached stack these lines are all supervisor.log has.
    click.echo(f"{dt.datetime.now():%H:%M:%S} {msg}", err=output.MODE.json)


def _fail(err: stack.StackError) -> NoReturn:
    # Messages quote logs and paths: output.fail never reads them as markup.
    output.fail(E.UNPROCESSABLE.code, err.message, exit_code=err.exit_code)


async def _demo(config: VNetConfig, say: stack.Say) -> int:
    """``up --demo`` in the foreground: the supervisor runs it once the stack is ready."""
    from vnet.demo import run_demo

    return await run_demo(config, say=say)


def _state_dir(given: Path | None) -> Path:
    return (given or stack.default_state_dir()).expanduser().absolute()


def _supervisor_argv(config_path: str | None, opts: stack.StackOptions) -> list[str]:
    """The command line of the background supervisor: this same ``up``, in the foreground."""
    argv: list[str] = []
    if config_path:
        argv += ["--config", str(Path(config_path).absolute())]
    argv += ["up", "--foreground-supervisor", "--state-dir", str(opts.state_dir),
             "--ready-timeout", str(opts.ready_timeout), "--stop-timeout", str(opts.stop_timeout)]
    for flag, value in (("--nats-url", opts.nats_url), ("--redis-url", opts.redis_url),
                        ("--nats-port", opts.nats_port), ("--redis-port", opts.redis_port),
                        ("--metrics-port", opts.metrics_port), ("--node-id", opts.node_id)):
        if value is not None:
            argv += [flag, str(value)]
    if opts.host_root_netns:
        argv.append("--host-root-netns")
    if opts.cluster > 1:
        argv += ["--cluster", str(opts.cluster)]
    if opts.replicas > 1:
        argv += ["--replicas", str(opts.replicas)]
    if opts.replicated_valkey:
        argv.append("--replicated-valkey")
    return stack.entry_argv("vnetctl", "vnet.cli.main", "main", argv)


@cli.command()
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where data, logs and stack.json live (default $VNET_STATE_DIR, else ~/.local/state/vnet).")
@click.option("--nats-url", default=None, help="Use this existing NATS server (JetStream on) instead of starting one.")
@click.option("--redis-url", default=None, help="Use this existing Redis/Valkey server instead of starting one.")
@click.option("--nats-port", type=PORT, default=None, help="Port for the stack's nats-server (default: a free one).")
@click.option("--redis-port", type=PORT, default=None, help="Port for the stack's valkey-server (default: a free one).")
@click.option("--metrics-port", type=PORT, default=None, help="Port for /metrics (default: a free one).")
@click.option("--node-id", default=None, help="Node id of the node worker (default: the short hostname).")
@click.option("--cluster", type=click.IntRange(min=1, max=9), default=1, show_default=True,
              help="Run N nats-servers joined by routes on loopback, the event stream with min(3, N) replicas; "
              "every process gets every server's URL (docs/scale.md).")
@click.option("--replicas", type=click.IntRange(min=1, max=9), default=1, show_default=True,
              help="Run N instances of each API service (ipam, network, endpoint, policy) in its queue group.")
@click.option("--replicated-valkey", is_flag=True,
              help="Run a Valkey primary, one replica and three Sentinels on loopback; every process finds the "
              "primary through the Sentinels and follows a failover (docs/scale.md).")
@click.option("--host-root-netns", is_flag=True,
              help="Let the node worker manage THIS MACHINE's network namespace instead of a sandbox one (root).")
@click.option("-d", "--detach", is_flag=True, help="Run in the background; return once everything answers health.")
@click.option("--demo", is_flag=True, help="Once ready, show the main job end to end: networks, containers, "
              "who reaches whom and why (then removed; the stack keeps running).")
@click.option("--ready-timeout", type=click.FloatRange(min=1), default=30.0, show_default=True,
              help="Seconds to wait for every service to answer health.")
@click.option("--stop-timeout", type=click.FloatRange(min=0.5), default=10.0, show_default=True,
              help="Seconds a process gets after SIGTERM before SIGKILL.")
@click.option("--foreground-supervisor", is_flag=True, hidden=True,
              help="Internal: the background supervisor that --detach starts.")
@click.option("--json", "as_json", is_flag=True,
              help="With --detach: print the stack (addresses, pids, state dir) as JSON once it is ready.")
@click.pass_context
def up(ctx: click.Context, state_dir: Path | None, nats_url: str | None, redis_url: str | None,
       nats_port: int | None, redis_port: int | None, metrics_port: int | None, node_id: str | None,
       host_root_netns: bool, cluster: int, replicas: int, replicated_valkey: bool, detach: bool, demo: bool,
       ready_timeout: float, stop_timeout: float,
       foreground_supervisor: bool, as_json: bool) -> None:
    """Start NATS, Redis, the five services and a node worker, and supervise them.

    Runs in the foreground until Ctrl-C (or `vnetctl down`), unless --detach.
    """
    if as_json and (not detach or demo):
        raise click.UsageError("--json goes with --detach (without --demo): a foreground stack prints a log, not "
                               "one document")
    if nats_url and cluster > 1:
        raise click.UsageError("--cluster starts the stack's own nats-servers; it has no effect with --nats-url")
    if redis_url and replicated_valkey:
        raise click.UsageError("--replicated-valkey starts the stack's own Valkey servers; it has no effect with "
                               "--redis-url")
    if nats_url and nats_port:
        raise click.UsageError("--nats-port is for the stack's own nats-server; it has no effect with --nats-url")
    if redis_url and redis_port:
        raise click.UsageError("--redis-port is for the stack's own valkey-server; it has no effect with --redis-url")
    if node_id is not None and not stack.valid_node_id(node_id):
        raise click.UsageError(f"--node-id {node_id!r} may hold only letters, digits, '-' and '_'")
    opts = stack.StackOptions(
        state_dir=_state_dir(state_dir), nats_url=nats_url, redis_url=redis_url, nats_port=nats_port,
        redis_port=redis_port, metrics_port=metrics_port, node_id=node_id, host_root_netns=host_root_netns,
        ready_timeout=ready_timeout, stop_timeout=stop_timeout, detached=detach or foreground_supervisor,
        demo=demo, cluster=cluster, replicas=replicas, replicated_valkey=replicated_valkey)
    config_path = ctx.obj.get("config_path")
    try:
        # Not load_config(): that would point at a running stack; `up` makes its own.
        config = VNetConfig.load(config_path)
    except VNetError as err:
        output.fail_with(err, output.EXIT_USAGE)

    try:
        if detach and not foreground_supervisor:
            running = stack.running_stack(opts.state_dir)
            if running is not None:
                raise stack.StackError(
                    f"a local stack is already running from {opts.state_dir} (supervisor pid "
                    f"{running.supervisor_pid}); `vnetctl down --state-dir {opts.state_dir}` stops it")
            t0 = time.monotonic()
            st = stack.start_detached(_supervisor_argv(config_path, opts), opts.state_dir,
                                      timeout=ready_timeout + 30, say=_event)
            if as_json:
                output.emit(st)
                return
            _echo(stack.format_summary(st, elapsed=time.monotonic() - t0))
            if demo:
                from vnet.demo import run_demo

                cfg = msgspec.structs.replace(config, **st.connection_settings())  # URLs and credentials
                sys.exit(asyncio.run(run_demo(cfg, say=_echo)))
            return
        sup = stack.Supervisor(opts, config, say=_event, show=_echo, demo=_demo if demo else None)
        sup.prepare()
        code = sup.run()
    except stack.StackError as err:
        _fail(err)
    except KeyboardInterrupt:
        _event("interrupted before the stack started; nothing left running")
        sys.exit(130)
    sys.exit(code)


@cli.command()
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="State directory of the stack (default $VNET_STATE_DIR or ~/.local/state/vnet).")
@click.option("--timeout", type=click.FloatRange(min=1), default=30.0, show_default=True,
              help="Seconds to wait for the supervisor before killing it.")
@click.option("--json", "as_json", is_flag=True, help='Print {"stopped": bool, "state_dir": ...}.')
def down(state_dir: Path | None, timeout: float, as_json: bool) -> None:
    """Stop the local stack: every process, the sandbox namespace, the state file.

    Data (NATS JetStream, Redis) and logs stay in the state directory.
    """
    sd = _state_dir(state_dir)
    try:
        stopped = stack.stop_stack(sd, say=_event, timeout=timeout)
    except stack.StackError as err:
        _fail(err)
    if as_json:
        output.emit({"stopped": stopped, "state_dir": str(sd)})
    elif stopped:
        _event("stopped; nothing of the stack is left running")
    else:
        _echo(f"no local stack runs from {sd} (no {stack.STACK_FILE}); nothing to stop")
