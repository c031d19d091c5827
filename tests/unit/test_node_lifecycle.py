"""A node's defaults, its sub-interface ledger, the WireGuard guard and capability check
(issue 18); no root, no kernel: the kernel side is in tests/netns/test_node_lifecycle.py."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from vnet.adapters import wireguard as wg
from vnet.core import naming
from vnet.core.errors import VNetError
from vnet.core.plan import Departed
from vnet.runtime.config import VNetConfig
from vnet.svc.node import lifecycle
from vnet.svc.node.reconcile import read_ledger, write_ledger


def test_default_wireguard_interface_is_one_per_node() -> None:
    names = {naming.wg_name(f"node-{i}") for i in range(1000)}
    assert len(names) == 1000  # distinct (wireguard-go's sockets share one directory)
    n = naming.wg_name("node-1")
    assert n == naming.wg_name("node-1") and n.startswith("vnw-") and len(n) == 14
    assert naming.check_ifname(n) == n and naming.is_our_wg(n)
    # not a network's interface: the planner deletes every is_ours() link no network wants
    assert not naming.is_ours(n) and not naming.is_our_wg("vnwg0")


def test_wg_ifname_flag_wins_and_is_checked() -> None:
    assert lifecycle.wg_ifname({}, "n1") == naming.wg_name("n1")
    assert lifecycle.wg_ifname({"wg_ifname": "wgx"}, "n1") == "wgx"
    with pytest.raises(VNetError) as info:
        lifecycle.wg_ifname({"wg_ifname": "much-too-long-name0"}, "n1")
    assert info.value.code == "invalid_config" and "--wg-ifname" in info.value.message


def test_state_dir_defaults(tmp_path: Path) -> None:
    cfg = VNetConfig.load(env={})
    assert lifecycle.state_dir(VNetConfig.load(env={}, node_state_dir="/x/y"), "n1") == "/x/y"
    assert lifecycle.state_dir(cfg, "n1", {"VNET_STATE_DIR": str(tmp_path)}) == str(tmp_path / "nodes" / "n1")
    # the test suite never writes outside /tmp
    assert lifecycle.state_dir(cfg, "n1", {"VNET_RUN_PREFIX": "vtx"}) == str(
        Path(tempfile.gettempdir()) / "vtx-nodes" / "n1")
    plain = lifecycle.state_dir(cfg, "n1", {"XDG_STATE_HOME": str(tmp_path)})
    if os.geteuid() == 0:
        assert plain == "/var/lib/vnet/nodes/n1"
    else:
        assert plain == str(tmp_path / "vnet" / "nodes" / "n1")
    assert lifecycle.state_dir(cfg, "a/b", {"VNET_STATE_DIR": str(tmp_path)}).endswith("/nodes/a_b")


def test_ledger_round_trip_private_and_gone_when_empty(tmp_path: Path) -> None:
    path = tmp_path / "state" / "subifs.json"
    subifs = {"e1": Departed(id="e1", netns="c1", ifname="eth0", kind="macvlan", mac="02:00:00:00:00:01"),
              "e2": Departed(id="e2", netns="/proc/7/ns/net", ifname="eth1", kind="ipvlan")}
    write_ledger(path, subifs)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_ledger(path) == subifs
    write_ledger(path, {})
    assert not path.exists()
    assert read_ledger(path) == {}
    path.write_text("{not json")
    assert read_ledger(path) == {}  # unreadable: nothing to clean, never a crash
    path.write_text('{"subifs": [{"id": "e1"}, 5, {"id": "e3", "netns": "c3", "ifname": "e", "kind": "macvlan"}]}')
    assert list(read_ledger(path)) == ["e3"]


def _guard(tmp_path: Path, child: list[str]) -> tuple[subprocess.Popen[bytes], Path]:
    """The guard in this process's own namespace (its path: /proc/self/ns/net of the guard)."""
    sock = tmp_path / "x.sock"
    p = subprocess.Popen([sys.executable, "-I", str(wg.GUARD), "/proc/self/ns/net", str(sock), "--", *child],
                         stderr=subprocess.PIPE)
    return p, sock


def test_guard_stops_its_child_and_removes_the_socket_it_left(tmp_path: Path) -> None:
    marker = tmp_path / "child.pid"
    child = [sys.executable, "-c", f"import os, time; open({str(marker)!r}, 'w').write(str(os.getpid())); "
             "time.sleep(120)", "ifname0"]
    p, sock = _guard(tmp_path, child)
    try:
        deadline = time.monotonic() + 30
        while not marker.exists() or not marker.read_text():
            assert time.monotonic() < deadline and p.poll() is None
            time.sleep(0.02)
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(sock))  # the child's control socket (wireguard-go's, in real life)
        s.close()
        time.sleep(1.2)  # the guard notes the socket it saw
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0
        pid = int(marker.read_text())
        assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
        assert not sock.exists()
        assert p.stderr is not None and b"stopped wireguard-go (signal 15)" in p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_guard_exits_with_its_child_and_refuses_another_namespace(tmp_path: Path) -> None:
    p, _ = _guard(tmp_path, [sys.executable, "-c", "raise SystemExit(3)", "ifname0"])
    assert p.wait(30) == 3
    other = tmp_path / "not-a-namespace"
    other.write_text("")
    r = subprocess.run([sys.executable, "-I", str(wg.GUARD), str(other), str(tmp_path / "s"), "--", "true"],
                       capture_output=True, timeout=30)
    assert r.returncode == 2 and b"not inside" in r.stderr


def test_capability_says_what_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    w = wg.WireGuard(None, blocker / "state", lambda name: False)
    real_which = wg.shutil.which

    def which(name: str) -> str | None:
        return "/usr/bin/" + name if name in ("wg", "wireguard-go") else real_which(name)

    monkeypatch.setattr(wg.shutil, "which", which)
    sup = w.capability("vnw-x", kernel_module=True)
    assert not sup.available and "node_state_dir" in sup.reason, sup
    monkeypatch.setattr(wg.shutil, "which", lambda name: None if name == "wireguard-go" else which(name))
    sup = w.capability("vnw-x", kernel_module=False)
    assert not sup.available and "wireguard-go" in sup.reason and "apt-get install" in sup.reason, sup
    monkeypatch.setattr(wg.shutil, "which", lambda name: None)
    sup = w.capability("vnw-x", kernel_module=True)
    assert not sup.available and "wg tool" in sup.reason, sup
