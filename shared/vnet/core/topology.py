"""Topology, pure: how networks relate, and the views built on it.

Relations (DESIGN section 4, "Topology") are symmetric and NOT transitive:

* **connected** — an explicit connection between two networks;
* **parent / child** — a child's subnet is carved from its parent's; only the direct
  edge counts (siblings and grandparent/grandchild are not related);
* **mesh** — two networks that share a mesh group.

A network's relations are part of its record (:class:`vnet.core.model.VirtualNetwork`
fields ``parent``, ``children``, ``connected``, ``mesh_groups``). The functions here
read those records; they never do I/O.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from vnet.core import errors as E
from vnet.core.model import IsolationMode, VirtualNetwork


class Relation(enum.StrEnum):
    SAME = "same"
    CONNECTED = "connected"
    PARENT = "parent"  # the other network is this one's parent
    CHILD = "child"  # the other network is this one's child
    MESH = "mesh"


def parse_isolation(name: str) -> IsolationMode:
    """``"PeerOnly"``, ``"peer-only"``, ``"peer_only"`` -> :attr:`IsolationMode.PEER_ONLY`;
    raises ``unknown_isolation`` naming the modes."""
    s = re.sub(r"[\s-]", "_", name.strip())
    s = re.sub(r"(?<=[a-z])(?=[A-Z])", "_", s).lower()
    for m in IsolationMode:
        if m.value == s:
            return m
    allowed = ", ".join(m.value for m in IsolationMode)
    raise E.make(E.UNKNOWN_ISOLATION, f"unknown isolation mode {name!r}; choose one of: {allowed}",
                 isolation=name, allowed=[m.value for m in IsolationMode])


def check_connect(a: VirtualNetwork, b: VirtualNetwork) -> None:
    """Refuse connecting a network to itself (``self_connection``)."""
    if a.id == b.id:
        raise E.make(E.SELF_CONNECTION, f"network {a.name!r} ({a.id}) cannot be connected to itself; "
                     "name two different networks", network=a.id)


def relations(a: VirtualNetwork, b: VirtualNetwork) -> list[tuple[Relation, str | None]]:
    """Every direct relation between ``a`` and ``b`` (from ``a``'s record), with the mesh
    group's name for :attr:`Relation.MESH`. Empty: no path between them."""
    if a.id == b.id:
        return [(Relation.SAME, None)]
    out: list[tuple[Relation, str | None]] = []
    if b.id in a.connected:
        out.append((Relation.CONNECTED, None))
    if a.parent == b.id:
        out.append((Relation.PARENT, None))
    if b.id in a.children:
        out.append((Relation.CHILD, None))
    for mesh in sorted(set(a.mesh_groups) & set(b.mesh_groups)):
        out.append((Relation.MESH, mesh))
    return out


def related(a: VirtualNetwork, b: VirtualNetwork) -> bool:
    """True iff a path exists between the two networks (not transitive)."""
    return bool(relations(a, b))


def child_prefix_len(parent_prefix: int, default_prefix: int, max_prefix: int) -> int:
    """The size of a child carved without an explicit ``prefix_len``: the configured
    default when it is smaller than the parent, else a quarter of the parent."""
    if default_prefix > parent_prefix:
        return default_prefix
    return min(parent_prefix + 2, max_prefix)


@dataclass
class TreeNode:
    network: VirtualNetwork
    children: list[TreeNode] = field(default_factory=list)


def build_tree(networks: Iterable[VirtualNetwork]) -> list[TreeNode]:
    """Networks nested under their parents; roots and siblings sorted by name. A network
    whose parent is not in ``networks`` is a root."""
    nodes = {n.id: TreeNode(n) for n in networks}
    roots: list[TreeNode] = []
    for node in nodes.values():
        parent = node.network.parent
        if parent is not None and parent in nodes and parent != node.network.id:
            nodes[parent].children.append(node)
        else:
            roots.append(node)

    def sort(level: list[TreeNode]) -> None:
        level.sort(key=lambda t: (t.network.name, t.network.id))
        for t in level:
            sort(t.children)

    sort(roots)
    return roots


def connections(networks: Iterable[VirtualNetwork]) -> list[tuple[str, str]]:
    """Each explicit connection once, as a sorted pair of ids, sorted."""
    seen: set[tuple[str, str]] = set()
    for n in networks:
        for peer in n.connected:
            a, b = sorted((n.id, peer))
            seen.add((a, b))
    return sorted(seen)


def mesh_members(networks: Iterable[VirtualNetwork]) -> dict[str, list[str]]:
    """Mesh group name -> sorted member ids, from the networks' records."""
    out: dict[str, set[str]] = {}
    for n in networks:
        for m in n.mesh_groups:
            out.setdefault(m, set()).add(n.id)
    return {m: sorted(ids) for m, ids in sorted(out.items())}


def inconsistencies(networks: Sequence[VirtualNetwork],
                    meshes: Mapping[str, Iterable[str]] | None = None) -> list[str]:
    """Problems in a set of records: one-sided connections or parent/child edges, links to
    missing networks, mesh membership that the group and the network disagree on.
    Empty for a consistent registry (tests and ``vnetctl network topology --check``)."""
    by_id = {n.id: n for n in networks}
    out: list[str] = []
    for n in networks:
        for peer in n.connected:
            other = by_id.get(peer)
            if other is None:
                out.append(f"{n.id} is connected to missing network {peer}")
            elif n.id not in other.connected:
                out.append(f"{n.id} lists {peer} as connected but not the reverse")
            if peer == n.id:
                out.append(f"{n.id} is connected to itself")
        if n.parent is not None:
            p = by_id.get(n.parent)
            if p is None:
                out.append(f"{n.id} has missing parent {n.parent}")
            elif n.id not in p.children:
                out.append(f"{n.id} names parent {n.parent}, which does not list it as a child")
        for c in n.children:
            child = by_id.get(c)
            if child is None:
                out.append(f"{n.id} has missing child {c}")
            elif child.parent != n.id:
                out.append(f"{n.id} lists child {c}, whose parent is {child.parent}")
    if meshes is not None:
        members = {m: set(ids) for m, ids in meshes.items()}
        for n in networks:
            for m in n.mesh_groups:
                if n.id not in members.get(m, set()):
                    out.append(f"{n.id} lists mesh {m!r}, which does not list it")
        for m, ids in members.items():
            for i in ids:
                if i in by_id and m not in by_id[i].mesh_groups:
                    out.append(f"mesh {m!r} lists {i}, which does not list the mesh")
                elif i not in by_id:
                    out.append(f"mesh {m!r} lists missing network {i}")
    return out
