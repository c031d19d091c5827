"""The kernel data plane a node's reconciler is handed: interfaces and the factory.

:class:`vnet.svc.node.reconcile.Reconciler` decides (observe, plan, apply, report) and
calls the objects of a :class:`Dataplane`; it imports no netlink or WireGuard code
itself. :func:`kernel` builds the real one (netlink in namespaces, wireguard-go); a test
or a simulated node may hand the reconciler another. The errors the kernel side raises
that the reconciler tells apart are re-exported here with the interfaces.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Container, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from opentelemetry import trace

from vnet.adapters.netlink.apply import Applier, ApplyOutcome, Once
from vnet.adapters.netlink.nsctx import NamespaceGone, NsContext
from vnet.adapters.netlink.observe import Observer, RawLink
from vnet.adapters.wireguard import WireGuard, WireGuardError
from vnet.core.dataplane_model import EpDesired, NodeActual, NsState, PeerHost, Support, Underlay
from vnet.core.plan import Plan

__all__ = ["ApplierPort", "Dataplane", "NamespaceGone", "NamespacesPort", "ObserverPort", "Once", "WireGuardError",
           "WireGuardPort", "kernel"]


class NamespacesPort(Protocol):
    """The open network namespaces (:class:`vnet.adapters.netlink.nsctx.NsContext`)."""

    def close(self) -> None: ...
    def prune(self) -> int: ...
    def retain(self, refs: set[str | None]) -> int: ...
    def one_pass(self) -> AbstractContextManager[None]: ...


class ObserverPort(Protocol):
    """Reads the kernel (:class:`vnet.adapters.netlink.observe.Observer`)."""

    def forget_host_sysctls(self) -> None: ...
    def link(self, ref: str | None, name: str) -> RawLink | None: ...
    def node(self, container_refs: Iterable[str], host_names: Iterable[str] | None = None,
             tables: Container[str] | None = None) -> NodeActual: ...
    def host_full(self) -> NsState: ...


class ApplierPort(Protocol):
    """Writes a plan to the kernel (:class:`vnet.adapters.netlink.apply.Applier`)."""

    writes: int  # kernel writes so far (the reconciler adds the WireGuard mesh's)
    tracer: trace.Tracer  # the reconciler sets the current provider's before each pass

    def apply(self, plan: Plan, actual: NodeActual | None = None,
              gate: Callable[[], None] | None = None) -> ApplyOutcome: ...
    def announce(self, endpoints: list[EpDesired]) -> list[str]: ...


class WireGuardPort(Protocol):
    """The WireGuard mesh of encrypted overlays (:class:`vnet.adapters.wireguard.WireGuard`)."""

    def capability(self, ifname: str, kernel_module: bool) -> Support: ...
    def ensure(self, underlay: Underlay, peers: list[PeerHost]) -> int: ...
    def key_path(self, ifname: str) -> Path: ...
    def pids(self) -> dict[str, int]: ...
    def public_key(self, ifname: str = "vnwg0") -> str: ...
    def stop(self, ifname: str | None = None) -> None: ...
    def teardown(self, ifname: str) -> tuple[list[str], list[str]]: ...


# (host namespace, state directory, "does this link exist in the host namespace?") -> the mesh
WireGuardFactory = Callable[[str | None, str | os.PathLike[str], Callable[[str], bool]], WireGuardPort]


@dataclass
class Dataplane:
    """What one reconciler works on: its namespaces, the reader, the writer, the mesh maker."""

    namespaces: NamespacesPort
    observer: ObserverPort
    applier: ApplierPort
    wireguard: WireGuardFactory


def kernel(host_netns: str | None, *, max_namespaces: int, tracer: trace.Tracer | None, node: str) -> Dataplane:
    """The real data plane: netlink in ``host_netns`` (None: this process's namespace)."""
    ctx = NsContext(max_entries=max_namespaces)
    return Dataplane(namespaces=ctx, observer=Observer(ctx, host_netns),
                     applier=Applier(ctx, host_netns, tracer, node=node), wireguard=WireGuard)
