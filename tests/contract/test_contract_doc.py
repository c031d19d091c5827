"""The contract document (docs/contract/) is generated from the code and kept current."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from vnet.contracts import docgen, subjects
from vnet.contracts.messages import Empty, HealthReply
from vnet.core import errors as E
from vnet.runtime.service import Ctx, ServiceDef

OUT = docgen.default_out_dir()


def test_checked_in_contract_document_is_current() -> None:
    problems = docgen.check(OUT)
    assert not problems, (
        "docs/contract/ is out of date with the code. Run `python -m vnet.contracts.docgen` and commit the "
        "result.\n\n" + "\n\n".join(problems)
    )


def test_check_fails_on_a_stale_or_missing_copy(tmp_path: Path) -> None:
    files = docgen.generate()
    assert docgen.check(tmp_path, files) != []  # nothing written yet
    docgen.write(tmp_path, files)
    assert docgen.check(tmp_path, files) == []
    (tmp_path / docgen.ERRORS_FILE).write_text(files[docgen.ERRORS_FILE].replace("| 409 |", "| 410 |", 1))
    problems = docgen.check(tmp_path, files)
    assert len(problems) == 1 and "errors.md is stale" in problems[0] and "+| `" in problems[0]
    (tmp_path / docgen.SCHEMAS_FILE).unlink()
    assert any("schemas.json is missing" in p for p in docgen.check(tmp_path, files))


def test_command_line_check_and_write(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert docgen.main(["--check", "--out", str(tmp_path)]) == 1
    assert "python -m vnet.contracts.docgen" in capsys.readouterr().err
    assert docgen.main(["--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(docgen.FILES)
    assert docgen.main(["--check", "--out", str(tmp_path)]) == 0


def _doc() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(docgen.generate()[docgen.ASYNCAPI_FILE])
    return doc


def test_every_operation_of_every_service_is_documented() -> None:
    services = docgen.discover_services()
    assert {s.name for s in services} == {*subjects.SERVICES, subjects.NODE_SERVICE}
    doc = _doc()
    addresses = {c["address"] for c in doc["channels"].values() if c.get("address")}
    for svc in services:
        assert any(op.name == "health" for op in svc.ops)
        for op in svc.ops:
            assert op.subject in addresses, f"{svc.name}.{op.name} ({op.subject}) is not in the document"
            operation = doc["operations"][f"{svc.name}.{op.name}"]
            assert operation["action"] == "receive" and "reply" in operation
            assert operation["bindings"]["nats"]["queue"] == f"vnet-{svc.name}"
    # Every subject constant is documented somewhere.
    documented = addresses | set(doc["x-vnet-other-subjects"].values())
    for name, subject in subjects.all_subjects().items():
        assert subject.template in documented, name


def _resolve(doc: Any, ref: str) -> Any:
    node = doc
    for part in ref.removeprefix("#/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


@pytest.mark.parametrize("name", [docgen.ASYNCAPI_FILE, docgen.SCHEMAS_FILE])
def test_every_reference_resolves(name: str) -> None:
    doc = json.loads(docgen.generate()[name])
    refs = _refs(doc)
    assert refs
    for ref in refs:
        assert ref.startswith("#/"), ref
        _resolve(doc, ref)  # KeyError names the broken one


def test_request_schemas_are_strict() -> None:
    doc = _doc()
    schemas = doc["components"]["schemas"]
    for op_id, op in doc["operations"].items():
        if op["action"] != "receive":
            continue
        req_type = op["x-vnet-request-type"]
        schema = schemas[req_type]
        assert schema.get("additionalProperties") is False, (
            f"{op_id}: {req_type} accepts unknown fields; declare it with forbid_unknown_fields=True")


def test_errors_table_lists_every_code() -> None:
    text = docgen.generate()[docgen.ERRORS_FILE]
    for ec in E.all_codes().values():
        assert f"| `{ec.code}` | {ec.status} |" in text


class _Reply(msgspec.Struct):
    value: int


class _Evt(msgspec.Struct, tag="thing.happened"):
    id: str


def test_reply_type_comes_from_the_handler_annotation() -> None:
    svc = ServiceDef("probe", "a probe")

    @svc.op("get", subjects.Subject("vnet.probe.{node}.get"), Empty)
    async def get(ctx: Ctx, req: Empty) -> _Reply:
        """Get the thing.

        More words."""
        return _Reply(1)

    @svc.op("drop", subjects.Subject("vnet.probe.drop"), Empty)
    async def drop(ctx: Ctx, req: Empty) -> None:
        return None

    doc = docgen._describe(svc, "probe")
    ops = {o.name: o for o in doc.ops}
    assert ops["health"].request is Empty and ops["health"].reply is HealthReply
    assert ops["get"].reply is _Reply and ops["get"].summary == "Get the thing."
    assert ops["drop"].reply is None
    api = docgen.build_asyncapi([doc], [_Evt])
    assert api["channels"]["probe.get"]["parameters"] == {"node": {"description": docgen._PARAM_DOC["node"]}}
    assert api["components"]["messages"]["probe.drop.reply"]["payload"]["type"] == "object"
    assert "thing.happened" in api["channels"]["events"]["messages"]
    assert "_Evt" in api["components"]["schemas"]


def test_a_handler_without_a_return_annotation_is_an_error() -> None:
    svc = ServiceDef("probe", "a probe")

    async def bare(ctx, req):  # type: ignore[no-untyped-def]
        return None

    svc.op("bare", subjects.Subject("vnet.probe.bare"), Empty)(bare)
    with pytest.raises(docgen.DocgenError, match=r"probe\.bare"):
        docgen._describe(svc, "probe")


def test_contracts_do_not_import_the_services() -> None:
    code = ("import sys, vnet.contracts.docgen; "
            "bad = sorted(m for m in sys.modules if m.startswith('vnet.svc')); "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
