"""Small message builders the kernel drivers share (probe links)."""

from __future__ import annotations

from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg


def link_msg(kind: str, name: str, *, link: int | None = None, data: list[tuple[str, object]] | None = None,
             peer: str | None = None) -> ifinfmsg:
    """An RTM_NEWLINK message for a probe link of ``kind`` (pyroute2's encoder)."""
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
