"""Ports of the stack's own servers (free ones, or the user's choice checked) and the
reachability of servers the user named instead."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

from vnet.runtime import servers
from vnet.runtime.stackfile import StackError


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # Match what the servers do, so a port in TIME_WAIT does not count as taken.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def pick_port(explicit: int | None, flag: str, what: str, taken: set[int]) -> int:
    if explicit is not None:
        if explicit in taken or not port_free(explicit):
            raise StackError(f"port {explicit} on 127.0.0.1 is already in use, so {what} cannot listen there; "
                             f"choose another with {flag}, or leave {flag} out to use a free port")
        taken.add(explicit)
        return explicit
    while True:
        port = servers.free_port()
        if port not in taken:
            taken.add(port)
            return port


def check_reachable(url: str, default_port: int, what: str, flag: str) -> None:
    parts = urlsplit(url)
    if parts.scheme in ("unix", "unixs"):
        return
    host = parts.hostname or "127.0.0.1"
    try:
        port = parts.port or default_port
    except ValueError:
        raise StackError(f"{flag} {url!r} has an invalid port") from None
    try:
        with socket.create_connection((host, port), timeout=2.0):
            pass
    except OSError as exc:
        raise StackError(f"cannot reach {what} at {url} ({exc.strerror or exc}); start it, fix {flag}, "
                         f"or leave {flag} out to let `vnetctl up` start its own") from None
