"""Node worker operations about drift (``vnet.node.<node>.drift.list``).

When something outside VNet changes what a node worker programmed (our nftables tables,
a veth, a bridge's state or address), the worker hears it from the kernel, repairs it and
keeps a record: what changed, when, how long until the repair, and which process made
the change when the kernel names it (docs/operations.md, "Drift").
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

# resync: what the periodic full resync wrote to a host that had converged to the same desired
# state (drift no notification told of); the others: repairs after a kernel notification.
DriftKind = Literal["nft_table", "nft_rules", "link_deleted", "link_down", "link_master", "address_removed",
                    "lost_notifications", "resync"]


class DriftRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The newest ``limit`` repairs (newest first)."""

    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 100


class DriftSender(msgspec.Struct, kw_only=True):
    """Who made a change, as far as the kernel tells.

    ``source``: ``nftables`` (the committing process named by the kernel in
    ``NFT_MSG_NEWGEN``), ``netlink port`` (the sender's port id mapped to the process
    holding that socket), or ``unknown`` (the kernel does not name the sender of link
    changes)."""

    source: Literal["nftables", "netlink port", "unknown"]
    pid: int = 0  # 0: unknown
    port: int = 0  # the sender's netlink port id (0: not given by the kernel)
    comm: str = ""  # process name (the kernel's, for nftables)
    cmdline: str = ""  # empty when the process had exited before it could be read


class DriftRecord(msgspec.Struct, kw_only=True):
    """One repair of drift."""

    at: float  # when the kernel reported the change (epoch seconds)
    kind: DriftKind
    target: str  # what changed: an interface name, "inet vnet" / "bridge vnet", ...
    owner: str = ""  # the network or endpoint id it belongs to ("" for our nftables tables)
    detail: str = ""  # what the kernel said (e.g. "delete table inet vnet")
    writes: int = 0  # kernel writes (netlink operations or nftables transactions) of the repair
    repaired_s: float = 0.0  # from the notification to the repair done
    repaired: bool = True  # False: the repair failed (error says why; the resync tries again)
    error: str = ""
    sender: DriftSender = msgspec.field(default_factory=lambda: DriftSender(source="unknown"))


class DriftReply(msgspec.Struct, kw_only=True):
    node: str
    watching: bool  # the worker follows kernel notifications (False: data plane off, or the watch failed)
    reason: str = ""  # why not watching
    total: int = 0  # repairs since the worker started (the ring keeps the last ``capacity``)
    capacity: int = 0
    records: list[DriftRecord] = []
