"""The embedded stack's secrets: generated once, kept in its state directory, 0600.

``vnetctl up`` calls :func:`ensure` on every start: it makes a strong random password for
every identity of :mod:`vnet.contracts.permissions` (admin, client, monitor, each
service, each node id the stack runs) that has none yet, and writes::

    credentials.json   {"nats": {user: password}, "redis": {user: password}}
    nats.conf          nats-server users and permissions, generated from the matrix
    valkey.conf        Valkey ACL users (one per service; the default user is off)

Everything under the state directory is private to its owner (directories 0700, files
0600; :func:`secure_tree` repairs an older, world-readable one), so a process of another
local user can neither read a password nor a data file. Rotating is deleting
``credentials.json`` while the stack is down (:func:`rotate`): the next start makes new
ones for everybody.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import msgspec

from vnet.contracts import permissions as P
from vnet.contracts import subjects

CREDENTIALS_FILE = "credentials.json"
NATS_CONF = "nats.conf"
VALKEY_CONF = "valkey.conf"
DIR_MODE = 0o700
FILE_MODE = 0o600


class Credentials(msgspec.Struct, kw_only=True):
    version: int = 1
    nats: dict[str, str] = {}
    redis: dict[str, str] = {}


class CredentialsError(Exception):
    pass


def new_password() -> str:
    """256 random bits, URL-safe (no quoting trouble in either config), after a letter:
    nats-server parses a ``$VAR`` password from the environment as a config value, and one
    that starts like a number or a date (``-x...``, ``9-...``) fails to parse, about one
    stack in ten with every user's password drawn this way."""
    return "v" + secrets.token_urlsafe(32)


def private_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, readable by the owner only from the first byte."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)  # O_CREAT's mode only applies to a new file
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def secure_tree(root: Path) -> list[str]:
    """Make ``root`` and everything below it owner-only (0700 / 0600); returns what could
    not be changed. Symlinks are left alone (their mode is meaningless; we make none)."""
    problems: list[str] = []

    def fix(p: Path, mode: int) -> None:
        try:
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                return
            if stat.S_IMODE(st.st_mode) & 0o077:
                os.chmod(p, stat.S_IMODE(st.st_mode) & ~0o077 | (mode & 0o700))
        except FileNotFoundError:
            pass
        except OSError as exc:
            problems.append(f"cannot make {p} private: {exc.strerror}")

    fix(root, DIR_MODE)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            fix(Path(dirpath, d), DIR_MODE)
        for f in filenames:
            fix(Path(dirpath, f), FILE_MODE)
    return problems


def load(state_dir: Path) -> Credentials | None:
    """The stack's credentials, None if there are none (or we may not read them)."""
    path = state_dir / CREDENTIALS_FILE
    try:
        data = path.read_bytes()
    except (FileNotFoundError, PermissionError, NotADirectoryError):
        return None
    except OSError as exc:
        raise CredentialsError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return msgspec.json.decode(data, type=Credentials)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise CredentialsError(f"{path} is damaged ({exc}); stop the stack and delete it to make new "
                               "credentials") from None


def service_redis_user(service: str) -> str:
    return f"vnet-svc-{service}"


def ensure(state_dir: Path, nodes: Iterable[str], services: Iterable[str] = subjects.SERVICES) -> Credentials:
    """The stack's credentials, with a new password for every identity that has none yet."""
    creds = load(state_dir) or Credentials()
    changed = False
    for u in P.users(nodes, services):
        if u.name not in creds.nats:
            creds.nats[u.name] = new_password()
            changed = True
    for s in services:
        if service_redis_user(s) not in creds.redis:
            creds.redis[service_redis_user(s)] = new_password()
            changed = True
    if changed or not (state_dir / CREDENTIALS_FILE).exists():
        private_write(state_dir / CREDENTIALS_FILE, msgspec.json.format(msgspec.json.encode(creds)))
    return creds


def rotate(state_dir: Path) -> bool:
    """Forget every credential (the stack must be down); the next ``vnetctl up`` makes new ones."""
    gone = False
    for name in (CREDENTIALS_FILE, NATS_CONF, VALKEY_CONF):
        with contextlib.suppress(FileNotFoundError):
            (state_dir / name).unlink()
            gone = True
    return gone


def write_nats_conf(state_dir: Path, creds: Credentials, nodes: Iterable[str],
                    tls: Mapping[str, str] | None = None) -> Path:
    path = state_dir / NATS_CONF
    text = P.local_nats_config({u: pw for u, pw in creds.nats.items()}, list(nodes), tls=tls)
    private_write(path, text.encode())
    return path


def valkey_conf(creds: Credentials) -> str:
    """ACL users: the default user is off (a connection without a password can do nothing);
    each service may run data commands on VNet's keys (``vnet:*``), none of @dangerous
    (CONFIG, FLUSHALL, KEYS, DEBUG, MONITOR, ...)."""
    lines = ["# VNet embedded stack: generated by vnetctl up. Holds passwords: keep it 0600.",
             "user default off"]
    for user, pw in sorted(creds.redis.items()):
        lines.append(f"user {user} on >{pw} ~vnet:* resetchannels +@all -@dangerous")
    return "\n".join(lines) + "\n"


def write_valkey_conf(state_dir: Path, creds: Credentials) -> Path:
    path = state_dir / VALKEY_CONF
    private_write(path, valkey_conf(creds).encode())
    return path


def client_settings(state_dir: Path, role: str = P.ADMIN) -> dict[str, Any]:
    """VNetConfig fields that let a caller of the local stack in ``state_dir`` in as ``role``
    (admin: the stack's owner); empty when there are no credentials there or we may not
    read them (another user's stack)."""
    try:
        creds = load(state_dir)
    except CredentialsError:
        return {}
    user = {P.ADMIN: P.admin_user(), P.CLIENT: P.client_user(), P.MONITOR: P.monitor_user()}[role]
    if creds is None or user.name not in creds.nats:
        return {}
    return {"nats_user": user.name, "nats_password": creds.nats[user.name]}
