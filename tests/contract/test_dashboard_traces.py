"""The provisioned dashboard's trace panels: their data source is provisioned with the right
type, and every ``$variable`` a panel or query names is one of the dashboard's variables
(the metric names of the Prometheus queries are checked in test_compose.py)."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DASH = ROOT / "ops/grafana/dashboards/vnet.json"
DATASOURCES = ROOT / "ops/grafana/provisioning/datasources/datasources.yml"
VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::[^}]*)?\}|\$([A-Za-z_][A-Za-z0-9_]*)")
BUILTIN = re.compile(r"^__")  # $__rate_interval, $__range, ...


def _strings(obj: Any) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def problems(dash: Mapping[str, Any], ds_types: Mapping[str, str]) -> list[str]:
    out: list[str] = []
    names = {v["name"] for v in (dash.get("templating") or {}).get("list") or []}
    for p in dash.get("panels") or []:
        where = f"panel {p.get('title')!r}"
        for ds in [p.get("datasource"), *(t.get("datasource") for t in p.get("targets") or [])]:
            if isinstance(ds, Mapping):
                if ds.get("uid") not in ds_types:
                    out.append(f"{where}: datasource uid {ds.get('uid')!r} is not provisioned")
                elif ds_types[ds["uid"]] != ds.get("type"):
                    out.append(f"{where}: datasource {ds['uid']!r} is a {ds_types[ds['uid']]}, not {ds.get('type')}")
        for text in _strings({"title": p.get("title"), "targets": p.get("targets")}):
            for m in VAR.finditer(text):
                var = m.group(1) or m.group(2)
                if not BUILTIN.match(var) and var not in names:
                    out.append(f"{where}: ${var} is not a dashboard variable")
    return out


def _load() -> tuple[dict[str, Any], dict[str, str]]:
    dash = json.loads(DASH.read_text())
    ds = {str(d["uid"]): str(d["type"]) for d in yaml.safe_load(DATASOURCES.read_text())["datasources"]}
    return dash, ds


def test_trace_panels_resolve() -> None:
    dash, ds = _load()
    assert problems(dash, ds) == []
    jaeger = [p for p in dash["panels"] if (p.get("datasource") or {}).get("type") == "jaeger"]
    kinds = {(p["type"], p["targets"][0].get("queryType", "trace id")) for p in jaeger}
    assert kinds == {("table", "search"), ("traces", "trace id")}
    view = next(p for p in jaeger if p["type"] == "traces")
    assert view["targets"][0]["query"] == "${trace_id}"
    search = next(p for p in jaeger if p["type"] == "table")["targets"][0]
    assert (search["service"], search["operation"], search["tags"]) == (
        "${trace_service}", "${trace_operation}", "${trace_tags}")
    svc = next(v for v in dash["templating"]["list"] if v["name"] == "trace_service")
    # the service names the processes register with (vnet.telemetry.tracing: "vnet-<service>")
    assert {"vnet-network", "vnet-endpoint", "vnet-ipam", "vnet-policy", "vnet-vnetctl"} <= set(svc["query"].split(","))


def test_checker_flags_unknown_variable_and_datasource() -> None:
    dash, ds = _load()
    bad = copy.deepcopy(dash)
    view = next(p for p in bad["panels"] if p["type"] == "traces")
    view["targets"][0]["query"] = "${traceid}"
    view["datasource"] = {"type": "jaeger", "uid": "tempo"}
    got = problems(bad, ds)
    assert any("$traceid is not a dashboard variable" in g for g in got)
    assert any("'tempo' is not provisioned" in g for g in got)
    bad["panels"][0]["datasource"] = {"type": "jaeger", "uid": "prometheus"}
    assert any("is a prometheus, not jaeger" in g for g in problems(bad, ds))
