#!/usr/bin/env python3
"""vnet-cni: the CNI 1.1 plugin of VNet — a shim that hands each call to the local node
worker over a unix socket (root only) and prints what it answers.

A runtime execs a plugin once per call, so this file imports ``os``, ``sys`` and (past
VERSION) ``_socket`` only: no VNet package, no msgspec, no NATS, not even ``json`` (whose regular
expressions cost a few ms of every start) or ``socket`` (its ``selectors``, ``enum`` and
``array`` imports cost ~10 ms, two thirds of a bare interpreter's start; ``_socket`` is the C
module under it and costs nothing measurable). The configuration goes to the node worker as
the bytes the runtime wrote; the node parses it, does the work through the control plane
(``services/vnet/svc/node/cni.py``) and answers with the exit code and the exact stdout
of the call (results and errors as the spec says, ``vnet/core/cni.py``). It is installed
as a standalone executable by ``vnetctl cni install``.

Environment and stdin exactly as the CNI spec: ``CNI_COMMAND`` (ADD, DEL, CHECK, STATUS,
GC, VERSION), ``CNI_CONTAINERID``, ``CNI_NETNS``, ``CNI_IFNAME``, ``CNI_ARGS``, the
network configuration on stdin. The socket: the conf's ``"socket"``, else
``$VNET_CNI_SOCKET``, else ``/run/vnet/cni.sock``.

The request on the socket: ``VNETCNI1`` and the five CNI_* values, one per line, then the
configuration as read; the answer: the exit code on the first line, then stdout.
"""

import os
import sys

SUPPORTED = '["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]'
DEFAULT_SOCKET = "/run/vnet/cni.sock"
TIMEOUTS = {"ADD": 75.0, "DEL": 75.0, "GC": 120.0}


def _error(code: int, msg: str) -> int:
    # no json here: msg is ours, made safe for a JSON string by hand
    safe = msg.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")
    sys.stdout.write(f'{{"cniVersion": "1.1.0", "code": {code}, "msg": "{safe}"}}\n')
    return 1


def _socket_path(conf: str) -> str:
    """The conf's "socket" string, read without a JSON parser; the json module only when
    the text is not the plain form vnetctl writes."""
    i = conf.find('"socket"')
    if i >= 0:
        rest = conf[i + 8:].lstrip()
        if rest.startswith(":"):
            rest = rest[1:].lstrip()
            end = rest.find('"', 1)
            if rest.startswith('"') and end > 0 and "\\" not in rest[1:end]:
                return rest[1:end]
        try:
            import json  # the unusual case: escapes or odd spacing

            v = json.loads(conf).get("socket")
            if isinstance(v, str) and v:
                return v
        except (ValueError, AttributeError):
            pass  # the node answers the decoding failure with the spec's code
    return os.environ.get("VNET_CNI_SOCKET") or DEFAULT_SOCKET


def main() -> int:
    cmd = os.environ.get("CNI_COMMAND", "")
    if cmd == "VERSION":
        sys.stdout.write(f'{{"cniVersion": "1.1.0", "supportedVersions": {SUPPORTED}}}\n')
        return 0
    if cmd not in ("ADD", "DEL", "CHECK", "STATUS", "GC"):
        return _error(4, f"CNI_COMMAND {cmd!r} is not one of ADD, DEL, CHECK, STATUS, GC, VERSION")
    conf = sys.stdin.read()
    body = conf.strip()
    if not (body.startswith("{") and body.endswith("}")):
        return _error(6, "the network configuration on stdin is not a JSON object")
    path = _socket_path(conf)
    import _socket  # not socket: see above

    head = "\n".join(["VNETCNI1", cmd] + [os.environ.get("CNI_" + k, "").replace("\n", " ")
                                          for k in ("CONTAINERID", "NETNS", "IFNAME", "ARGS")])
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    s.settimeout(TIMEOUTS.get(cmd, 15.0))
    try:
        try:
            s.connect(path)
        except OSError as exc:
            return _error(50 if cmd == "STATUS" else 11,
                          f"the VNet node worker does not answer on {path} ({exc.strerror or exc}); is vnet-node "
                          "running with --cni?")
        s.sendall((head + "\n").encode() + conf.encode())
        s.shutdown(_socket.SHUT_WR)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    except OSError as exc:
        return _error(11, f"talking to the VNet node worker on {path} failed: {exc}")
    finally:
        s.close()
    reply = b"".join(chunks).decode(errors="replace")
    code, _, out = reply.partition("\n")
    if not code.isdigit():
        return _error(5, f"the VNet node worker on {path} answered something this shim does not understand")
    sys.stdout.write(out)
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
