"""Generated passwords survive nats-server's parsing of ``$VAR`` references."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from vnet.runtime import credentials, servers


def test_every_generated_password_starts_with_a_letter() -> None:
    for _ in range(2000):
        assert re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]{40,}", credentials.new_password())


def test_nats_server_accepts_generated_passwords_from_the_environment(tmp_path: Path) -> None:
    conf = tmp_path / "nats.conf"

    def accepted(password: str) -> bool:
        conf.write_text("port: 0\nauthorization { users = [ { user: a, password: $PW } ] }\n")
        r = subprocess.run([servers.nats_server_binary(), "-c", str(conf), "-t"], capture_output=True, text=True,
                           env={**os.environ, "PW": password}, timeout=30)
        return r.returncode == 0

    assert not accepted("-" + "x" * 40) and not accepted("9-" + "x" * 40)  # the shapes that broke it
    assert all(accepted(credentials.new_password()) for _ in range(20))
    assert accepted("v-" + "x" * 40) and accepted("v9-" + "x" * 40)  # the same shapes behind a letter
