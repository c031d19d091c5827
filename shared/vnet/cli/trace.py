"""``vnetctl trace TRACE_ID``: the span tree of one trace, from the local trace files.

Every ``vnetctl`` request is sampled and every mutation prints its trace id (on stderr,
``trace id: <32 hex digits>``); without an OTLP endpoint the processes of a local stack
keep the spans of sampled traces in ``<state dir>/traces`` (:mod:`vnet.telemetry.local_traces`).
This verb reads them and prints one line per span, children under their parent: the
start (after the first span's), the duration, the process and the span's name
(``publish <subject>`` on the caller's side, ``process <subject>`` on the service's).
"""

from __future__ import annotations

import re

import click

from vnet.cli import output
from vnet.cli.main import cli, styled
from vnet.core import errors as E
from vnet.telemetry import local_traces

_HEX = re.compile(r"^[0-9a-fA-F]{8,32}$")


@cli.command("trace")
@click.argument("trace_id")
@click.option("--dir", "directory", default=None, metavar="DIR",
              help="Where the spans are (default: $VNET_TRACE_DIR, else <state dir>/traces).")
@click.option("--json", "as_json", is_flag=True)
def trace_cmd(trace_id: str, directory: str | None, as_json: bool) -> None:
    """Print the span tree of trace TRACE_ID (all 32 hex digits, or the first 8 or more)."""
    if not _HEX.match(trace_id):
        output.fail(E.INVALID_REQUEST.code, f"{trace_id!r} is not a trace id (32 hex digits, or at least the first 8)",
                    exit_code=output.EXIT_USAGE)
    from pathlib import Path

    where = Path(directory).expanduser() if directory else local_traces.trace_dir()
    if where is None:
        output.fail(E.NOT_FOUND.code, "local traces are off (VNET_LOCAL_TRACES=0); see your OTLP backend (Jaeger)")
    spans = local_traces.read_trace(where, trace_id) if where.is_dir() else []
    ids = {s.trace_id for s in spans}
    if len(ids) > 1:
        output.fail(E.INVALID_REQUEST.code, f"{trace_id} is the start of {len(ids)} trace ids; give more digits")
    if not spans:
        output.fail(E.NOT_FOUND.code, f"no span of trace {trace_id} under {where}; spans are kept there only when "
                    "no OTLP endpoint is configured (else look in Jaeger), and only for traces a vnetctl command "
                    "started (the id it printed), for the last few thousand traces per process")
    rows = local_traces.tree(spans)
    t0 = min(s.start_ns for s in spans)
    t1 = max(s.end_ns for s in spans)
    if as_json:
        output.emit({"trace_id": spans[0].trace_id, "duration_ms": round((t1 - t0) / 1e6, 3),
                     "spans": [{"depth": d, **output.to_builtins(s), "duration_ms": round(s.duration_ms, 3)}
                               for d, s in rows]})
        return
    procs = len({s.service for s in spans})
    title = f"trace {spans[0].trace_id}: {len(spans)} spans in {procs} process(es), {(t1 - t0) / 1e6:.1f} ms"
    cells: list[list[output.Cell]] = []
    for depth, s in rows:
        name: output.Cell = "  " * depth + s.name
        if s.error:
            name = styled(f"{'  ' * depth}{s.name}  error: {s.error}", "red")
        cells.append([f"+{(s.start_ns - t0) / 1e6:.1f} ms", f"{s.duration_ms:.1f} ms", s.service, name])
    output.table(("start", "duration", "process", "span"), cells, empty="no spans", title=title,
                 right=("start", "duration"))
