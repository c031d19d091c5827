"""Which link kinds and drivers this kernel supports, found by really trying.

The probe creates each kind of link in a scratch network namespace and keeps the
kernel's answer. By default the scratch namespace is *anonymous*: made with
``unshare(CLONE_NEWNET)`` in the namespace worker thread and held only by a file
descriptor, so it has no name to leak and vanishes (with everything made in it)
when the probe closes that descriptor — even if the process dies half-way. Pass
``scratch=`` to probe inside an existing namespace instead (the probe then deletes
what it made there).

Nothing is guessed from module lists: a kind is available when the kernel created
one, and unavailable with the kernel's own refusal as the reason (on a kernel
without ipvlan: ``Operation not supported: Unknown device type``).
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable

from pyroute2.netlink import NLM_F_CREATE, NLM_F_EXCL
from pyroute2.netlink.rtnl import RTM_DELLINK, RTM_GETLINK, RTM_NEWLINK
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from vnet.adapters.netlink import drivers as kernel_drivers
from vnet.adapters.netlink.drivers.wire import link_msg
from vnet.adapters.netlink.nsctx import NETLINK_ROUTE, NetlinkError, Netns, NlSocket, NsWorker, check_socket_netns
from vnet.adapters.netlink.observe import parse_link
from vnet.core import drivers as core_drivers
from vnet.core.dataplane_model import ProbeResult, Support

_PREFIX = "vnp"  # names of probe links (inside the scratch namespace only)


def _new_socket() -> socket.socket:
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)


def _index(sock: NlSocket, name: str) -> int:
    m = ifinfmsg()
    m["attrs"] = [("IFLA_IFNAME", name)]
    for t, b in sock.get(RTM_GETLINK, m):
        if t == RTM_NEWLINK:
            return parse_link(b).index
    raise NetlinkError(errno.ENODEV, f"{name} not found")


def _refusal(kind: str, exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    detail = exc.kernel_message if isinstance(exc, NetlinkError) else ""
    text = os.strerror(exc.errno) if exc.errno else str(exc)
    reason = f"the kernel refused to create a link of kind {kind}: {name} ({text})"
    if detail:
        reason += f": {detail}"
    return reason


class _Prober:
    """What a kernel driver's ``probe`` uses (:class:`~vnet.adapters.netlink.drivers.Prober`)."""

    prefix = _PREFIX

    def __init__(self, sock: NlSocket) -> None:
        self.sock = sock
        self.kinds: dict[str, Support] = {}
        self.made: list[str] = []
        self._parent: int | None = None

    def attempt(self, kind: str, name: str, build: Callable[[], ifinfmsg]) -> bool:
        try:
            self.sock.request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, build())
        except OSError as exc:
            self.kinds[kind] = Support(available=False, reason=_refusal(kind, exc))
            return False
        self.made.append(name)
        self.kinds[kind] = Support(available=True, reason="created one in a scratch namespace")
        return True

    def skip(self, kind: str, reason: str) -> None:
        self.kinds[kind] = Support(available=False, reason=reason)

    def parent(self) -> int | None:
        veth = self.kinds.get("veth")
        if veth is None or not veth.available:
            return None
        if self._parent is None:
            self._parent = _index(self.sock, f"{_PREFIX}-va")
        return self._parent


def _try_kinds(sock: NlSocket) -> tuple[dict[str, Support], list[str]]:
    p = _Prober(sock)
    for kernel in kernel_drivers.all_kernel_drivers():
        kernel.probe(p)
    # WireGuard is no driver's link kind: encrypted overlays need it, in the kernel or as
    # wireguard-go in user space (which needs /dev/net/tun)
    p.attempt("wireguard", f"{_PREFIX}-wg", lambda: link_msg("wireguard", f"{_PREFIX}-wg"))
    if not p.kinds["wireguard"].available:
        tun = "present" if os.path.exists("/dev/net/tun") else "absent"
        p.kinds["wireguard"] = Support(available=False, reason=p.kinds["wireguard"].reason +
                                       f" (user-space wireguard-go needs /dev/net/tun: {tun})")
    return p.kinds, p.made


def _drivers(kinds: dict[str, Support]) -> dict[str, Support]:
    """Every registered driver: available when the kernel made every link kind it needs
    and this node has its kernel side."""
    out: dict[str, Support] = {}
    for driver in core_drivers.all_drivers():
        if not driver.kernel_kinds:
            out[driver.name] = Support(available=True, reason="needs nothing from the kernel")
            continue
        missing = [k for k in driver.kernel_kinds if not (k in kinds and kinds[k].available)]
        if missing:
            out[driver.name] = Support(available=False, reason="; ".join(
                kinds[k].reason if k in kinds else f"link kind {k} was not probed (no kernel driver brings it)"
                for k in missing))
        elif kernel_drivers.get(driver.name) is None:
            out[driver.name] = Support(available=False, reason="the kernel supports it; this node's data plane "
                                       "does not implement the driver yet")
        else:
            out[driver.name] = Support(available=True, reason="kernel support found by the probe")
    return out


def probe(worker: NsWorker | None = None, scratch: str | None = None) -> ProbeResult:
    """Try every kind in a scratch namespace (anonymous unless ``scratch`` names one)."""
    own = worker is None
    w = worker or NsWorker()
    ns: Netns | None = None
    raw: socket.socket | None = None
    try:
        if scratch is None:
            ns, made_sock = w.run_in_new(_new_socket)
        else:
            ns = Netns.open(scratch)
            made_sock = w.run(ns, _new_socket)
        raw = made_sock
        check_socket_netns(made_sock, ns)
        sock = NlSocket(made_sock, ns.path)
        kinds, made = _try_kinds(sock)
        if scratch is not None:  # a named namespace outlives us: remove what we made
            for name in reversed(made):
                m = ifinfmsg()
                m["attrs"] = [("IFLA_IFNAME", name)]
                try:
                    sock.request(RTM_DELLINK, 0, m)
                except NetlinkError as exc:
                    if exc.errno != errno.ENODEV:  # a veth peer or a child went with its parent
                        raise
        return ProbeResult(kinds=kinds, drivers=_drivers(kinds))
    finally:
        if raw is not None:
            raw.close()
        if ns is not None:
            ns.close()
        if own:
            w.close()
