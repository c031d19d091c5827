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
import functools
import os
import socket
from collections.abc import Callable

from pyroute2.netlink import NLM_F_CREATE, NLM_F_EXCL
from pyroute2.netlink.rtnl import RTM_DELLINK, RTM_GETLINK, RTM_NEWLINK
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from vnet.adapters.netlink.nsctx import NETLINK_ROUTE, NetlinkError, Netns, NlSocket, NsWorker, check_socket_netns
from vnet.adapters.netlink.observe import parse_link
from vnet.core.dataplane_model import ProbeResult, Support

KINDS = ("bridge", "veth", "vxlan", "macvlan", "ipvlan", "wireguard")
IMPLEMENTED_DRIVERS = frozenset({"bridge", "host", "overlay", "macvlan", "ipvlan"})
MACVLAN_MODE_BRIDGE = 4
IPVLAN_MODE_L2 = 0
_PREFIX = "vnp"  # names of probe links (inside the scratch namespace only)


def _new_socket() -> socket.socket:
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)


def _link(kind: str, name: str, *, link: int | None = None, data: list[tuple[str, object]] | None = None,
          peer: str | None = None) -> ifinfmsg:
    m = ifinfmsg()
    info: list[tuple[str, object]] = [("IFLA_INFO_KIND", kind)]
    if peer is not None:
        info.append(("IFLA_INFO_DATA", {"attrs": [("VETH_INFO_PEER", {"attrs": [("IFLA_IFNAME", peer)]})]}))
    elif data:
        info.append(("IFLA_INFO_DATA", {"attrs": data}))
    attrs: list[tuple[str, object]] = [("IFLA_IFNAME", name), ("IFLA_LINKINFO", {"attrs": info})]
    if link is not None:
        attrs.append(("IFLA_LINK", link))
    m["attrs"] = attrs
    return m


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


def _try_kinds(sock: NlSocket) -> tuple[dict[str, Support], list[str]]:
    kinds: dict[str, Support] = {}
    made: list[str] = []

    def attempt(kind: str, name: str, build: Callable[[], ifinfmsg]) -> None:
        try:
            sock.request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, build())
        except OSError as exc:
            kinds[kind] = Support(available=False, reason=_refusal(kind, exc))
            return
        made.append(name)
        kinds[kind] = Support(available=True, reason="created one in a scratch namespace")

    attempt("bridge", f"{_PREFIX}-br", lambda: _link("bridge", f"{_PREFIX}-br"))
    attempt("veth", f"{_PREFIX}-va", lambda: _link("veth", f"{_PREFIX}-va", peer=f"{_PREFIX}-vb"))
    attempt("vxlan", f"{_PREFIX}-vx", lambda: _link("vxlan", f"{_PREFIX}-vx",
                                                    data=[("IFLA_VXLAN_ID", 4242), ("IFLA_VXLAN_PORT", 4789)]))
    parent: int | None = None
    if kinds["veth"].available:
        parent = _index(sock, f"{_PREFIX}-va")
    for kind, mode_attr, mode in (("macvlan", "IFLA_MACVLAN_MODE", MACVLAN_MODE_BRIDGE),
                                  ("ipvlan", "IFLA_IPVLAN_MODE", IPVLAN_MODE_L2)):
        if parent is None:
            kinds[kind] = Support(available=False, reason="no veth to use as parent: cannot test")
            continue
        name = f"{_PREFIX}-{kind[:3]}"
        attempt(kind, name, functools.partial(_link, kind, name, link=parent, data=[(mode_attr, mode)]))
    attempt("wireguard", f"{_PREFIX}-wg", lambda: _link("wireguard", f"{_PREFIX}-wg"))
    if not kinds["wireguard"].available:
        tun = "present" if os.path.exists("/dev/net/tun") else "absent"
        kinds["wireguard"] = Support(available=False, reason=kinds["wireguard"].reason +
                                     f" (user-space wireguard-go needs /dev/net/tun: {tun})")
    return kinds, made


def _drivers(kinds: dict[str, Support]) -> dict[str, Support]:
    need = {"bridge": ("bridge", "veth"), "overlay": ("bridge", "veth", "vxlan"), "macvlan": ("macvlan",),
            "ipvlan": ("ipvlan",)}
    out: dict[str, Support] = {}
    for driver, ks in need.items():
        missing = [k for k in ks if not kinds[k].available]
        if missing:
            out[driver] = Support(available=False, reason="; ".join(kinds[k].reason for k in missing))
        elif driver not in IMPLEMENTED_DRIVERS:
            out[driver] = Support(available=False, reason="the kernel supports it; this node's data plane does not "
                                  "implement the driver yet")
        else:
            out[driver] = Support(available=True, reason="kernel support found by the probe")
    out["host"] = Support(available=True, reason="needs nothing from the kernel")
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
