"""`lint-imports` works bare from the repository root, over both halves of `vnet`."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

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
    assert "Contracts: 3 kept, 0 broken." in res.stdout, res.stdout
