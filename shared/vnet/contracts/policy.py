"""Policy wire types (``vnet.policy.*``) and the translation of stored records to the engine's inputs.

Rules travel as :class:`vnet.core.policy.AllowRule` (``{"id", "from": [selector],
"to": [selector], "ports": [{"protocol", "port", "end_port"}]}``). Isolation modes
are changed through the network service (``vnet.network.update`` with
``isolation``); the policy service reads networks and endpoints from their services.
"""

from __future__ import annotations

import base64
from typing import Annotated

import msgspec

from vnet.contracts.endpoint import EndpointInfo
from vnet.contracts.messages import RequestId
from vnet.contracts.network import NodeId
from vnet.core.model import VirtualNetwork
from vnet.core.mvpolicy import MvPolicy
from vnet.core.policy import (
    AllowRule,
    Party,
    PolicyEndpoint,
    PolicyNetwork,
    PortSpec,
    Protocol,
    Published,
    RuleId,
    Ruleset,
    Selector,
    Verdict,
)
from vnet.core.reach import Exposure, PathGroup, ReachDiff

__all__ = [
    "AllowRule", "ExplainRequest", "Exposure", "ExposureReply", "ExposureRequest", "Party", "PathGroup", "PortSpec",
    "ReachDiff", "RuleDelete", "RuleDeleted", "RuleGet", "RuleList", "RulePut", "RuleReply", "RulesetReply",
    "RulesetRequest", "Selector", "Verdict", "policy_endpoint", "policy_network",
]

Ref = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]


class RulePut(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Create or replace (an update replaces the whole rule) the allow rule ``rule.id``.

    ``dry_run``: change nothing; answer what the rule would open and close (``reach``)."""

    rule: AllowRule
    request_id: RequestId | None = None
    dry_run: bool = False


class RuleReply(AllowRule, frozen=True, kw_only=True):
    """The rule as stored (or, on a dry run, as it would be), and the paths the change opens
    and closes (``reach``; ``null`` when the fabric could not be read to compute it). The
    ``vnet.evt.policy.rules.<id>`` event of a put carries the same."""

    dry_run: bool = False
    reach: ReachDiff | None = None

    def as_rule(self) -> AllowRule:
        """The rule alone (an :class:`AllowRule` compares equal only to an ``AllowRule``)."""
        return AllowRule(**{f: getattr(self, f) for f in AllowRule.__struct_fields__})


class RuleGet(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    id: RuleId


class RuleDelete(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    id: RuleId
    request_id: RequestId | None = None
    dry_run: bool = False  # change nothing; answer what deleting would close (``reach``)


class RuleDeleted(msgspec.Struct, kw_only=True):
    id: str
    deleted: bool  # on a dry run: whether it would be
    dry_run: bool = False
    reach: ReachDiff | None = None  # the paths the deletion closes (the event carries the same)


ExposureLimit = Annotated[int, msgspec.Meta(ge=1, le=1000)]
ExposureCursor = Annotated[str, msgspec.Meta(min_length=1, max_length=512)]


class ExposureRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Everything reachable from outside the fabric (``vnet.policy.exposure``), broadest first,
    at most ``limit`` entries per reply; pass the reply's ``next_cursor`` as ``cursor`` for
    the next page. An entry that exposes very many endpoints comes in pieces (consecutive
    entries with the same ``kind``, ``ident`` and ``ports``, each with part of ``endpoints``),
    so a page stays far below the bus limit; ``VNetManager.exposure`` joins them again."""

    limit: ExposureLimit = 200
    cursor: ExposureCursor | None = None


class ExposureReply(msgspec.Struct, kw_only=True):
    exposures: list[Exposure]  # broadest first
    endpoints: int  # distinct endpoints exposed in any way (over every page)
    next_cursor: str | None = None  # None: this was the last page


RuleLimit = Annotated[int, msgspec.Meta(ge=1, le=1000)]
RuleCursor = Annotated[str, msgspec.Meta(max_length=256)]


class RuleList(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Allow rules in id order, ``limit`` per reply; pass the reply's ``next_cursor`` as
    ``cursor`` for the next page (a rule can be a few KB: a page stays far below the bus limit)."""

    limit: RuleLimit = 500
    cursor: RuleCursor | None = None


class RulePage(msgspec.Struct, kw_only=True):
    rules: list[AllowRule]
    next_cursor: str | None = None  # more rules follow: pass it as ``cursor``


class ExplainRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Why can (or cannot) ``src`` open a connection to ``dst``? Each is an endpoint id, a
    container name (of a container attached to several networks, the endpoint pair the flow
    takes) or an IP address (an address no network holds is external)."""

    src: Ref
    dst: Ref
    protocol: Protocol = "tcp"
    port: Port | None = None


class RulesetRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The compiled ruleset of node ``node`` (the node worker's fetch). A reply too large
    for one bus message (a node with thousands of endpoints: 10,000 are ~1.5 MB) comes in
    ``parts`` parts: ask for each ``part`` and :func:`join_ruleset` them."""

    node: NodeId
    # True (the node worker): the ruleset as a structure (``ruleset``), to write deltas of
    # its elements, instead of the rendered script (people, tools)
    structured: bool = False
    part: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 0


class RulesetReply(msgspec.Struct, kw_only=True):
    node: str
    version: str  # hash of the ruleset: unchanged version -> nothing to apply
    script: str  # one nft transaction (vnet.core.nft.render); "" when ``structured`` was asked
    endpoints: int
    rules: int
    ruleset: Ruleset | None = None  # when ``structured`` was asked
    # A large reply in parts: ``parts`` > 1, and this part's share of the whole reply's JSON
    # (base64) in ``chunk`` (``script`` empty, ``ruleset`` and ``macvlan`` null); every part
    # carries the same ``version``.
    part: int = 0
    parts: int = 1
    chunk: str = ""
    # when ``structured`` was asked and the node has macvlan endpoints: what their tables in the
    # container namespaces need beyond ``ruleset`` (vnet.core.mvpolicy, the same engine)
    macvlan: MvPolicy | None = None


def policy_network(n: VirtualNetwork) -> PolicyNetwork:
    return PolicyNetwork.from_record(n)


def policy_endpoint(ep: EndpointInfo) -> PolicyEndpoint:
    """A stored endpoint as the engine sees it (host-driver endpoints have no bridge port)."""
    ips = tuple(a for a in (ep.ip_address, ep.ipv6_address) if a)
    published = tuple(Published(protocol=p.protocol, host_port=p.host_port, port=p.container_port) for p in ep.ports)
    return PolicyEndpoint(id=ep.id, network=ep.network_id, ips=ips, mac=ep.mac_address, labels=dict(ep.labels),
                          node=ep.node, host_ifname="-" if ep.driver.value == "host" else "", published=published)


def split_ruleset(whole: RulesetReply, part: int, size: int) -> RulesetReply:
    """Part ``part`` of ``whole`` when its JSON is over ``size`` bytes (else ``whole``)."""
    raw = msgspec.json.encode(whole)
    if len(raw) <= size:
        if part:
            raise ValueError(f"the ruleset of {whole.node} is one part; part {part} does not exist")
        return whole
    parts = -(-len(raw) // size)
    if part >= parts:
        raise ValueError(f"the ruleset of {whole.node} has {parts} parts; part {part} does not exist")
    chunk = base64.b64encode(raw[part * size:(part + 1) * size]).decode()
    return RulesetReply(node=whole.node, version=whole.version, script="", endpoints=whole.endpoints,
                        rules=whole.rules, part=part, parts=parts, chunk=chunk)


def join_ruleset(parts: list[RulesetReply]) -> RulesetReply:
    """The whole reply from its parts; ``ValueError`` when they do not belong together (the
    ruleset changed between two parts: fetch again)."""
    if len(parts) == 1 and parts[0].parts <= 1:
        return parts[0]
    first = parts[0]
    got = sorted(parts, key=lambda p: p.part)
    if [p.part for p in got] != list(range(first.parts)) or any(p.parts != first.parts for p in got):
        raise ValueError(f"ruleset parts {[p.part for p in got]} of {first.parts}")
    if len({p.version for p in got}) != 1:
        raise ValueError("the ruleset changed between its parts")
    return msgspec.json.decode(b"".join(base64.b64decode(p.chunk) for p in got), type=RulesetReply)
