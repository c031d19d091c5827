"""Installs are reproducible: the lock matches pyproject.toml, and a fresh clone installs
from the lock alone and runs the demo (the README's first command) end to end."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UV = Path(sys.executable).with_name("uv")


def test_lock_matches_pyproject() -> None:
    """`uv lock --check` fails when pyproject.toml changed without `uv lock` (then
    bootstrap.sh's `uv sync --locked` would refuse to install)."""
    assert UV.exists(), f"{UV} is missing: uv is a dev dependency, installed by ops/scripts/bootstrap.sh"
    res = subprocess.run([str(UV), "lock", "--check"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, ("uv.lock does not match pyproject.toml: run `.venv/bin/uv lock` and commit "
                                 f"uv.lock\n{res.stdout}{res.stderr}")


def test_bootstrap_installs_from_the_lock() -> None:
    """The install step is the lock's exact sync, and every locked package is what is installed."""
    script = (ROOT / "ops" / "scripts" / "bootstrap.sh").read_text()
    assert "uv sync --locked" in script
    res = subprocess.run([str(UV), "pip", "list", "--python", sys.executable, "--format", "freeze"],
                         capture_output=True, text=True, check=True, timeout=60)
    installed = dict(line.split("==", 1) for line in res.stdout.split() if "==" in line)
    lock = (ROOT / "uv.lock").read_text()
    for name in ("msgspec", "nats-py", "redis", "pyroute2", "click"):
        want = lock.split(f'\nname = "{name}"\nversion = "', 1)[1].split('"', 1)[0]
        assert installed.get(name) == want, f"{name}: installed {installed.get(name)}, locked {want}"


@pytest.mark.slow
def test_fresh_clone_installs_from_the_lock_and_runs_the_demo(tmp_root: Path, run_prefix: str) -> None:
    """What a newcomer does: clone, `bash ops/scripts/up.sh --demo`, with no package cache."""
    if os.geteuid() != 0:
        pytest.skip("the demo's data plane needs root")
    clone = tmp_root / f"{run_prefix}-clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    state = tmp_root / f"{run_prefix}-clone-state"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VNET_") or k == "VNET_RUN_PREFIX"}
    env.update(UV_NO_CACHE="1", PIP_NO_CACHE_DIR="1", VNET_STATE_DIR=str(state))
    t0 = time.monotonic()
    try:
        res = subprocess.run(["bash", "ops/scripts/up.sh", "--detach", "--demo", "--state-dir", str(state)],
                             cwd=clone, env=env, capture_output=True, text=True, timeout=600)
        took = time.monotonic() - t0
        out = res.stdout + res.stderr
        assert res.returncode == 0, out
        assert out.count("explain: allowed") == 2 and out.count("explain: denied") == 2, out
        assert "MISMATCH" not in out and "4. cleaned up" in out, out
        print(f"\nfresh clone to the demo's last result: {took:.1f} s (no package cache)")
    finally:
        subprocess.run([str(clone / ".venv" / "bin" / "vnetctl"), "down", "--state-dir", str(state)],
                       env=env, capture_output=True, timeout=120)
        shutil.rmtree(clone, ignore_errors=True)
