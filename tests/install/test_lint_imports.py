"""`lint-imports` works bare from the repository root, over both halves of `vnet`."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def test_the_vnet_spec_lists_both_source_trees() -> None:
    spec = importlib.util.find_spec("vnet")
    assert spec is not None and spec.submodule_search_locations is not None
    halves = {Path(p).resolve() for p in spec.submodule_search_locations}
    assert {ROOT / "shared" / "vnet", ROOT / "services" / "vnet"} <= halves


def test_bare_lint_imports_sees_the_services_and_keeps_every_contract() -> None:
    exe = Path(sys.executable).with_name("lint-imports")
    res = subprocess.run([str(exe), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    assert f"Contracts: {len(contracts)} kept, 0 broken." in res.stdout, res.stdout


def test_the_contracts_cover_every_layer_rule_and_forbid_cycles() -> None:
    """Issue 17: one contract per layer rule (named for what it checks), and one that fails
    on any import cycle between sibling modules (client <-> api was one)."""
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    by_type: dict[str, list[dict[str, Any]]] = {}
    for c in contracts:
        by_type.setdefault(str(c["type"]), []).append(c)
    assert [c["ancestors"] for c in by_type["acyclic_siblings"]] == [["vnet"]]
    sources = {m for c in by_type["forbidden"] for m in c["source_modules"]}
    assert {"vnet.core", "vnet.contracts", "vnet.adapters", "vnet.runtime", "vnet.api"} <= sources
    # every service package imports no concrete adapter; the only exceptions are the node's
    # kernel event sources, each named (a new one must be argued in pyproject.toml)
    [services] = [c for c in by_type["forbidden"] if c["source_modules"] == ["vnet.svc"]]
    assert services["forbidden_modules"] == ["vnet.adapters"]
    assert set(services.get("ignore_imports", [])) <= {"vnet.svc.node.drift -> vnet.adapters.netlink.watch",
                                                       "vnet.svc.node.routewatch -> vnet.adapters.netlink.nsctx"}
    assert len({c["name"] for c in contracts}) == len(contracts)
