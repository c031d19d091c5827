"""Spans kept on the local disk when no OTLP endpoint is configured, and the span tree
``vnetctl trace <trace-id>`` prints.

Where: ``$VNET_TRACE_DIR``, else ``<state dir>/traces``. A service or node worker writes
there only when it knows its stack's state directory — ``$VNET_STATE_DIR``, or its working
directory when that is a stack's (the embedded stack starts its processes in its state
directory, next to ``stack.json``) — so a process started elsewhere (a test, a one-off run)
leaves no files behind. ``vnetctl`` resolves the state directory as the stack does
(``$VNET_STATE_DIR``, else ``$XDG_STATE_HOME/vnet``, else ``~/.local/state/vnet``) and
writes its own spans there only when a stack has lived there (``stack.json``) or the
directory was given.
``VNET_LOCAL_TRACES=0`` turns it off.

What: every process writes the spans it records to its own file,
``<service>-<pid>.jsonl`` (one JSON object per span, appended by the SDK's batch
processor thread, so a request never waits for the disk). A file that grows past
:data:`MAX_BYTES` becomes ``<service>-<pid>.old.jsonl`` (replacing the previous one) and a
new one starts: each process keeps its last 2 x 2 MB of spans, roughly the last few
thousand traces. Files of processes that are gone are removed after :data:`STALE_S`.

Which spans: without an OTLP endpoint a service records a span only when its caller's
trace is sampled (``ParentBased(ALWAYS_OFF)``, :func:`vnet.telemetry.tracing.make_tracer_provider`);
``vnetctl`` samples every request it makes, so a command's trace is recorded end to end —
the client's request, each service's handling and the calls it makes, the node worker's
work on the events it caused — and nothing else costs more than before.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec

STACK_FILE = "stack.json"  # vnet.runtime.stack.STACK_FILE (this layer does not import the runtime)
MAX_BYTES = 2 * 1024 * 1024
STALE_S = 24 * 3600.0
SUFFIX = ".jsonl"


class SpanRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    trace_id: str
    span_id: str
    parent_id: str | None = None
    name: str
    service: str
    kind: str = ""
    start_ns: int
    end_ns: int
    error: str | None = None  # the status description of a span that failed
    attributes: dict[str, str] = {}

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


def trace_dir(env: Mapping[str, str] | None = None, *, writer: bool = False,
              cwd: Path | None = None) -> Path | None:
    """The directory local spans are in (``None``: turned off). ``writer`` (a service or a
    node worker): only a state directory it was told or runs in, never a guessed default."""
    env = os.environ if env is None else env
    if env.get("VNET_LOCAL_TRACES", "1") in ("0", "false", "no", "off"):
        return None
    if env.get("VNET_TRACE_DIR"):
        return Path(env["VNET_TRACE_DIR"]).expanduser()
    if writer and not env.get("VNET_STATE_DIR"):
        here = Path.cwd() if cwd is None else cwd
        return here / "traces" if (here / STACK_FILE).exists() else None
    if env.get("VNET_STATE_DIR"):
        base = Path(env["VNET_STATE_DIR"]).expanduser()
    elif env.get("XDG_STATE_HOME"):
        base = Path(env["XDG_STATE_HOME"]).expanduser() / "vnet"
    else:
        base = Path("~/.local/state/vnet").expanduser()
    return base / "traces"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep(directory: Path, now: float | None = None) -> list[Path]:
    """Remove the files of processes that are gone and were last written ``STALE_S`` ago."""
    now = time.time() if now is None else now
    gone = []
    for f in directory.glob(f"*{SUFFIX}"):
        pid_part = f.name.removesuffix(SUFFIX).removesuffix(".old").rsplit("-", 1)[-1]
        if not pid_part.isdigit() or _pid_alive(int(pid_part)):
            continue
        with contextlib.suppress(OSError):
            if now - f.stat().st_mtime > STALE_S:
                f.unlink()
                gone.append(f)
    return gone


def make_exporter(service: str, directory: Path | None = None, *, client: bool = False) -> Any:
    """A span exporter writing this process's spans under ``directory`` (``None``:
    :func:`trace_dir`; ``client``: vnetctl's resolution), or ``None`` when local traces are
    off or the directory cannot be made."""
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    found = directory or trace_dir(writer=not client)
    if found is None:
        return None
    if (client and directory is None and not os.environ.get("VNET_TRACE_DIR")
            and not os.environ.get("VNET_STATE_DIR") and not (found.parent / STACK_FILE).exists()):
        return None  # no stack has lived in the default state directory: nothing to add the client's spans to
    d: Path = found
    try:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        sweep(d)
    except OSError:
        return None

    class LocalSpanExporter(SpanExporter):
        def __init__(self) -> None:
            self.path = d / f"{service}-{os.getpid()}{SUFFIX}"
            self.old = d / f"{service}-{os.getpid()}.old{SUFFIX}"
            self._lock = threading.Lock()

        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            lines = b"".join(msgspec.json.encode(to_record(s, service)) + b"\n" for s in spans)
            try:
                with self._lock:
                    if self.path.exists() and self.path.stat().st_size + len(lines) > MAX_BYTES:
                        os.replace(self.path, self.old)
                    fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                    try:
                        os.write(fd, lines)
                    finally:
                        os.close(fd)
            except OSError:
                return SpanExportResult.FAILURE
            return SpanExportResult.SUCCESS

        def shutdown(self) -> None:
            return None

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return True

    return LocalSpanExporter()


def to_record(span: Any, default_service: str) -> SpanRecord:
    """An SDK ``ReadableSpan`` as a :class:`SpanRecord`."""
    ctx = span.get_span_context()
    parent = span.parent
    res = getattr(span, "resource", None)
    service = str(res.attributes.get("service.name", default_service)) if res is not None else default_service
    status = span.status
    err = None
    if status is not None and status.status_code.name == "ERROR":
        err = status.description or "error"
    attrs = {str(k): str(v) for k, v in list((span.attributes or {}).items())[:16]}
    return SpanRecord(trace_id=format(ctx.trace_id, "032x"), span_id=format(ctx.span_id, "016x"),
                      parent_id=format(parent.span_id, "016x") if parent is not None else None,
                      name=span.name, service=service.removeprefix("vnet-"),
                      kind=span.kind.name.lower() if span.kind is not None else "",
                      start_ns=span.start_time or 0, end_ns=span.end_time or span.start_time or 0, error=err,
                      attributes=attrs)


def read_trace(directory: Path, trace_id: str) -> list[SpanRecord]:
    """Every span of ``trace_id`` (32 hex digits, or a unique prefix of at least 8) in ``directory``."""
    want = trace_id.lower()
    out: list[SpanRecord] = []
    needle = f'"trace_id":"{want}'.encode()
    for f in sorted(directory.glob(f"*{SUFFIX}")):
        try:
            data = f.read_bytes()
        except OSError:
            continue
        for line in data.splitlines():
            if needle not in line:
                continue
            try:
                out.append(msgspec.json.decode(line, type=SpanRecord))
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue  # a line cut by a crash mid-write
    return out


def tree(spans: Iterable[SpanRecord]) -> list[tuple[int, SpanRecord]]:
    """(depth, span) in display order: roots (spans whose parent is not here) by start time,
    each followed by its children by start time."""
    by_id = {s.span_id: s for s in spans}
    kids: dict[str | None, list[SpanRecord]] = {}
    for s in by_id.values():
        parent = s.parent_id if s.parent_id in by_id else None
        kids.setdefault(parent, []).append(s)
    for v in kids.values():
        v.sort(key=lambda s: (s.start_ns, s.span_id))
    out: list[tuple[int, SpanRecord]] = []

    def walk(parent: str | None, depth: int) -> None:
        for s in kids.get(parent, []):
            out.append((depth, s))
            walk(s.span_id, depth + 1)

    walk(None, 0)
    return out
