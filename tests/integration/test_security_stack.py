"""Secure by default (issue 10): the real ``vnetctl up`` and what another local user can reach
(nothing): private files, generated credentials, rotation, the identities each process gets;
and TLS for a node worker on another machine.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from vnet.contracts import permissions
from vnet.core import errors as E
from vnet.runtime import credentials, servers
from vnet.runtime.config import VNetConfig

# --- the embedded stack: files, credentials, another local user ------------------------------------

VNETCTL = str(Path(sys.executable).parent / "vnetctl")
NOBODY = 65534


def _env(state_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VNET_") or k == "VNET_RUN_PREFIX"}
    env["VNET_STATE_DIR"] = str(state_dir)
    return env


def _modes(root: Path) -> dict[str, int]:
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for p in root.rglob("*"):
        if not p.is_symlink():
            out[str(p.relative_to(root))] = stat.S_IMODE(p.stat().st_mode)
    return out


# Run by /usr/bin/python3 as a throwaway uid: the venv's interpreter lives under /root (0700).
_OTHER_USER = r"""
import json, os, socket, sys
state, nport, rport = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = {"uid": os.getuid()}
def attempt(name, fn):
    try:
        out[name] = "ok: " + str(fn())[:80]
    except Exception as e:
        out[name] = "refused: " + type(e).__name__
attempt("list", lambda: os.listdir(state))
attempt("creds", lambda: open(os.path.join(state, "credentials.json")).read())
attempt("stack", lambda: open(os.path.join(state, "stack.json")).read())
def nats_talk():
    s = socket.create_connection(("127.0.0.1", nport), timeout=5)
    s.recv(4096)  # INFO
    s.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\nPING\r\n')
    return s.recv(4096).decode(errors="replace").strip()
def valkey_talk():
    s = socket.create_connection(("127.0.0.1", rport), timeout=5)
    s.sendall(b"PING\r\n")
    return s.recv(4096).decode(errors="replace").strip()
attempt("nats", nats_talk)
attempt("valkey", valkey_talk)
print(json.dumps(out))
"""


@pytest.mark.stack
@pytest.mark.timeout(180)
def test_embedded_stack_is_private_and_authenticated(tmp_path: Path, run_prefix: str) -> None:
    state = tmp_path / f"{run_prefix}-secstack"
    # As an older version left it: world-readable directory and files.
    (state / "logs").mkdir(parents=True)
    state.chmod(0o755)
    (state / "logs" / "old.log").write_text("old\n")
    (state / "logs" / "old.log").chmod(0o644)
    env = _env(state)
    # with the demo: attaches, waits and reads under the identities and permissions of the stack
    up = subprocess.run([VNETCTL, "up", "--detach", "--demo", "--state-dir", str(state), "--stop-timeout", "5"],
                        env=env, capture_output=True, text=True, timeout=180, check=False)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "4. cleaned up" in up.stdout and "MISMATCH" not in up.stdout, up.stdout + up.stderr
        assert up.stdout.count("-> ready") == 3, up.stdout + up.stderr
        # Nothing the stack itself did was refused, among them the node's answers to the demo's
        # creates (it may answer the one forwarded to it, once: a copy it heard twice was refused).
        refused = [line for line in (state / "logs" / "nats-server.log").read_text().splitlines()
                   if "Publish Violation" in line or "Subscription Violation" in line]
        assert not refused, refused
        st = json.loads((state / "stack.json").read_text())
        assert st["auth"] is True
        # 0700 directories, 0600 files, everything (data, logs, configs, stack.json).
        modes = _modes(state)
        for name in ("credentials.json", "nats.conf", "valkey.conf", "stack.json", "logs/nats-server.log",
                     "logs/old.log"):
            assert modes.get(name) == 0o600, (name, oct(modes.get(name, 0)))
        wrong = {k: oct(v) for k, v in modes.items() if v & 0o077}
        assert not wrong, f"readable by others: {wrong}"
        assert modes["."] == 0o700
        # Passwords are on no command line (every local user can read /proc/<pid>/cmdline).
        creds = json.loads((state / "credentials.json").read_text())
        secrets = [*creds["nats"].values(), *creds["redis"].values()]
        for name, p in st["processes"].items():
            cmd = Path(f"/proc/{p['pid']}/cmdline").read_bytes().decode(errors="replace")
            assert not any(pw in cmd for pw in secrets), f"{name} has a password on its command line"
        # Each process has its own identity; the node worker has no Valkey credentials.
        def environ(pid: int) -> dict[str, str]:
            raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            return dict(x.decode().split("=", 1) for x in raw if b"=" in x)

        node_env = environ(st["processes"]["node"]["pid"])
        assert node_env["VNET_NATS_USER"] == f"vnet-node-{st['node_id']}"
        assert "VNET_REDIS_PASSWORD" not in node_env and "VNET_REDIS_USERNAME" not in node_env
        ipam_env = environ(st["processes"]["ipam"]["pid"])
        assert ipam_env["VNET_NATS_USER"] == "vnet-svc-ipam" and ipam_env["VNET_REDIS_USERNAME"] == "vnet-svc-ipam"
        # The owner's vnetctl finds the credentials by itself.
        status = subprocess.run([VNETCTL, "status"], env=env, capture_output=True, text=True, timeout=60,
                                check=False)
        assert status.returncode == 0 and "node" in status.stdout, status.stdout + status.stderr
        # Another local user gets nothing: no listing, no file, no NATS, no Valkey.
        other = subprocess.run(["/usr/bin/python3", "-c", _OTHER_USER, str(state), str(st["nats_port"]),
                                str(st["redis_port"])], user=NOBODY, group=NOBODY, capture_output=True, text=True,
                               timeout=60, check=False, cwd="/", env={"PATH": "/usr/bin:/bin"})
        assert other.returncode == 0, other.stderr
        seen = json.loads(other.stdout)
        assert seen["uid"] == NOBODY
        for k in ("list", "creds", "stack"):
            assert seen[k] == "refused: PermissionError", seen
        assert "Authorization Violation" in seen["nats"], seen
        assert "NOAUTH" in seen["valkey"], seen
    finally:
        down = subprocess.run([VNETCTL, "down", "--state-dir", str(state)], env=env, capture_output=True, text=True,
                              timeout=60, check=False)
        assert down.returncode == 0, down.stdout + down.stderr


def test_rotating_credentials_makes_new_ones(tmp_path: Path) -> None:
    first = credentials.ensure(tmp_path, ["n1"])
    assert credentials.ensure(tmp_path, ["n1"]) == first  # kept across restarts
    more = credentials.ensure(tmp_path, ["n1", "n2"])  # a new node id gets its own
    assert "vnet-node-n2" in more.nats and more.nats["vnet-admin"] == first.nats["vnet-admin"]
    assert credentials.rotate(tmp_path)
    again = credentials.ensure(tmp_path, ["n1"])
    assert set(again.nats) == set(first.nats)
    assert all(again.nats[u] != first.nats[u] for u in first.nats)
    assert stat.S_IMODE((tmp_path / credentials.CREDENTIALS_FILE).stat().st_mode) == 0o600


def test_identities_of_the_stack(tmp_path: Path) -> None:
    from vnet.runtime.stack import _Identities

    creds = credentials.ensure(tmp_path, ["h1"])
    ids = _Identities(VNetConfig.load(env={}, redis_password="leak"), creds, creds)
    node = ids.node("h1")
    assert node.nats_user == "vnet-node-h1" and node.redis_password is None and node.redis_username is None
    svc = ids.service("policy")
    assert svc.nats_user == "vnet-svc-policy" and svc.redis_username == "vnet-svc-policy"
    assert svc.redis_password == creds.redis["vnet-svc-policy"] != creds.nats["vnet-svc-policy"]
    assert ids.admin().nats_user == "vnet-admin"
    # An existing NATS the stack does not manage: the user's own settings stand.
    plain = _Identities(VNetConfig.load(env={}, nats_user="mine"), None, None)
    assert plain.node("h1").nats_user == "mine"
    assert msgspec.structs.asdict(plain.admin())["nats_user"] == "mine"


# --- TLS: a node worker on another machine ----------------------------------------------------------

@pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command is not installed")
async def test_node_worker_connects_over_tls_and_is_refused_without_it(tmp_path: Path) -> None:
    """NATS with the stack's TLS (its own CA): the real node worker connects with the CA and
    its node credentials; without the CA it cannot (the certificate is not trusted), and a
    plain-text client is refused by the server."""
    from vnet.client import VNetManager
    from vnet.runtime import launcher, tls
    from vnet.runtime import service as svc_runtime

    creds = credentials.ensure(tmp_path, ["tn1"])
    block = tls.nats_tls_block(tmp_path)
    conf = credentials.write_nats_conf(tmp_path, creds, ["tn1"], tls=block)
    assert "tls {" in conf.read_text()
    srv = servers.start_nats(tmp_path / "nats", config_file=conf)
    try:
        def cfg(user: permissions.User, **kw: Any) -> VNetConfig:
            return VNetConfig.load(env={}, nats_url=srv.url, nats_user=user.name,
                                   nats_password=creds.nats[user.name], connect_timeout_s=5.0, **kw)

        node = permissions.node_user("tn1")
        rt = await svc_runtime.start(launcher.load_service("node"), cfg(node, nats_tls_ca=block["ca_file"]),
                                     params={"node": "tn1"})
        try:
            async with VNetManager(cfg(permissions.admin_user(), nats_tls_ca=block["ca_file"])) as m:
                # It answers over TLS (degraded: no endpoint service here to register with).
                assert (await m.health("node", node="tn1")).status in ("ok", "degraded")
        finally:
            await rt.stop(drain_timeout=2.0)
        with pytest.raises(E.VNetError) as ei:  # no CA: the server's certificate is not trusted
            await svc_runtime.start(launcher.load_service("node"), cfg(node), params={"node": "tn1"})
        assert ei.value.code == "unavailable" and "certificate" in ei.value.message.lower()
        # Plain text, right credentials: the server wants TLS first.
        import socket as _socket

        with _socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            info = s.recv(4096)
            assert b'"tls_required":true' in info
            s.sendall(b'CONNECT {"verbose":false,"user":"vnet-node-tn1","pass":"%s"}\r\nPING\r\n'
                      % creds.nats["vnet-node-tn1"].encode())
            assert b"PONG" not in s.recv(4096)
    finally:
        srv.stop()


@pytest.mark.stack
@pytest.mark.timeout(180)
@pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command is not installed")
def test_embedded_stack_with_tls(tmp_path: Path, run_prefix: str) -> None:
    """``VNET_STACK_TLS=true vnetctl up``: NATS wants TLS with the stack's own CA; every process
    of the stack and the owner's vnetctl use it by themselves; the CA key stays 0600."""
    state = tmp_path / f"{run_prefix}-tlsstack"
    env = {**_env(state), "VNET_STACK_TLS": "true"}
    up = subprocess.run([VNETCTL, "up", "--detach", "--state-dir", str(state), "--stop-timeout", "5"], env=env,
                        capture_output=True, text=True, timeout=120, check=False)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        st = json.loads((state / "stack.json").read_text())
        assert st["nats_tls_ca"] == str(state / "tls" / "ca.pem") and "TLS" in up.stdout
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in (state / "tls").iterdir())
        status = subprocess.run([VNETCTL, "status"], env=_env(state), capture_output=True, text=True, timeout=60,
                                check=False)
        assert status.returncode == 0 and "node" in status.stdout, status.stdout + status.stderr
        assert "Violation" not in (state / "logs" / "nats-server.log").read_text()
    finally:
        down = subprocess.run([VNETCTL, "down", "--state-dir", str(state)], env=_env(state), capture_output=True,
                              text=True, timeout=60, check=False)
        assert down.returncode == 0, down.stdout + down.stderr
