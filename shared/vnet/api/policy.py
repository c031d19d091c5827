"""VNetManager methods of the policy service: allow rules, explain, node rulesets.

::

    await m.put_rule(AllowRule(id="web-db", from_=[Selector(labels={"role": "web"})],
                               to=[Selector(labels={"role": "db"})],
                               ports=[PortSpec(protocol="tcp", port=5432)]))
    v = await m.explain("ep-a", "ep-b", protocol="tcp", port=5432)
    v.allowed, v.path, v.rules, v.reasons

Isolation modes change through :meth:`update_network` (``isolation=...``).

``put_rule`` / ``delete_rule`` take ``dry_run=True``: nothing changes, and ``reply.reach``
says which paths the change would open and close (a real call's reply carries the same)::

    (await m.put_rule(rule, dry_run=True)).reach.summary()   # "opens 4 paths, closes 0"

:meth:`exposure` lists what is reachable from outside the fabric, broadest first.
"""

from __future__ import annotations

import msgspec

from vnet.api.base import ClientBase
from vnet.contracts import subjects
from vnet.contracts.policy import (
    AllowRule,
    ExplainRequest,
    Exposure,
    ExposureReply,
    ExposureRequest,
    RuleDelete,
    RuleDeleted,
    RuleGet,
    RuleList,
    RulePage,
    RulePut,
    RuleReply,
    RulesetReply,
    RulesetRequest,
    Verdict,
    join_ruleset,
)
from vnet.core import errors as E
from vnet.core.policy import Protocol


class PolicyAPI(ClientBase):
    async def put_rule(self, rule: AllowRule, *, request_id: str | None = None, dry_run: bool = False) -> RuleReply:
        """Create or replace (whole) the allow rule ``rule.id``; the reply is the rule (an
        :class:`AllowRule`) with ``reach``, the paths it opened and closed."""
        return await self.call(subjects.POLICY_RULE_PUT, RulePut(rule=rule, request_id=request_id, dry_run=dry_run),
                               RuleReply)

    async def get_rule(self, rule_id: str) -> AllowRule:
        return await self.call(subjects.POLICY_RULE_GET, RuleGet(id=rule_id), AllowRule)

    async def list_rules(self) -> list[AllowRule]:
        """Every allow rule (all pages), in id order."""
        out: list[AllowRule] = []
        cursor: str | None = None
        while True:
            page = await self.call(subjects.POLICY_RULE_LIST, RuleList(cursor=cursor), RulePage)
            out += page.rules
            cursor = page.next_cursor
            if cursor is None:
                return out

    async def delete_rule(self, rule_id: str, *, request_id: str | None = None, dry_run: bool = False) -> RuleDeleted:
        return await self.call(subjects.POLICY_RULE_DELETE,
                               RuleDelete(id=rule_id, request_id=request_id, dry_run=dry_run), RuleDeleted)

    async def exposure(self, *, page_size: int = 200) -> ExposureReply:
        """Everything reachable from outside the fabric (published ports, ``none`` networks,
        allow rules from CIDRs) with the endpoints each exposes, broadest first: every page,
        an entry the service sent in pieces joined again."""
        out: list[Exposure] = []
        cursor: str | None = None
        while True:
            page = await self.call(subjects.POLICY_EXPOSURE, ExposureRequest(limit=page_size, cursor=cursor),
                                   ExposureReply)
            for x in page.exposures:
                last = out[-1] if out else None
                if last is not None and (last.kind, last.ident, last.ports) == (x.kind, x.ident, x.ports):
                    out[-1] = msgspec.structs.replace(last, endpoints=[*last.endpoints, *x.endpoints])
                else:
                    out.append(x)
            cursor = page.next_cursor
            if cursor is None:
                return ExposureReply(exposures=out, endpoints=page.endpoints)

    async def explain(self, src: str, dst: str, *, protocol: Protocol = "tcp", port: int | None = None) -> Verdict:
        """Why ``src`` can or cannot open a connection to ``dst`` (endpoint ids or addresses)."""
        return await self.call(subjects.POLICY_EXPLAIN, ExplainRequest(src=src, dst=dst, protocol=protocol,
                                                                         port=port), Verdict)

    async def node_ruleset(self, node: str, *, structured: bool = False) -> RulesetReply:
        """The compiled nft script of node ``node`` and its version (``structured``: the ruleset
        as the node worker gets it); every part of a large one, joined."""
        for _ in range(3):
            parts: list[RulesetReply] = []
            while True:
                rep = await self.call(subjects.POLICY_RULESET,
                                      RulesetRequest(node=node, structured=structured, part=len(parts)), RulesetReply)
                parts.append(rep)
                if len(parts) >= rep.parts:
                    break
            try:
                return join_ruleset(parts)
            except ValueError:
                continue  # it changed between two parts
        raise E.make(E.UNAVAILABLE, f"the ruleset of node {node} changed while its parts were fetched, three times; "
                     "retry")
