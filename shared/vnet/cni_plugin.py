#!/usr/bin/env python3
"""vnet-cni: the CNI 1.1 plugin of VNet — a shim that hands each call to the local node
worker over a unix socket (root only) and prints what it answers.

A runtime execs a plugin once per call, so this file imports the standard library only
(no VNet package, no msgspec, no NATS: about 20 ms of Python start-up instead of
hundreds) and is installed as a standalone executable by ``vnetctl cni install``. The
node worker does the work through the control plane (``services/vnet/svc/node/cni.py``)
and knows the spec's result and error shapes (``vnet/core/cni.py``).

Environment and stdin exactly as the CNI spec: ``CNI_COMMAND`` (ADD, DEL, CHECK, STATUS,
GC, VERSION), ``CNI_CONTAINERID``, ``CNI_NETNS``, ``CNI_IFNAME``, ``CNI_ARGS``, the
network configuration on stdin. The socket: the conf's ``"socket"``, else
``$VNET_CNI_SOCKET``, else ``/run/vnet/cni.sock``.
"""

import json
import os
import socket
import sys

SUPPORTED = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
DEFAULT_SOCKET = "/run/vnet/cni.sock"
TIMEOUTS = {"ADD": 75.0, "DEL": 75.0, "GC": 120.0}


def _error(version: str, code: int, msg: str, details: str = "") -> int:
    out = {"cniVersion": version, "code": code, "msg": msg}
    if details:
        out["details"] = details
    sys.stdout.write(json.dumps(out) + "\n")
    return 1


def _args(raw: str) -> dict[str, str]:
    out = {}
    for part in raw.split(";"):
        if "=" in part:
            k, v = part.split("=", 1)
            out[k] = v
    return out


def main() -> int:
    cmd = os.environ.get("CNI_COMMAND", "")
    raw = sys.stdin.read() if cmd != "" else ""
    try:
        conf = json.loads(raw) if raw.strip() else {}
    except ValueError as exc:
        return _error("1.1.0", 6, f"the network configuration on stdin is not JSON: {exc}")
    if not isinstance(conf, dict):
        return _error("1.1.0", 6, "the network configuration on stdin is not a JSON object")
    v = conf.get("cniVersion")
    version = v if isinstance(v, str) else "1.1.0"
    if cmd == "VERSION":
        sys.stdout.write(json.dumps({"cniVersion": "1.1.0", "supportedVersions": SUPPORTED}) + "\n")
        return 0
    if cmd not in ("ADD", "DEL", "CHECK", "STATUS", "GC"):
        return _error(version, 4, f"CNI_COMMAND {cmd!r} is not one of ADD, DEL, CHECK, STATUS, GC, VERSION")
    if version not in SUPPORTED:
        return _error(version, 1, f"cniVersion {version} is not supported; vnet-cni supports {', '.join(SUPPORTED)}")
    req = {"command": cmd, "container_id": os.environ.get("CNI_CONTAINERID", ""),
           "netns": os.environ.get("CNI_NETNS", ""), "ifname": os.environ.get("CNI_IFNAME", ""),
           "args": _args(os.environ.get("CNI_ARGS", "")), "config": conf}
    path = conf.get("socket") if isinstance(conf.get("socket"), str) else None
    path = path or os.environ.get("VNET_CNI_SOCKET") or DEFAULT_SOCKET
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(TIMEOUTS.get(cmd, 15.0))
    try:
        try:
            s.connect(path)
        except OSError as exc:
            code = 50 if cmd == "STATUS" else 11
            return _error(version, code, f"the VNet node worker does not answer on {path} ({exc.strerror or exc}); "
                          "is vnet-node running with --cni?")
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    except OSError as exc:
        return _error(version, 11, f"talking to the VNet node worker on {path} failed: {exc}")
    finally:
        s.close()
    try:
        resp = json.loads(buf)
    except ValueError:
        return _error(version, 5, f"the VNet node worker on {path} answered something that is not JSON")
    if resp.get("error"):
        sys.stdout.write(json.dumps(resp["error"]) + "\n")
        return 1
    if resp.get("result") is not None:
        sys.stdout.write(json.dumps(resp["result"]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
