"""The Valkey ACL of docker-compose.yml run for real: valkey-server started with the compose
file's command line."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.contract.compose_model import argv, interpolate, load_compose, valkey_users
from vnet.contracts import subjects


def test_valkey_acl_of_the_compose_file_for_real(tmp_path: Path) -> None:
    """valkey-server started with the compose file's command line (defaults interpolated):
    nothing without a password, the default user may only PING, each service user works on
    VNet's keys and is refused @dangerous commands and other keys."""
    import redis
    from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

    from vnet.runtime import servers

    try:
        binary = servers.valkey_server_binary()
    except FileNotFoundError:
        pytest.skip("valkey-server not installed")
    valkey = load_compose()["services"]["valkey"]
    cmd = [interpolate(c, {}) for c in argv(valkey.get("command"))]
    users = valkey_users(cmd)
    port = servers.free_port()
    log = tmp_path / "valkey.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([binary, *cmd[1:], "--port", str(port), "--bind", "127.0.0.1", "--dir",
                                 str(tmp_path), "--daemonize", "no"], stdout=out, stderr=subprocess.STDOUT)
    try:
        servers._wait_port("127.0.0.1", port, proc, "valkey-server", log)
        anon = redis.Redis(port=port)
        with pytest.raises((AuthenticationError, ResponseError)):
            anon.get("vnet:x")
        health = redis.Redis(port=port, password=users["default"]["password"])
        assert health.ping()
        with pytest.raises(NoPermissionError):
            health.get("vnet:x")
        for svc in subjects.SERVICES:
            name = f"vnet-svc-{svc}"
            r = redis.Redis(port=port, username=name, password=users[name]["password"])
            r.set("vnet:{t}:k", b"1")
            with pytest.raises(NoPermissionError):
                r.set("elsewhere", b"1")
            with pytest.raises(NoPermissionError):
                r.execute_command("CONFIG", "GET", "*")
            r.close()
        anon.close()
        health.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
