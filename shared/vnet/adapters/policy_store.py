"""The allow rules in Redis: one hash, rule id -> the rule as JSON, plus idempotency records.

``vnet:{policy:global}:rules`` holds every rule (one hash tag: the set is small and read
whole by every compile); a mutation's reply is kept under ``vnet:{policy:global}:idem:<op>:
<request id>`` for a day so a retried request gets the first answer.
"""

from __future__ import annotations

from typing import Any

import msgspec

from vnet.adapters.redis import key
from vnet.core.policy import AllowRule

RULES_KEY = key("policy", "global", "rules")


class PolicyStore:
    """Typed calls on the rule hash (no validation here: the service validates)."""

    def __init__(self, r: Any) -> None:
        self.r = r

    async def rules(self) -> list[AllowRule]:
        """Every rule, sorted by id."""
        raw: dict[bytes, bytes] = await self.r.hgetall(RULES_KEY)
        return sorted((msgspec.json.decode(v, type=AllowRule) for v in raw.values()), key=lambda r: r.id)

    async def get(self, ident: str) -> AllowRule | None:
        raw: bytes | None = await self.r.hget(RULES_KEY, ident.encode())
        return None if raw is None else msgspec.json.decode(raw, type=AllowRule)

    async def exists(self, ident: str) -> bool:
        return bool(await self.r.hexists(RULES_KEY, ident.encode()))

    async def put(self, rule: AllowRule) -> None:
        await self.r.hset(RULES_KEY, rule.id.encode(), msgspec.json.encode(rule))

    async def delete(self, ident: str) -> bool:
        """True when the rule was there."""
        return bool(await self.r.hdel(RULES_KEY, ident.encode()))

