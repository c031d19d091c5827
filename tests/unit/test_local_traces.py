"""Local trace files (vnet.telemetry.local_traces): where they go, what a span becomes, the
rotation that bounds them, reading one trace back and its tree; which vnetctl calls print
their trace id."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode

from vnet.cli.main import mutation_trace_ids
from vnet.telemetry import local_traces as lt


def test_trace_dir_resolution(tmp_path: Path) -> None:
    assert lt.trace_dir({"VNET_TRACE_DIR": str(tmp_path / "t")}) == tmp_path / "t"
    assert lt.trace_dir({"VNET_STATE_DIR": str(tmp_path)}) == tmp_path / "traces"
    assert lt.trace_dir({"XDG_STATE_HOME": str(tmp_path)}) == tmp_path / "vnet" / "traces"
    assert lt.trace_dir({"VNET_LOCAL_TRACES": "0", "VNET_STATE_DIR": str(tmp_path)}) is None
    # a service writes only where it was told, or in the stack it runs in, never in a guessed default
    assert lt.trace_dir({"XDG_STATE_HOME": str(tmp_path)}, writer=True, cwd=tmp_path) is None
    (tmp_path / lt.STACK_FILE).write_text("{}")
    assert lt.trace_dir({}, writer=True, cwd=tmp_path) == tmp_path / "traces"
    assert lt.trace_dir({"VNET_STATE_DIR": "/x"}, writer=True, cwd=tmp_path) == Path("/x/traces")


def test_stack_file_name_is_the_stacks() -> None:
    from vnet.runtime import stack

    assert lt.STACK_FILE == stack.STACK_FILE


def _provider(tmp_path: Path, service: str = "network") -> TracerProvider:
    exp = lt.make_exporter(service, tmp_path)
    assert exp is not None
    p = TracerProvider()
    p.add_span_processor(SimpleSpanProcessor(exp))
    return p


def test_spans_written_read_back_as_a_tree(tmp_path: Path) -> None:
    tr = _provider(tmp_path).get_tracer("t")
    with tr.start_as_current_span("publish vnet.network.create", kind=SpanKind.PRODUCER) as root:
        with (tr.start_as_current_span("process vnet.network.create", kind=SpanKind.CONSUMER),
              tr.start_as_current_span("publish vnet.ipam.pool.create") as bad):
            bad.set_status(Status(StatusCode.ERROR, "pool_exists"))
        with tr.start_as_current_span("process vnet.evt.network.created"):
            pass
    with tr.start_as_current_span("another trace"):
        pass
    tid = format(root.get_span_context().trace_id, "032x")
    files = list(tmp_path.glob("*.jsonl"))
    assert [f.name for f in files] == [f"network-{os.getpid()}.jsonl"]
    spans = lt.read_trace(tmp_path, tid[:10])  # a prefix is enough
    assert len(spans) == 4 and {s.trace_id for s in spans} == {tid}
    got = [(d, s.name, s.kind) for d, s in lt.tree(spans)]
    assert got == [(0, "publish vnet.network.create", "producer"), (1, "process vnet.network.create", "consumer"),
                   (2, "publish vnet.ipam.pool.create", "internal"), (1, "process vnet.evt.network.created",
                                                                       "internal")]
    err = [s for s in spans if s.error]
    assert [(s.name, s.error) for s in err] == [("publish vnet.ipam.pool.create", "pool_exists")]
    assert all(s.end_ns >= s.start_ns and s.duration_ms >= 0 for s in spans)


def test_a_span_whose_parent_is_elsewhere_is_a_root(tmp_path: Path) -> None:
    spans = [lt.SpanRecord(trace_id="a" * 32, span_id="1" * 16, parent_id="f" * 16, name="x", service="s",
                           start_ns=2, end_ns=3),
             lt.SpanRecord(trace_id="a" * 32, span_id="2" * 16, name="y", service="s", start_ns=1, end_ns=4)]
    assert [(d, s.name) for d, s in lt.tree(spans)] == [(0, "y"), (0, "x")]


def test_rotation_bounds_the_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lt, "MAX_BYTES", 4000)
    tr = _provider(tmp_path, "ipam").get_tracer("t")
    for k in range(200):
        with tr.start_as_current_span(f"span {k}"):
            pass
    names = sorted(f.name for f in tmp_path.glob("*.jsonl"))
    assert names == [f"ipam-{os.getpid()}.jsonl", f"ipam-{os.getpid()}.old.jsonl"]
    assert all(f.stat().st_size <= 4000 for f in tmp_path.glob("*.jsonl"))
    text = (tmp_path / f"ipam-{os.getpid()}.jsonl").read_text()
    assert '"span 199"' in text and '"span 0"' not in text  # the newest kept, the oldest gone


def test_sweep_removes_files_of_dead_processes_only(tmp_path: Path) -> None:
    dead = tmp_path / "network-999999999.jsonl"
    mine = tmp_path / f"network-{os.getpid()}.jsonl"
    for f in (dead, mine):
        f.write_text("{}\n")
        os.utime(f, (1, 1))
    assert lt.sweep(tmp_path) == [dead]
    assert mine.exists() and not dead.exists()


def test_mutation_trace_ids() -> None:
    calls = [("vnet.network.get", "a"), ("vnet.network.update", "b"), ("vnet.policy.rule.put", "c"),
             ("vnet.policy.rule.put", "c"), ("vnet.network.list", "d"), ("vnet.endpoint.create", None),
             ("vnet.network.mesh.add", "e")]
    assert mutation_trace_ids(calls) == ["b", "c", "e"]
