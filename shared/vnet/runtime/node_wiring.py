"""The node worker's adapters besides the reconciler's data plane: typed by Protocols, built here.

The node holds no Redis; what it runs on beyond the bus (:class:`vnet.runtime.wiring.ServiceAdapters`)
and the reconciler's kernel (:mod:`vnet.runtime.dataplane`) is its nftables policy agent, its DNS
server and the kernel probe. The worker asks ``rt.adapters.node()`` for them and calls the
interfaces below. Teardown (``vnet-node --teardown``, no runtime) uses the module functions.
This module is imported only by the node (it loads nftables, netlink and dnslib code).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from vnet.adapters.dns_server import AnswerFn, DnsServer, ObserveFn
from vnet.adapters.netlink.nsctx import ns_path
from vnet.adapters.netlink.probe import probe
from vnet.adapters.nftables import NftEnforcer, NftError, SyncResult
from vnet.adapters.policy_agent import PolicyAgent
from vnet.core.dataplane_model import ProbeResult, Support
from vnet.core.mvpolicy import MvLocal, MvPolicy
from vnet.core.policy import PolicyEndpoint, Ruleset

__all__ = ["DnsServerPort", "NftEnforcerPort", "NftError", "NodeAdapters", "PolicyAgentPort", "SyncResult",
           "nft_enforcer", "ns_path"]


class PolicyAgentPort(Protocol):
    """This node's ruleset in the kernel (:class:`vnet.adapters.policy_agent.PolicyAgent`)."""

    # the nftables enforcer: drift checks the ruleset under its lock, teardown reuses it
    enforcer: Any
    target: Ruleset | None
    version: str
    mv_target: MvPolicy | None
    last: SyncResult | None
    last_error: str
    syncs: int
    wrote: int
    locals_source: Callable[[], dict[str, MvLocal]] | None

    def start(self, *, enable: bool | None = None) -> Support: ...
    async def ensure_tables(self) -> bool: ...
    def note_added(self, ep: PolicyEndpoint, *, local: bool, bridge: str = "") -> bool: ...
    def note_removed(self, ep: PolicyEndpoint, *, local: bool) -> bool: ...
    def push(self) -> SyncResult | None: ...
    async def sync(self, *, check: bool = True) -> SyncResult: ...


class DnsServerPort(Protocol):
    """The node's resolver for its containers (:class:`vnet.adapters.dns_server.DnsServer`)."""

    def clear_cache(self) -> None: ...
    async def listen(self, addresses: Iterable[str]) -> list[str]: ...
    async def unlisten(self, addresses: Iterable[str]) -> None: ...
    def listening(self) -> list[str]: ...
    async def close(self) -> None: ...


class NftEnforcerPort(Protocol):
    """The host namespace's nftables tables of ours (:class:`vnet.adapters.nftables.NftEnforcer`)."""

    def read(self) -> str | None: ...
    def delete(self) -> None: ...


def nft_enforcer(host_netns: str | None, *, state_file: Path) -> NftEnforcerPort:
    """An enforcer over the saved state (teardown, when no worker runs one)."""
    return NftEnforcer(host_netns, state_file=state_file)


class NodeAdapters:
    """What one node worker runs on besides the bus and the reconciler's data plane."""

    def __init__(self, nc: Any) -> None:
        self._nc = nc

    def policy_agent(self, node: str, *, host_netns: str | None, timeout: float,
                     state_dir: str | None) -> PolicyAgentPort:
        return PolicyAgent(self._nc, node=node, host_netns=host_netns, timeout=timeout, state_dir=state_dir)

    def dns_server(self, answer: AnswerFn, *, upstreams: Iterable[str], host_netns: str | None, ttl: int,
                   observe: ObserveFn | None, port: int, trace_ratio: float) -> DnsServerPort:
        return DnsServer(answer, upstreams=upstreams, host_netns=host_netns, ttl=ttl, observe=observe, port=port,
                         trace_ratio=trace_ratio)

    def probe(self) -> ProbeResult:
        """Which kinds and drivers the kernel supports (blocking: a scratch namespace)."""
        return probe()
