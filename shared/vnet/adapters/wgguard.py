"""The guard of one wireguard-go: it dies with its host namespace.

Run by :mod:`vnet.adapters.wireguard` *by path* (``python -I wgguard.py``: standard
library only, no package import, so it starts in tens of milliseconds) inside the host
namespace (``nsenter --net=<ns>``) in a session of its own::

    wgguard.py <namespace path> <socket path> -- wireguard-go <ifname>

It starts wireguard-go in the foreground as its child and watches the namespace's bind
mount (``/run/netns/<name>``): when the mount is gone or names another namespace
(``ip netns delete``, a test's teardown), it stops wireguard-go and exits. Without it
wireguard-go, a process inside the namespace, would keep the deleted namespace alive
for ever, with its tunnel, its UDP port and its control socket in
``/var/run/wireguard`` (a file-system path shared by every namespace).

It outlives the node worker on purpose (fail static: a restarted worker adopts the
running tunnel). SIGTERM (``vnetctl node teardown``, ``vnet-node --teardown``) stops
wireguard-go the same way. Either way the control socket is removed when wireguard-go
left it behind (it does when killed) and it is still the one it made.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

POLL_S = 0.5  # how often the namespace's mount is checked
STOP_WAIT_S = 5.0


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _stop(child: subprocess.Popen[bytes]) -> int:
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(STOP_WAIT_S)
    return child.returncode


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print("usage: wgguard.py NSPATH SOCKET -- CMD...", file=sys.stderr)
        return 2
    ns_path, sock, cmd = argv[0], argv[1], argv[3:]
    # The node worker blocks the stop signals in every thread and children inherit the mask.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    stop: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        stop.append(signum)

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, on_signal)
    ours = _inode("/proc/self/ns/net")
    if ours is None or _inode(ns_path) != ours:
        print(f"wgguard: not inside {ns_path}", file=sys.stderr)
        return 2
    env = dict(os.environ, WG_PROCESS_FOREGROUND="1")
    child = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
    sock_ino: int | None = None
    why = ""
    while not stop:
        if child.poll() is not None:
            why = f"wireguard-go exited with status {child.returncode}"
            break
        if sock_ino is None:
            sock_ino = _inode(sock)
        if _inode(ns_path) != ours:
            why = f"its namespace {ns_path} is gone"
            break
        time.sleep(POLL_S)
    if stop:
        why = f"signal {stop[0]}"
    code = _stop(child)
    if sock_ino is not None and _inode(sock) == sock_ino:  # left behind (killed); never another one's
        try:
            os.unlink(sock)
        except OSError:
            pass
    print(f"wgguard: stopped wireguard-go ({why})", file=sys.stderr)
    return 0 if stop or why.startswith("its namespace") else (code or 1)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
