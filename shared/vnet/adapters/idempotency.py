"""Replies of idempotent mutations, and the claim that makes a request id run once.

One STRING per (operation, request id) under a domain's prefix: while the first request
runs it holds a *pending* marker (``\\x00pending:<token>``, a short TTL the running request
keeps extending); when it finishes, its JSON reply (kept :data:`REPLY_TTL_S`). The marker
is set only when the key is absent (one script: read and claim are one step), so of two
requests with one id exactly one runs; the other sees the marker and waits for the reply
(:func:`vnet.runtime.idempotency.run_once`). A process that dies while holding a claim
stops extending it, so the marker expires and a later retry runs the change.

Key names are the ones each domain used before this module (a reply stored by an older
version is still found):

    vnet:{global:idx}:netidem:<op>:<request id>       network mutations other than create
    vnet:{policy:global}:idem:<op>:<request id>       rule put / delete
    vnet:{global:idx}:epdel:<request id>              endpoint delete
    vnet:{global:idx}:epupd:<request id>              endpoint update
"""

from __future__ import annotations

from typing import Any

from vnet.adapters.redis import Script, global_key, key

REPLY_TTL_S = 24 * 3600
PENDING = b"\x00pending:"

# The prefix of each domain's keys; a name is "<op>:<request id>" ("epdel:<id>" for endpoints).
PREFIXES = {
    "network": global_key("netidem") + ":",
    "policy": key("policy", "global", "idem") + ":",
    "endpoint": global_key() + ":",
}

# KEYS: the key; ARGV: marker, ttl ms. Answers what is there (a marker or a reply), or nil
# when the key was free and now holds this marker.
CLAIM = Script("""
local v = redis.call('GET', KEYS[1])
if v then return v end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
""")

# KEYS: the key; ARGV: marker, reply, ttl s. Stores the reply unless another request's marker
# or reply is there (this one's marker expired and another retry took the key).
FINISH = Script("""
local v = redis.call('GET', KEYS[1])
if v and v ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
return 1
""")

# KEYS: the key; ARGV: marker[, ttl ms]. With a ttl: extend the marker; without: delete it
# (the request failed: a repeat runs it again). Only while the key holds this marker.
KEEP = Script("""
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) else redis.call('DEL', KEYS[1]) end
return 1
""")


def _b(v: Any) -> bytes:
    return v if isinstance(v, bytes) else str(v).encode()


class ReplyStore:
    """Claims and replies of one domain (``network``, ``policy``, ``endpoint``)."""

    def __init__(self, r: Any, domain: str) -> None:
        self.r = r
        self.prefix = PREFIXES[domain]

    async def claim(self, name: str, marker: bytes, ttl_s: float) -> bytes | None:
        """None: the key was free and holds ``marker`` now. Else what it holds: another
        request's marker (starts with :data:`PENDING`) or the stored reply."""
        got = await CLAIM(self.r, [self.prefix + name], [marker, int(ttl_s * 1000)])
        return None if got is None else _b(got)

    async def keep(self, name: str, marker: bytes, ttl_s: float) -> bool:
        """Extend the claim; False when the key no longer holds ``marker``."""
        return bool(await KEEP(self.r, [self.prefix + name], [marker, int(ttl_s * 1000)]))

    async def release(self, name: str, marker: bytes) -> None:
        await KEEP(self.r, [self.prefix + name], [marker])

    async def finish(self, name: str, marker: bytes, reply: bytes) -> bool:
        return bool(await FINISH(self.r, [self.prefix + name], [marker, reply, REPLY_TTL_S]))

    async def get(self, name: str) -> bytes | None:
        got = await self.r.get(self.prefix + name)
        return None if got is None else _b(got)
