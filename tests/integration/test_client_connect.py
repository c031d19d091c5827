"""A client that fails fast, and finds the running local stack exactly as vnetctl does.

Before: with no stack running, the README's Python example and ``vnetctl status``
retried 127.0.0.1:4222 forever, and ``VNetConfig.load()`` did not find the running
local stack (only vnetctl did).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.test_stack import Leftovers, _ctl, _env
from vnet import VNetManager
from vnet.core import errors as E
from vnet.runtime import servers
from vnet.runtime.config import VNetConfig, local_stack_settings, with_local_stack
from vnet.runtime.stack import StackFile, apply_running_stack, proc_start_time, write_stack_file

README = Path(__file__).resolve().parents[2] / "README.md"


def _no_vnet_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in [k for k in os.environ if k.startswith("VNET_") and k != "VNET_RUN_PREFIX"]:
        monkeypatch.delenv(k)


def _fake_stack(state_dir: Path, nats_url: str, redis_url: str, *, pid: int | None = None) -> StackFile:
    """A stack file as a live supervisor (this process) writes it."""
    state_dir.mkdir(parents=True, exist_ok=True)
    pid = os.getpid() if pid is None else pid
    st = StackFile(status="ready", supervisor_pid=pid, supervisor_start_time=proc_start_time(pid),
                   state_dir=str(state_dir), started_at="2026-01-01T00:00:00+00:00", nats_url=nats_url,
                   redis_url=redis_url, nats_port=None, redis_port=None, metrics_port=1,
                   metrics_url="http://127.0.0.1:1/metrics", node_id="n", netns=None, host_netns=None,
                   privileged=False, logs_dir=str(state_dir / "logs"))
    write_stack_file(state_dir, st)
    return st


async def test_connecting_to_nothing_gives_up_with_a_way_out() -> None:
    assert VNetConfig().connect_timeout_s <= 5.0
    url = f"nats://127.0.0.1:{servers.free_port()}"
    cfg = VNetConfig.load(env={}, nats_url=url, connect_timeout_s=1.0)
    t0 = time.monotonic()
    with pytest.raises(E.Unavailable) as ei:
        async with VNetManager(cfg) as m:
            await m.services()
    took = time.monotonic() - t0
    print(f"\nno NATS at {url}: Unavailable after {took:.2f}s: {ei.value.message}")
    msg = ei.value.message
    assert url in msg and "vnetctl up" in msg and "VNET_NATS_URL" in msg and "--nats" in msg
    assert ei.value.details["url"] == url


def test_load_finds_the_running_stack_like_vnetctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   config: VNetConfig) -> None:
    _no_vnet_env(monkeypatch)
    state = tmp_path / "state"
    monkeypatch.setenv("VNET_STATE_DIR", str(state))
    assert local_stack_settings() == {}
    assert VNetConfig.load().nats_url == VNetConfig().nats_url  # nothing runs: the defaults
    _fake_stack(state, config.nats_url, config.redis_url)
    assert local_stack_settings() == {"nats_url": config.nats_url, "redis_url": config.redis_url}
    found = VNetConfig.load()
    assert (found.nats_url, found.redis_url) == (config.nats_url, config.redis_url)
    # vnetctl's path reaches the same result through the same function.
    via_ctl = apply_running_stack(VNetConfig.load(discover=False))
    assert (via_ctl.nats_url, via_ctl.redis_url) == (found.nats_url, found.redis_url)
    # Named servers win: an argument, the environment, a file.
    assert VNetConfig.load(nats_url="nats://10.9.9.9:4222").redis_url == VNetConfig().redis_url
    assert VNetConfig.load(redis_url="redis://10.9.9.9:6379/0").nats_url == config.nats_url
    cfg_file = tmp_path / "vnet.toml"
    cfg_file.write_text('nats_url = "nats://10.8.8.8:4222"\n')
    assert VNetConfig.load(cfg_file).nats_url == "nats://10.8.8.8:4222"
    monkeypatch.setenv("VNET_NATS_URL", "nats://10.7.7.7:4222")
    assert VNetConfig.load().nats_url == "nats://10.7.7.7:4222"
    assert apply_running_stack(VNetConfig.load(discover=False)).nats_url == "nats://10.7.7.7:4222"
    monkeypatch.delenv("VNET_NATS_URL")
    # A test's own env= never picks up a stack (unless asked to).
    assert VNetConfig.load(env={}).nats_url == VNetConfig().nats_url
    assert VNetConfig.load(env={"VNET_STATE_DIR": str(state)}, discover=True).nats_url == config.nats_url
    # A dead supervisor's file is no stack.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _fake_stack(state, "nats://10.6.6.6:4222", config.redis_url, pid=dead.pid)
    assert local_stack_settings() == {}
    assert with_local_stack(VNetConfig()) == VNetConfig()


def _readme_example() -> str:
    text = README.read_text()
    section = text[text.index("## Using it from Python"):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README has no Python example under 'Using it from Python'"
    return match.group(1)


def test_readme_example_without_a_stack_fails_fast(tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(_readme_example())
    env = _env(tmp_path / "no-stack")  # nothing runs from there
    env["VNET_NATS_URL"] = f"nats://127.0.0.1:{servers.free_port()}"  # certainly nothing listens
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60)
    took = time.monotonic() - t0
    print(f"\nREADME example with no stack: exit {res.returncode} after {took:.2f}s")
    assert res.returncode != 0
    assert "Unavailable" in res.stderr and env["VNET_NATS_URL"] in res.stderr and "vnetctl up" in res.stderr
    assert "nats error" not in res.stderr and "reconnecting" not in res.stderr  # one clear error, no chatter


@pytest.mark.stack
@pytest.mark.timeout(180)
def test_readme_example_works_against_vnetctl_up(tmp_root: Path, run_prefix: str, tmp_path: Path) -> None:
    state_dir = tmp_root / "stack-readme"
    left = Leftovers(state_dir, run_prefix)
    try:
        res = _ctl("up", "--detach", "--state-dir", state_dir, "--stop-timeout", "5", timeout=120)
        left.remember()
        assert res.returncode == 0, res.stdout + res.stderr
        script = tmp_path / "example.py"
        script.write_text(_readme_example())
        # Found only through the state directory, as a user's shell after `vnetctl up` would.
        run = subprocess.run([sys.executable, str(script)], env=_env(state_dir), capture_output=True, text=True,
                             timeout=60)
        assert run.returncode == 0, run.stdout + run.stderr
        assert run.stdout.startswith("Created network: ")
        net_id = run.stdout.split(":", 1)[1].strip()
        show = _ctl("network", "ls", "--json", state_dir=state_dir)
        assert show.returncode == 0 and net_id in show.stdout, show.stdout + show.stderr
        down = _ctl("down", "--state-dir", state_dir, timeout=60)
        assert down.returncode == 0, down.stdout + down.stderr
    finally:
        left.cleanup()

