"""The embedded local stack end to end: ``vnetctl up`` / ``down`` as real processes.

Each stack lives in a state directory under the run's temp root and (as root) gets a
sandbox namespace named ``<run prefix>-vnet-<id>-host``; whatever a test leaves, pass
or fail, is killed and deleted by :class:`Leftovers`.

The tests run in any order, or alone: the ones that only look share one detached stack,
found whole (every component listed) before each of them; the one that takes a stack down
brings up its own. Deadlines count from the step they wait for, and are generous: a
busy machine starts Python processes slowly.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vnet.runtime.config import VNetConfig
from vnet.runtime.stack import StackFile, apply_running_stack, pid_alive, read_stack_file

pytestmark = [pytest.mark.stack, pytest.mark.timeout(300)]

VNETCTL = str(Path(sys.executable).parent / "vnetctl")
COMPONENTS = {"ipam", "network", "endpoint", "policy", "metrics", "node"}
IS_ROOT = os.geteuid() == 0
# The metrics service can need a while to drain; the tests need not wait 10 s for it.
STOP_TIMEOUT = "5"
WAIT_S = 90.0  # for processes to start, restart or stop: seconds on a quiet machine


def _env(state_dir: Path | None = None) -> dict[str, str]:
    """This environment without VNet settings (so nothing points elsewhere), plus the state dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VNET_") or k == "VNET_RUN_PREFIX"}
    if state_dir is not None:
        env["VNET_STATE_DIR"] = str(state_dir)
    return env


def _ctl(*args: str | Path, state_dir: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([VNETCTL, *map(str, args)], env=_env(state_dir), capture_output=True, text=True,
                          timeout=timeout, check=False)


def _netns_list() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _status(state_dir: Path) -> list[dict[str, Any]]:
    """``vnetctl status --json``, pointed at the stack only through ``VNET_STATE_DIR``."""
    res = _ctl("status", "--json", state_dir=state_dir)
    # 3: some service is not running (yet); the document lists the ones that are.
    assert res.returncode in (0, 3), res.stdout + res.stderr
    rows: list[dict[str, Any]] = json.loads(res.stdout)["items"]
    return rows


def _wait_status(state_dir: Path, until: float, *, want: set[str] = COMPONENTS) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    while time.monotonic() < until:
        rows = _status(state_dir)
        if want <= {r["name"] for r in rows}:
            return rows
        time.sleep(0.3)
    pytest.fail(f"status did not list {sorted(want)} in time; last: {[r['name'] for r in rows]}")


def _stack(state_dir: Path) -> StackFile:
    st = read_stack_file(state_dir)
    assert st is not None, f"no stack.json in {state_dir}"
    return st


def _pids(st: StackFile) -> dict[str, tuple[int, int | None]]:
    out = {"supervisor": (st.supervisor_pid, st.supervisor_start_time)}
    out.update({n: (p.pid, p.start_time) for n, p in st.processes.items()})
    return out


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd and str(os.getpid()) != d.name:
            found.append(f"{d.name}: {cmd}")
    return found


def assert_nothing_left(state_dir: Path, stacks: list[StackFile]) -> None:
    assert not (state_dir / "stack.json").exists(), "stack.json was not removed"
    for st in stacks:
        alive = {n: pid for n, (pid, start) in _pids(st).items() if pid_alive(pid, start)}
        assert not alive, f"still running after stop: {alive}"
        if st.netns:
            assert st.netns not in _netns_list(), f"sandbox namespace {st.netns} was not deleted"
    # nats-server and valkey-server carry the state dir on their command line.
    assert not _processes_mentioning(str(state_dir)), _processes_mentioning(str(state_dir))


class Leftovers:
    """Remembers every stack file seen and, at the end, kills and deletes what remains."""

    def __init__(self, state_dir: Path, run_prefix: str) -> None:
        self.state_dir = state_dir
        self.prefix = f"{run_prefix}-vnet-"
        self.ns_before = _netns_list()
        self.seen: list[StackFile] = []

    def remember(self) -> StackFile | None:
        st = read_stack_file(self.state_dir)
        if st is not None:
            self.seen.append(st)
        return st

    def cleanup(self) -> None:
        self.remember()
        for st in self.seen:
            for pid, start in _pids(st).values():
                if pid_alive(pid, start):
                    try:
                        if os.getpgid(pid) == pid:
                            os.killpg(pid, signal.SIGKILL)
                        else:
                            os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        for ns in _netns_list() - self.ns_before:
            if ns.startswith(self.prefix):
                pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
                for p in pids:
                    try:
                        os.kill(int(p), signal.SIGKILL)
                    except (ProcessLookupError, ValueError):
                        pass
                subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        (self.state_dir / "stack.json").unlink(missing_ok=True)


# --- a detached stack, shared by the tests that only look at it -----------------------------

class Detached:
    def __init__(self, state_dir: Path, leftovers: Leftovers, stack: StackFile, out: str) -> None:
        self.state_dir = state_dir
        self.leftovers = leftovers
        self.stack = stack
        self.out = out


def _up_detached(state_dir: Path, left: Leftovers) -> Detached:
    res = _ctl("up", "--detach", "--state-dir", state_dir, "--stop-timeout", STOP_TIMEOUT, timeout=WAIT_S * 2)
    st = left.remember()
    assert res.returncode == 0, res.stdout + res.stderr
    assert st is not None and st.status == "ready"
    return Detached(state_dir, left, st, res.stdout)


@pytest.fixture(scope="module")
def shared_stack(tmp_root: Path, run_prefix: str) -> Iterator[Detached]:
    state_dir = tmp_root / "stack-detached"
    left = Leftovers(state_dir, run_prefix)
    try:
        yield _up_detached(state_dir, left)
    finally:
        left.cleanup()


@pytest.fixture
def detached(shared_stack: Detached) -> Detached:
    """The shared stack, whole: every component listed (a service killed by an earlier test is
    back), and its stack file as it is now."""
    _wait_status(shared_stack.state_dir, time.monotonic() + WAIT_S)
    shared_stack.stack = _stack(shared_stack.state_dir)
    return shared_stack


@pytest.fixture
def own_stack(tmp_root: Path, run_prefix: str) -> Iterator[Detached]:
    """A detached stack of this test's own, for one that takes it down."""
    state_dir = tmp_root / "stack-own"
    left = Leftovers(state_dir, run_prefix)
    try:
        yield _up_detached(state_dir, left)
    finally:
        left.cleanup()


def test_up_detached_lists_every_service_and_one_node(detached: Detached) -> None:
    assert "ready" in detached.out
    for what in (str(detached.state_dir), detached.stack.nats_url, detached.stack.redis_url,
                 detached.stack.metrics_url, "logs", "status", "health network", "vnetctl down"):
        assert what in detached.out, f"`up` did not print {what!r}:\n{detached.out}"
    rows = _wait_status(detached.state_dir, time.monotonic() + WAIT_S)
    nodes = [r for r in rows if r["name"] == "node"]
    assert len(nodes) == 1 and nodes[0]["metadata"]["vnet.node"] == detached.stack.node_id
    assert set(detached.stack.processes) == COMPONENTS | {"nats-server", "valkey-server"}
    for name in detached.stack.processes:
        assert (detached.state_dir / "logs" / f"{name}.log").exists()
    with urllib.request.urlopen(detached.stack.metrics_url, timeout=30) as resp:
        assert b"vnet_networks_total" in resp.read()
    if IS_ROOT:
        assert detached.stack.netns and detached.stack.netns in _netns_list()
        assert detached.stack.host_netns == detached.stack.netns
    res = _ctl("health", "node", "--node", detached.stack.node_id, "--json", state_dir=detached.state_dir)
    assert res.returncode == 0 and json.loads(res.stdout)["status"] == "ok", res.stdout + res.stderr


def test_killed_service_is_restarted(detached: Detached) -> None:
    before = _stack(detached.state_dir)
    old = before.processes["network"]
    os.kill(old.pid, signal.SIGKILL)
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        st = detached.leftovers.remember()
        if st is not None and st.processes["network"].pid != old.pid:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the supervisor did not restart the network service within {WAIT_S} s")
    assert st.processes["network"].restarts == old.restarts + 1
    _wait_status(detached.state_dir, time.monotonic() + WAIT_S)
    assert not pid_alive(old.pid, old.start_time)
    # Everything else kept running untouched.
    for name, p in before.processes.items():
        if name != "network":
            assert st.processes[name].pid == p.pid


def test_status_finds_the_running_stack_unless_told_otherwise(detached: Detached,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    for k in [k for k in os.environ if k.startswith("VNET_") and k != "VNET_RUN_PREFIX"]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("VNET_STATE_DIR", str(detached.state_dir))
    cfg = VNetConfig.load(env={})
    found = apply_running_stack(cfg)
    assert (found.nats_url, found.redis_url) == (detached.stack.nats_url, detached.stack.redis_url)
    assert apply_running_stack(cfg, explicit_nats=True) is cfg
    monkeypatch.setenv("VNET_NATS_URL", "nats://127.0.0.1:1")
    assert apply_running_stack(cfg).nats_url == cfg.nats_url


def test_second_up_on_same_state_dir_is_refused(detached: Detached) -> None:
    res = _ctl("up", "--detach", "--state-dir", detached.state_dir)
    assert res.returncode == 1
    assert "already running" in res.stderr and "vnetctl down" in res.stderr


def test_port_in_use_is_named(detached: Detached, tmp_root: Path) -> None:
    res = _ctl("up", "--state-dir", tmp_root / "stack-port-clash", "--nats-port", str(detached.stack.nats_port))
    assert res.returncode == 1
    assert f"port {detached.stack.nats_port}" in res.stderr and "--nats-port" in res.stderr
    assert not (tmp_root / "stack-port-clash" / "stack.json").exists()


@pytest.mark.skipif(not IS_ROOT, reason="the demo's containers are network namespaces: needs root")
def test_demo_does_the_main_job(detached: Detached, run_prefix: str) -> None:
    """`vnetctl demo`: networks, containers, reachability that matches explain, all removed after."""
    res = _ctl("demo", state_dir=detached.state_dir, timeout=WAIT_S * 2)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    for src, dst, seen in (("a", "b", "reaches"), ("b", "a", "reaches"), ("a", "c", "blocked"),
                           ("c", "a", "blocked")):
        assert f"{src} -> {dst}: {seen}" in out, out
    assert "MISMATCH" not in out and "cleaned up" in out, out
    # the demo's namespaces carry the run prefix and "-demo-" (other tests' come and go meanwhile)
    made = re.findall(r" mac \S+ in (\S+) -> ", out)
    assert len(made) == 3 and all(n.startswith(f"{run_prefix}-demo-") for n in made), out
    assert not [n for n in _netns_list() if n.startswith(f"{run_prefix}-demo-")], "the demo left namespaces behind"
    assert not [n for n in _netns_list() if n.startswith(f"{run_prefix}-demo")]


def test_down_leaves_nothing(own_stack: Detached) -> None:
    st = own_stack.leftovers.remember()
    assert st is not None
    _wait_status(own_stack.state_dir, time.monotonic() + WAIT_S)
    res = _ctl("down", "--state-dir", own_stack.state_dir, timeout=WAIT_S)
    assert res.returncode == 0, res.stdout + res.stderr
    assert_nothing_left(own_stack.state_dir, own_stack.leftovers.seen)
    # The supervisor says why it stopped: the signal and its sender (`vnetctl down`, alive then).
    log = (own_stack.state_dir / "logs" / "supervisor.log").read_text(errors="replace")
    assert re.search(rf"SIGTERM from pid \d+ \(uid {os.getuid()}: \S*python\S* \S*vnetctl .*down --state-dir "
                     rf".*via kill\(\): stopping the stack", log), log[-3000:]
    again = _ctl("down", "--state-dir", own_stack.state_dir)
    assert again.returncode == 0 and "nothing to stop" in again.stdout


# --- foreground: Ctrl-C stops everything ---------------------------------------------------

def test_foreground_ctrl_c_leaves_nothing(tmp_root: Path, run_prefix: str) -> None:
    state_dir = tmp_root / "stack-foreground"
    left = Leftovers(state_dir, run_prefix)
    proc = subprocess.Popen([VNETCTL, "up", "--state-dir", str(state_dir), "--stop-timeout", STOP_TIMEOUT],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + WAIT_S
        st = None
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"`vnetctl up` exited early:\n{proc.communicate()[0]}"
            st = left.remember()
            if st is not None and st.status == "ready":
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"the foreground stack was not ready within {WAIT_S} s")
        assert st is not None
        assert st.supervisor_pid == proc.pid
        _wait_status(state_dir, time.monotonic() + WAIT_S)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C delivers to the foreground process
        out, _ = proc.communicate(timeout=WAIT_S)
        assert proc.returncode == 0, out
        assert "ready" in out and "stopped" in out, out
        # the stop is logged with its sender: this test's own process
        assert f"SIGINT from pid {os.getpid()} (uid {os.getuid()}: " in out, out
        assert_nothing_left(state_dir, left.seen)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        left.cleanup()
