"""The node's WireGuard mesh for encrypted overlays: key pair, interface, peers.

An encrypted overlay network runs its VXLAN underlay over a WireGuard interface:
the VXLAN device is bound to it and uses the mesh addresses as VTEPs, so every
inner frame leaves the host inside a WireGuard UDP datagram. This module owns the
part that is not netlink:

* **the key pair** — generated on the node (``wg genkey``) into
  ``<state_dir>/wg-<ifname>.key``, mode 0600, created with ``O_EXCL``; only the public
  key (:meth:`WireGuard.public_key`) is ever handed out — the node worker publishes it
  to the control plane, which distributes it to the other hosts as
  ``PeerHost.wg_public_key``;
* **the interface** — made by the kernel module where the kernel has one, else by
  ``wireguard-go`` (user space, ``/dev/net/tun``) started *inside the host namespace*
  (``nsenter --net=<ns>``), in the foreground of a process of its own session: a node
  worker that dies leaves the tunnel up (fail static) and a restarted one finds it;
* **the peers** — ``wg show <if> dump`` is compared with the desired peers (public key,
  underlay endpoint, the peer's mesh address as its only allowed IP) and one ``wg set``
  closes the difference; nothing is written when they agree (zero-write resync).

The mesh address and link state of the interface are ordinary netlink work done by the
plan (owner ``wg``). Fail closed: when the interface is missing the plan does not
build the encrypted networks' VXLAN devices, and the kernel deletes a VXLAN device
whose lower device (the tunnel) goes away, so nothing of those networks is sent in
clear. Note that wireguard-go's control socket is ``/var/run/wireguard/<ifname>.sock``,
a file-system path shared by every namespace: two hosts simulated on one machine need
different interface names. The node worker's default is one per node
(:func:`vnet.core.naming.wg_name`), and a name whose socket belongs to a wireguard-go in
another namespace is refused with an error that says so, never shared silently.

**Lifecycle.** In a named host namespace wireguard-go runs under a small guard
(:mod:`vnet.adapters.wgguard`) that stops it when the namespace is deleted (wireguard-go
inside it would otherwise keep the deleted namespace alive, tunnel, port and socket
included). It outlives the node worker (fail static): a restarted worker finds the
interface and adopts the running process. :meth:`WireGuard.teardown` stops it whoever
started it (found in ``/proc`` by its namespace and interface name) and removes the
interface and the control socket (``vnetctl node teardown``, ``vnet-node --teardown``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from vnet.core.dataplane_model import PeerHost, Support, Underlay

KEEPALIVE_S = 25
SOCKET_DIR = "/var/run/wireguard"  # wireguard-go's UAPI sockets (fixed in wireguard-go)
GUARD = Path(__file__).with_name("wgguard.py")
INSTALL_HINT = ("install wireguard-go and wireguard-tools (apt-get install wireguard-go wireguard-tools) or load "
                "the wireguard kernel module")


def socket_path(ifname: str) -> str:
    return f"{SOCKET_DIR}/{ifname}.sock"


def _socket_live(path: str) -> bool:
    """A process listens on this UAPI socket (a left-over file of a killed one does not)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def _ns_inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def find_processes(ifname: str, ns_path: str) -> list[int]:
    """The wireguard-go of ``ifname`` and its guard: processes whose command line is
    ``wireguard-go <ifname>`` (or the guard of it) in the namespace at ``ns_path`` (its
    inode), or, when that namespace's mount is gone, the guards naming it."""
    ino = _ns_inode(ns_path)
    out: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        argv = _cmdline(pid)
        if not argv or argv[-1] != ifname:
            continue
        is_wg = os.path.basename(argv[-2] if len(argv) >= 2 else "") == "wireguard-go"
        is_guard = any(a.endswith("wgguard.py") for a in argv)
        if not (is_wg or is_guard):
            continue
        if ino is not None:
            if _ns_inode(f"/proc/{pid}/ns/net") != ino:
                continue
        elif not (is_guard and ns_path in argv):
            continue
        out.append(pid)
    return sorted(out)


def _wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    left = list(pids)
    while left and time.monotonic() < deadline:
        for pid in list(left):
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)  # our own child: reap it
            if not os.path.exists(f"/proc/{pid}") or _zombie(pid):
                left.remove(pid)
        if left:
            time.sleep(0.02)
    return left


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


class WireGuardError(RuntimeError):
    """The mesh could not be set up (tool missing, wireguard-go failed, ``wg`` refused)."""


class WgPeer:
    __slots__ = ("allowed", "endpoint")

    def __init__(self, endpoint: str, allowed: tuple[str, ...]) -> None:
        self.endpoint = endpoint
        self.allowed = allowed

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WgPeer) and (self.endpoint, self.allowed) == (other.endpoint, other.allowed)

    def __hash__(self) -> int:
        return hash((self.endpoint, self.allowed))

    def __repr__(self) -> str:
        return f"WgPeer({self.endpoint!r}, {self.allowed!r})"


def parse_dump(text: str) -> tuple[str, int, dict[str, WgPeer]]:
    """``(public key, listen port, {peer public key: WgPeer})`` from ``wg show <if> dump``."""
    lines = [ln.split("\t") for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return "", 0, {}
    head = lines[0]
    pub = head[1] if len(head) > 1 and head[1] != "(none)" else ""
    port = int(head[2]) if len(head) > 2 and head[2].isdigit() else 0
    peers: dict[str, WgPeer] = {}
    for f in lines[1:]:
        if len(f) < 4:
            continue
        allowed = tuple(sorted(a for a in f[3].split(",") if a and a != "(none)"))
        peers[f[0]] = WgPeer("" if f[2] == "(none)" else f[2], allowed)
    return pub, port, peers


def desired_peers(peers: list[PeerHost]) -> dict[str, WgPeer]:
    """The WireGuard peers for the hosts that have a public key and a mesh address."""
    out: dict[str, WgPeer] = {}
    for p in peers:
        if p.wg_public_key and p.wg_address:
            addr = p.wg_address.split("/", 1)[0]
            host = f"[{p.address}]" if ":" in p.address else p.address
            out[p.wg_public_key] = WgPeer(f"{host}:{p.wg_port}", (f"{addr}/{128 if ':' in addr else 32}",))
    return out


def wg_set_args(ifname: str, key_path: str, want_port: int, want: dict[str, WgPeer], have_pub: str, our_pub: str,
                have_port: int, have: dict[str, WgPeer]) -> list[str]:
    """The ``wg set`` arguments that turn ``have`` into ``want`` ([] when nothing differs)."""
    args: list[str] = []
    if have_pub != our_pub:
        args += ["private-key", key_path]
    if have_port != want_port:
        args += ["listen-port", str(want_port)]
    for key in sorted(set(have) - set(want)):
        args += ["peer", key, "remove"]
    for key, peer in sorted(want.items()):
        if have.get(key) != peer:
            args += ["peer", key, "endpoint", peer.endpoint, "allowed-ips", ",".join(peer.allowed),
                     "persistent-keepalive", str(KEEPALIVE_S)]
    return ["set", ifname, *args] if args else []


class WireGuard:
    """Key pair, interface and peers of one host namespace's WireGuard mesh."""

    def __init__(self, host_netns: str | None, state_dir: str | os.PathLike[str],
                 link_exists: Callable[[str], bool]) -> None:
        self.host_netns = host_netns
        self.state_dir = Path(state_dir)
        self.link_exists = link_exists
        self.writes = 0
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._pub: dict[str, tuple[tuple[int, int], str]] = {}

    # -- commands in the host namespace ------------------------------------------------
    def _cmd(self, *args: str) -> list[str]:
        if self.host_netns is None:
            return list(args)
        path = self.host_netns if self.host_netns.startswith("/") else f"/run/netns/{self.host_netns}"
        return ["nsenter", f"--net={path}", "--", *args]

    def _run(self, *args: str, stdin: str | None = None) -> str:
        r = subprocess.run(self._cmd(*args), input=stdin, capture_output=True, text=True, timeout=10)
        if r.returncode != 0:
            raise WireGuardError(f"{' '.join(args[:3])}: {(r.stderr or r.stdout).strip() or f'exit {r.returncode}'}")
        return r.stdout

    # -- keys --------------------------------------------------------------------------
    def key_path(self, ifname: str) -> Path:
        return self.state_dir / f"wg-{ifname}.key"

    def ensure_key(self, ifname: str) -> Path:
        """The node's private key file (generated once, 0600, never sent anywhere)."""
        path = self.key_path(ifname)
        if path.exists():
            return path
        if shutil.which("wg") is None:
            raise WireGuardError("the wg tool (wireguard-tools) is not installed on this node")
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True, timeout=10).stdout.strip()
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, (key + "\n").encode())
        finally:
            os.close(fd)
        os.replace(tmp, path)
        return path

    def public_key(self, ifname: str = "vnwg0") -> str:
        """The public key to publish (the private key stays in its file)."""
        path = self.ensure_key(ifname)
        st = path.stat()
        cached = self._pub.get(ifname)
        if cached is not None and cached[0] == (st.st_ino, st.st_mtime_ns):
            return cached[1]
        with open(path) as f:
            r = subprocess.run(["wg", "pubkey"], stdin=f, capture_output=True, text=True, check=True, timeout=10)
        pub = r.stdout.strip()
        self._pub[ifname] = ((st.st_ino, st.st_mtime_ns), pub)
        return pub

    # -- interface -----------------------------------------------------------------------
    def ensure_interface(self, ifname: str, timeout_s: float = 5.0) -> None:
        """Make the WireGuard interface if it does not exist (wireguard-go in the host namespace)."""
        if self.link_exists(ifname):
            return
        try:  # the kernel module, where there is one
            self._run("ip", "link", "add", ifname, "type", "wireguard")
            self.writes += 1
            return
        except WireGuardError:
            pass
        exe = shutil.which("wireguard-go")
        if exe is None:
            raise WireGuardError(f"this kernel has no WireGuard module and wireguard-go is not installed: "
                                 f"{INSTALL_HINT}")
        sock = socket_path(ifname)
        if os.path.exists(sock):
            if _socket_live(sock):  # the interface is not here, so that wireguard-go is another namespace's
                raise WireGuardError(f"the WireGuard interface name {ifname} is taken by a wireguard-go in another "
                                     f"namespace on this machine (its control socket {sock} is shared by all of "
                                     "them): give this node another name (vnet-node --wg-ifname)")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(sock)  # left behind by a killed wireguard-go of ours
        old = self._procs.pop(ifname, None)
        if old is not None and old.poll() is None:
            old.kill()
            old.wait(5)
        env = dict(os.environ, WG_PROCESS_FOREGROUND="1", LOG_LEVEL="error")
        if self.host_netns is None:
            argv = [exe, ifname]
        else:  # under its guard: it goes when the namespace goes (see the module docstring)
            argv = [sys.executable, "-I", str(GUARD), self._ns_path(), sock, "--", exe, ifname]
        proc = subprocess.Popen(self._cmd(*argv), env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self._procs[ifname] = proc
        self.writes += 1
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.link_exists(ifname) and os.path.exists(sock):
                return
            if proc.poll() is not None:
                raise WireGuardError(f"wireguard-go {ifname} exited with status {proc.returncode}")
            time.sleep(0.02)
        raise WireGuardError(f"wireguard-go did not create {ifname} within {timeout_s} s")

    def _ns_path(self) -> str:
        assert self.host_netns is not None
        return self.host_netns if self.host_netns.startswith("/") else f"/run/netns/{self.host_netns}"

    def processes(self, ifname: str) -> list[int]:
        """The pids of ``ifname``'s wireguard-go (and guard) in this host namespace, whoever
        started them (this object, an earlier worker)."""
        return find_processes(ifname, self._ns_path() if self.host_netns is not None else "/proc/self/ns/net")

    # -- capability ---------------------------------------------------------------------
    def capability(self, ifname: str, kernel_module: bool) -> Support:
        """Whether this node can run encrypted overlays, and what to do when it cannot: a
        key directory it can write, the ``wg`` tool, and the kernel module or wireguard-go
        with ``/dev/net/tun``. Makes the key pair (the first use does anyway)."""
        if shutil.which("wg") is None:
            return Support(available=False, reason=f"the wg tool is not installed: {INSTALL_HINT}")
        if not kernel_module:
            if shutil.which("wireguard-go") is None:
                return Support(available=False, reason=f"no WireGuard kernel module and no wireguard-go: "
                                                       f"{INSTALL_HINT}")
            if not os.path.exists("/dev/net/tun"):
                return Support(available=False, reason="wireguard-go needs /dev/net/tun, which this host lacks")
        try:
            self.ensure_key(ifname)
        except (OSError, WireGuardError, subprocess.SubprocessError) as exc:
            return Support(available=False, reason=f"cannot keep the WireGuard key in {self.state_dir}: {exc}; "
                                                   "give the node a writable node_state_dir")
        return Support(available=True, reason="kernel module" if kernel_module else "wireguard-go")

    # -- all -----------------------------------------------------------------------------
    def ensure(self, underlay: Underlay, peers: list[PeerHost]) -> int:
        """Key, interface, listen port and peers as desired; returns the writes made."""
        before = self.writes
        ifname = underlay.wg_ifname
        key = self.ensure_key(ifname)
        our_pub = self.public_key(ifname)
        self.ensure_interface(ifname)
        have_pub, have_port, have = parse_dump(self._run("wg", "show", ifname, "dump"))
        args = wg_set_args(ifname, str(key), underlay.wg_port, desired_peers(peers), have_pub, our_pub, have_port,
                           have)
        if args:
            self._run("wg", *args)
            self.writes += 1
        return self.writes - before

    def stop(self, ifname: str | None = None) -> None:
        """Stop the wireguard-go processes this object started (tests; a node keeps its tunnel)."""
        for name in [ifname] if ifname is not None else list(self._procs):
            proc = self._procs.pop(name, None)
            if proc is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def teardown(self, ifname: str) -> tuple[list[str], list[str]]:
        """Stop ``ifname``'s wireguard-go whoever started it (its guard first, which stops it
        and removes the socket), delete the interface (the kernel module's, or one left), and
        remove a control socket left behind. Goes on past errors: ``(removed, errors)``."""
        removed: list[str] = []
        errors: list[str] = []
        own = self._procs.get(ifname)
        stopped = own is not None and own.poll() is None
        self.stop(ifname)
        try:
            pids = self.processes(ifname)
        except OSError as exc:
            pids = []
            errors.append(f"cannot look for wireguard-go {ifname} in /proc: {exc}")
        stopped = stopped or bool(pids)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            pids = _wait_gone(pids, 5.0)
            if not pids:
                break
        if pids:
            errors.append(f"wireguard-go {ifname}: process(es) {pids} did not stop")
        elif stopped:
            removed.append(f"wireguard-go {ifname}")
        try:
            if self.link_exists(ifname):
                self._run("ip", "link", "del", ifname)
                removed.append(f"interface {ifname}")
        except (WireGuardError, OSError) as exc:
            errors.append(f"cannot delete the WireGuard interface {ifname}: {exc}")
        sock = socket_path(ifname)
        if os.path.exists(sock):
            if _socket_live(sock):
                errors.append(f"{sock} is still served by a process (another namespace's wireguard-go?); left alone")
            else:
                try:
                    os.unlink(sock)
                    removed.append(f"socket {sock}")
                except OSError as exc:
                    errors.append(f"cannot remove {sock}: {exc}")
        return removed, errors

    def pids(self) -> dict[str, int]:
        return {k: p.pid for k, p in self._procs.items() if p.poll() is None}
