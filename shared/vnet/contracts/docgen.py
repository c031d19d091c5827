"""Generate the contract document from the code: ``docs/contract/``.

* ``schemas.json`` — JSON Schema (draft 2020-12, ``$defs``) of every request, reply,
  event and error type on the wire, from the msgspec types;
* ``asyncapi.json`` — an AsyncAPI 3.0 document: one channel and one ``receive``
  operation (with its reply) per service operation, the published subjects with a
  known payload (events, metrics reports), every other subject constant listed;
* ``errors.md`` — the error code table from :func:`vnet.core.errors.all_codes`.

Run ``python -m vnet.contracts.docgen`` to rewrite them, ``--check`` to fail (exit 1,
with a diff) when the checked-in copy is not what the code says.

Operations are discovered, not listed: every ``vnet.svc.<name>.service`` module's
``SERVICE`` (a :class:`vnet.runtime.service.ServiceDef`) is imported and its ``ops``
read (subject template, request type, and the reply type from the handler's return
annotation); the ``health`` operation the runtime adds to every service is added the
same way here. The service modules are imported with :mod:`importlib` inside
:func:`discover_services`, at call time only: ``vnet.contracts`` does not depend on the
services (the import-linter contract "nothing imports the services except the
launcher" holds for every module that *uses* contracts), this module is a build tool
that nothing imports, and it duck-types the service definitions instead of importing
``vnet.runtime`` so the contracts layer stays below the runtime.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.util
import inspect
import json
import pkgutil
import re
import sys
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from vnet.contracts import codec, subjects
from vnet.contracts import headers as H
from vnet.contracts.messages import Empty, HealthReply, MetricsReport
from vnet.contracts.subjects import Subject
from vnet.core import errors as E

ASYNCAPI_FILE = "asyncapi.json"
SCHEMAS_FILE = "schemas.json"
ERRORS_FILE = "errors.md"
FILES = (ASYNCAPI_FILE, SCHEMAS_FILE, ERRORS_FILE)
REGENERATE = "python -m vnet.contracts.docgen"

# Subjects something publishes without an operation behind them, and their payload.
# (Events are added from the tagged msgspec types found in vnet.contracts.)
PUBLISHED: dict[str, tuple[type[Any], str]] = {
    subjects.METRICS_REPORT.template: (
        MetricsReport,
        "Every service instance publishes its cumulative operation counters here every "
        "`metrics_report_interval_s` (core NATS, not JetStream: a newer report replaces the older); "
        "the metrics service sums them into `vnet_operation*` metrics.",
    ),
}

_PARAM = re.compile(r"\{([a-z_]+)\}")
_PARAM_DOC = {
    "node": "The node worker's id (`vnet-node --node-id`, default the host name).",
    "service": "The reporting service's name.",
    "instance": "The reporting service instance's id (its `nats.micro` id).",
    "domain": "The event's domain: `network`, `endpoint`, `node`, ...",
    "event": "The event's name within its domain.",
    "id": "The id of the object the event is about.",
}


class DocgenError(Exception):
    """The code cannot be described (a handler without a usable return annotation, ...)."""


@dataclass(frozen=True)
class OpDoc:
    """One request/reply operation as it appears on the wire."""

    service: str
    name: str
    subject: str  # the template, e.g. ``vnet.node.{node}.health``
    request: Any  # a msgspec-describable type
    reply: Any  # a msgspec-describable type, or None for an empty ``{}`` reply
    summary: str


@dataclass(frozen=True)
class ServiceDoc:
    name: str
    description: str
    version: str
    ops: tuple[OpDoc, ...]


# --- discovery ------------------------------------------------------------------------


def service_module_names() -> list[str]:
    """``vnet.svc.<name>.service`` for every service package installed, sorted."""
    pkg = importlib.import_module("vnet.svc")
    names = []
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.ispkg and importlib.util.find_spec(f"vnet.svc.{info.name}.service") is not None:
            names.append(f"vnet.svc.{info.name}.service")
    return sorted(names)


def _reply_type(service: str, op_name: str, handler: Callable[..., Any]) -> Any:
    try:
        hints = typing.get_type_hints(handler, include_extras=True)
    except Exception as exc:
        raise DocgenError(f"cannot resolve the annotations of {service}.{op_name} "
                          f"({getattr(handler, '__qualname__', handler)!r}): {exc}") from None
    if "return" not in hints:
        raise DocgenError(f"{service}.{op_name}: the handler {handler.__qualname__} has no return annotation; "
                          "annotate it with the reply type (or None for an empty reply)")
    ret = hints["return"]
    origin = typing.get_origin(ret)
    if origin is not None and getattr(origin, "__name__", "") in ("Awaitable", "Coroutine"):
        ret = typing.get_args(ret)[-1]
    return None if ret is type(None) else ret


def _describe(defn: Any, module: str) -> ServiceDoc:
    name = getattr(defn, "name", None)
    ops = getattr(defn, "ops", None)
    if not isinstance(name, str) or not isinstance(ops, list):
        raise DocgenError(f"{module}.SERVICE is not a ServiceDef (no .name / .ops)")
    health_subject = getattr(defn, "health_subject", None) or subjects.health(name)
    docs = [OpDoc(name, "health", str(health_subject), Empty, HealthReply,
                  f"Health of one {name} instance: its checks (NATS, Redis, ...) and uptime.")]
    for op in ops:
        subject = op.subject
        if not isinstance(subject, Subject):
            raise DocgenError(f"{name}.{op.name}: subject {subject!r} is not a vnet.contracts.subjects.Subject")
        doc = (getattr(op.handler, "__doc__", None) or "").strip().split("\n\n")[0]
        docs.append(OpDoc(name, str(op.name), subject.template, op.req_type,
                          _reply_type(name, op.name, op.handler), " ".join(doc.split())))
    return ServiceDoc(name, str(getattr(defn, "description", "")), str(getattr(defn, "version", "")), tuple(docs))


def discover_services(modules: Iterable[str] | None = None) -> list[ServiceDoc]:
    """Import each service module (at call time, see the module docstring) and describe it."""
    out = []
    for modname in service_module_names() if modules is None else modules:
        mod = importlib.import_module(modname)
        defn = getattr(mod, "SERVICE", None)
        if defn is None:
            raise DocgenError(f"{modname} has no SERVICE")
        out.append(_describe(defn, modname))
    return sorted(out, key=lambda s: s.name)


def _contract_modules() -> list[Any]:
    pkg = importlib.import_module("vnet.contracts")
    mods = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name == "docgen":
            continue
        mods.append(importlib.import_module(f"vnet.contracts.{info.name}"))
    return mods


def _structs_of(mod: Any) -> list[type[msgspec.Struct]]:
    found = []
    for value in vars(mod).values():
        if isinstance(value, type) and issubclass(value, msgspec.Struct) and value.__module__ == mod.__name__:
            found.append(value)
    return found


def contract_types() -> list[type[msgspec.Struct]]:
    """Every msgspec Struct defined in a ``vnet.contracts`` module (the wire types)."""
    out: list[type[msgspec.Struct]] = []
    for mod in _contract_modules():
        out.extend(_structs_of(mod))
    return out


def event_types() -> list[type[msgspec.Struct]]:
    """The tagged msgspec Structs of ``vnet.contracts`` (the events' tagged union members)."""
    return [t for t in contract_types() if t.__struct_config__.tag is not None]


# --- building -------------------------------------------------------------------------


def _type_key(tp: Any) -> str:
    return f"{getattr(tp, '__module__', '')}.{getattr(tp, '__qualname__', repr(tp))}"


def _cleandocs(obj: Any) -> Any:
    """Every ``description`` dedented the same way, whatever msgspec version rendered it.

    msgspec 0.23 started dedenting docstrings itself; earlier versions copied ``__doc__``
    verbatim. ``inspect.cleandoc`` of either gives one text, so the checked-in contract
    depends on our docstrings only, not on the library's release.
    """
    if isinstance(obj, dict):
        return {k: inspect.cleandoc(v) if k == "description" and isinstance(v, str) else _cleandocs(v)
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cleandocs(v) for v in obj]
    return obj


def _components(types: Sequence[Any], ref_template: str) -> tuple[dict[Any, dict[str, Any]], dict[str, Any]]:
    """Schema per type (a ``$ref`` for Structs) and the shared definitions."""
    schemas, components = msgspec.json.schema_components(types, ref_template=ref_template)
    by_type = {_type_key(t): _cleandocs(s) for t, s in zip(types, schemas, strict=True)}
    return by_type, _cleandocs(dict(sorted(components.items())))


def _all_types(services: Sequence[ServiceDoc], events: Sequence[Any]) -> list[Any]:
    seen: dict[str, Any] = {}

    def add(tp: Any) -> None:
        if tp is not None:
            seen.setdefault(_type_key(tp), tp)

    for s in services:
        for op in s.ops:
            add(op.request)
            add(op.reply)
    for tp, _ in PUBLISHED.values():
        add(tp)
    for tp in events:
        add(tp)
    add(codec.ErrorBody)
    for tp in contract_types():
        add(tp)
    return [seen[k] for k in sorted(seen)]


def _params(template: str) -> dict[str, Any]:
    return {p: {"description": _PARAM_DOC.get(p, f"The `{p}` token of the subject.")}
            for p in _PARAM.findall(template)}


def _headers(props: dict[str, str], required: Sequence[str] = ()) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": {
        k: {"type": "string", "description": v} for k, v in props.items()}}
    if required:
        schema["required"] = list(required)
    return schema


_TRACE_HEADERS = {
    H.TRACEPARENT: "W3C trace context of the sender's span (optional; a new trace starts without it).",
    H.TRACESTATE: "W3C trace state (optional).",
    H.DEADLINE: "The caller's deadline, Unix time in milliseconds (optional; VNet clients always send it). "
                "A service does not start work whose deadline has passed (504 `deadline_exceeded`); work it "
                "started, it finishes.",
}
_REPLY_HEADERS = {
    H.TRACE_ID: "Id of the trace this request belongs to (when tracing is on); find it in Jaeger.",
}
_ERROR_HEADERS = {
    H.ERROR: "A message for people (same as the body's `message`).",
    H.ERROR_CODE: "The HTTP-like status as a numeric string: 400, 404, 409, 413, 422, 423, 500, 503, 504.",
    H.INSTANCE: "The service instance that answered.",
    **_REPLY_HEADERS,
}


def _payload(schema_by_type: dict[str, dict[str, Any]], tp: Any) -> dict[str, Any]:
    if tp is None:
        return {"type": "object", "description": "An empty object `{}`.", "additionalProperties": False}
    return schema_by_type[_type_key(tp)]


def _type_name(tp: Any) -> str | None:
    return None if tp is None else str(getattr(tp, "__name__", repr(tp)))


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("vnet")
    except Exception:
        return "0.0.0"


def build_asyncapi(services: Sequence[ServiceDoc], events: Sequence[Any]) -> dict[str, Any]:
    types = _all_types(services, events)
    by_type, components = _components(types, "#/components/schemas/{name}")
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {
        "error": {
            "name": "Error",
            "title": "Error reply",
            "summary": "Any operation may answer with this instead of its reply; see errors.md for the codes.",
            "contentType": "application/json",
            "headers": _headers(_ERROR_HEADERS, required=[H.ERROR, H.ERROR_CODE]),
            "payload": _payload(by_type, codec.ErrorBody),
        }
    }
    documented: set[str] = set()
    for svc in services:
        for op in svc.ops:
            cid = f"{svc.name}.{op.name}"
            documented.add(op.subject)
            req_id, rep_id = f"{cid}.request", f"{cid}.reply"
            messages[req_id] = {
                "name": _type_name(op.request) or "Empty",
                "title": f"{cid} request",
                "contentType": "application/json",
                "headers": _headers(_TRACE_HEADERS),
                "payload": _payload(by_type, op.request),
            }
            messages[rep_id] = {
                "name": _type_name(op.reply) or "Empty",
                "title": f"{cid} reply",
                "contentType": "application/json",
                "headers": _headers(_REPLY_HEADERS),
                "payload": _payload(by_type, op.reply),
            }
            channel: dict[str, Any] = {
                "address": op.subject,
                "title": cid,
                "messages": {"request": {"$ref": f"#/components/messages/{req_id}"}},
            }
            if op.summary:
                channel["description"] = op.summary
            if params := _params(op.subject):
                channel["parameters"] = params
            channels[cid] = channel
            channels[f"{cid}.reply"] = {
                "address": None,
                "description": "The requester's inbox (the NATS reply subject of the request).",
                "messages": {
                    "reply": {"$ref": f"#/components/messages/{rep_id}"},
                    "error": {"$ref": "#/components/messages/error"},
                },
            }
            operations[cid] = {
                "action": "receive",
                "title": f"{svc.name}: {op.name}",
                "summary": op.summary or f"{op.name} ({svc.name} service)",
                "channel": {"$ref": f"#/channels/{cid}"},
                "messages": [{"$ref": f"#/channels/{cid}/messages/request"}],
                "reply": {
                    "channel": {"$ref": f"#/channels/{cid}.reply"},
                    "messages": [
                        {"$ref": f"#/channels/{cid}.reply/messages/reply"},
                        {"$ref": f"#/channels/{cid}.reply/messages/error"},
                    ],
                },
                "bindings": {"nats": {"queue": f"vnet-{svc.name}", "bindingVersion": "0.1.0"}},
                "x-vnet-service": svc.name,
                "x-vnet-request-type": _type_name(op.request),
                "x-vnet-reply-type": _type_name(op.reply),
            }
    for template, (tp, description) in sorted(PUBLISHED.items()):
        cid = "publish." + template.replace("{", "").replace("}", "")
        documented.add(template)
        messages[cid] = {"name": _type_name(tp), "contentType": "application/json",
                         "headers": _headers(_TRACE_HEADERS), "payload": _payload(by_type, tp)}
        channel = {"address": template, "title": template, "description": description,
                   "messages": {"message": {"$ref": f"#/components/messages/{cid}"}}}
        if params := _params(template):
            channel["parameters"] = params
        channels[cid] = channel
        operations[cid] = {"action": "send", "title": f"publish {template}",
                           "channel": {"$ref": f"#/channels/{cid}"},
                           "messages": [{"$ref": f"#/channels/{cid}/messages/message"}]}
    # Domain events: JetStream stream VNET_EVENTS.
    evt_messages: dict[str, Any] = {}
    for tp in events:
        tag = str(tp.__struct_config__.tag)
        mid = f"event.{tag}"
        messages[mid] = {"name": tag, "title": tp.__name__, "contentType": "application/json",
                         "headers": _headers({H.MSG_ID: "Deduplication id (JetStream duplicate window).",
                                              **_TRACE_HEADERS}, required=[H.MSG_ID]),
                         "payload": _payload(by_type, tp)}
        evt_messages[tag] = {"$ref": f"#/components/messages/{mid}"}
    evt_template = subjects.EVT.template
    documented.add(evt_template)
    evt_channel: dict[str, Any] = {
        "address": evt_template,
        "title": "domain events",
        "description": (f"Domain events in the JetStream stream `{subjects.EVENTS_STREAM}` "
                        f"(subjects `{subjects.EVENTS_WILDCARD}`), deduplicated by `{H.MSG_ID}`. "
                        + ("" if events else "No event type is declared as a tagged msgspec Struct in "
                           "vnet.contracts yet; payloads are JSON objects.")),
        "parameters": _params(evt_template),
    }
    if evt_messages:
        evt_channel["messages"] = evt_messages
    channels["events"] = evt_channel
    evt_op: dict[str, Any] = {"action": "send", "title": "publish domain events",
                              "channel": {"$ref": "#/channels/events"}}
    if evt_messages:
        evt_op["messages"] = [{"$ref": f"#/channels/events/messages/{k}"} for k in evt_messages]
    operations["publish.events"] = evt_op

    others = {name: s.template for name, s in sorted(subjects.all_subjects().items())
              if s.template not in documented}
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "VNet wire contract",
            "version": _package_version(),
            "description": (
                "Request/reply operations of the VNet services on NATS (`nats.micro`, one queue group "
                "per service) and the subjects they publish. Generated by `" + REGENERATE + "` from "
                "the msgspec types; do not edit by hand. Payloads are JSON; unknown fields are "
                "rejected with `unknown_field` (400). Errors: the `error` message, codes in errors.md."
            ),
        },
        "defaultContentType": "application/json",
        "servers": {
            "local": {"host": "127.0.0.1:4222", "protocol": "nats",
                      "description": "The local stack (`vnetctl up` or docker-compose.yml)."},
        },
        "channels": channels,
        "operations": operations,
        "components": {"schemas": components, "messages": dict(sorted(messages.items()))},
        "x-vnet-other-subjects": others,
    }


def build_schemas(services: Sequence[ServiceDoc], events: Sequence[Any]) -> dict[str, Any]:
    types = _all_types(services, events)
    _, components = _components(types, "#/$defs/{name}")
    ops = {}
    for svc in services:
        for op in svc.ops:
            ops[f"{svc.name}.{op.name}"] = {
                "subject": op.subject,
                "request": _type_name(op.request),
                "reply": _type_name(op.reply),
            }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "VNet wire types",
        "description": f"JSON Schema of every VNet wire type, generated by `{REGENERATE}`; do not edit.",
        "x-vnet-operations": ops,
        "x-vnet-events": sorted(str(t.__struct_config__.tag) for t in events),
        "$defs": components,
    }


def build_errors_md() -> str:
    lines = [
        "# VNet error codes",
        "",
        f"Generated by `{REGENERATE}` from `vnet.core.errors`; do not edit.",
        "",
        "An operation that fails answers with the headers "
        f"`{H.ERROR}` (a message for people) and `{H.ERROR_CODE}` (the status below, as a "
        "numeric string), and a JSON body `{\"code\", \"message\", \"details\", \"trace_id\"}` "
        "whose `code` is one of these stable, machine-readable names. The `trace_id` (also in the "
        f"`{H.TRACE_ID}` header) finds the request's trace in Jaeger.",
        "",
        "| code | status | meaning |",
        "| --- | --- | --- |",
    ]
    for ec in sorted(E.all_codes().values(), key=lambda c: (c.status, c.code)):
        summary = ec.summary.replace("|", "\\|")
        lines.append(f"| `{ec.code}` | {ec.status} | {summary} |")
    return "\n".join(lines) + "\n"


def _dump(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def generate(services: Sequence[ServiceDoc] | None = None,
             events: Sequence[Any] | None = None) -> dict[str, str]:
    """The three files' contents, by file name."""
    services = discover_services() if services is None else services
    events = event_types() if events is None else events
    return {
        ASYNCAPI_FILE: _dump(build_asyncapi(services, events)),
        SCHEMAS_FILE: _dump(build_schemas(services, events)),
        ERRORS_FILE: build_errors_md(),
    }


# --- files ----------------------------------------------------------------------------


def default_out_dir() -> Path:
    """``docs/contract`` of the source tree this module lives in (or of the cwd)."""
    root = Path(__file__).resolve().parents[3]
    if (root / "pyproject.toml").exists():
        return root / "docs" / "contract"
    return Path.cwd() / "docs" / "contract"


def write(out_dir: Path, files: dict[str, str]) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files.items():
        path = out_dir / name
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            written.append(path)
    return written


def check(out_dir: Path, files: dict[str, str] | None = None, *, max_diff_lines: int = 60) -> list[str]:
    """Problems with the checked-in copy (empty when it is current), each with a diff."""
    files = generate() if files is None else files
    problems = []
    for name, text in files.items():
        path = out_dir / name
        if not path.exists():
            problems.append(f"{path} is missing")
            continue
        current = path.read_text()
        if current == text:
            continue
        diff = list(difflib.unified_diff(current.splitlines(), text.splitlines(),
                                         fromfile=f"{path} (checked in)", tofile=f"{name} (from the code)",
                                         lineterm="", n=2))
        shown = diff[:max_diff_lines]
        if len(diff) > max_diff_lines:
            shown.append(f"... {len(diff) - max_diff_lines} more diff lines")
        problems.append(f"{path} is stale:\n" + "\n".join(shown))
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vnet.contracts.docgen", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true",
                   help="do not write; exit 1 with a diff if the checked-in files are stale")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: docs/contract)")
    args = p.parse_args(argv)
    out_dir: Path = args.out or default_out_dir()
    try:
        files = generate()
    except DocgenError as err:
        print(f"docgen: {err}", file=sys.stderr)
        return 2
    if args.check:
        problems = check(out_dir, files)
        if problems:
            for prob in problems:
                print(prob, file=sys.stderr)
            print(f"\nThe contract document in {out_dir} is out of date with the code: run `{REGENERATE}` "
                  "and commit the result.", file=sys.stderr)
            return 1
        print(f"contract document in {out_dir} is current")
        return 0
    written = write(out_dir, files)
    for path in written:
        print(f"wrote {path}")
    if not written:
        print(f"contract document in {out_dir} already current")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
