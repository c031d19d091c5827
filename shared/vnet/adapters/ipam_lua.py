"""The IPAM decisions as Lua (one script per decision, run atomically by Valkey) and the
batcher that sends the calls of one event-loop turn as one pipeline.

Kept apart from :mod:`vnet.adapters.ipam_store` (which decides what to call) because
these are the only lines that run inside the server: a reader checking atomicity
reads this file alone. Key layout and arguments: the store's docstring.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from vnet.adapters.redis import Script

log = logging.getLogger(__name__)

_LUA_COMMON = """
-- First clear bit in [s, e] (inclusive); bits past the end of the string are clear.
-- (BITPOS with an explicit range ignores bits past the string, and on a missing key it
-- answers 0 whatever the range: both are handled here.)
local function first_clear(key, s, e)
  if s > e then return -1 end
  local len = redis.call('STRLEN', key) * 8
  if s >= len then return s end
  local last = e
  if last >= len then last = len - 1 end
  local p = redis.call('BITPOS', key, 0, s, last, 'BIT')
  if p >= s and p <= last then return p end
  if e >= len then return len end
  return -1
end
local function block_full(key, b, n, B)
  local s = b * B
  local e = math.min(n - 1, s + B - 1)
  return redis.call('BITCOUNT', key, s, e, 'BIT') == e - s + 1
end
-- First free offset in [s, e]: the rest of s's block, then the summary, then one block.
local function find_free(bits, sum, s, e, B)
  if s > e then return -1 end
  local bs = math.floor(s / B)
  local be = math.floor(e / B)
  local p = first_clear(bits, s, math.min(e, bs * B + B - 1))
  if p >= 0 then return p end
  local b = first_clear(sum, bs + 1, be)
  while b >= 0 and b <= be do
    p = first_clear(bits, b * B, math.min(e, b * B + B - 1))
    if p >= 0 then return p end
    if b == be then return -1 end
    -- a clear summary bit on a full block: repair it and go on
    redis.call('SETBIT', sum, b, 1)
    b = first_clear(sum, b + 1, be)
  end
  return -1
end
-- Set (v = 1) or clear (v = 0) the bits s..e: single bits at the edges, whole bytes between.
local function fill_range(key, s, e, v)
  local j = s
  while j <= e and j % 8 ~= 0 do redis.call('SETBIT', key, j, v); j = j + 1 end
  local full = math.floor((e + 1 - j) / 8)
  if full > 0 then
    local byte = '\\0'
    if v == 1 then byte = '\\255' end
    redis.call('SETRANGE', key, j / 8, string.rep(byte, full))
    j = j + full * 8
  end
  while j <= e do redis.call('SETBIT', key, j, v); j = j + 1 end
end
local function now()
  local t = redis.call('TIME')
  return t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
end
local function split_record(rec)
  local sep = string.find(rec, '|', 1, true)
  return tonumber(string.sub(rec, 1, sep - 1)), string.sub(rec, sep + 1)
end
"""

# KEYS: meta bits sum own off
# ARGV: sig gen network_id family cidr gateway reserved_json excluded_json window capacity block [s e]...
CREATE = Script(_LUA_COMMON + """
local cur = redis.call('HMGET', KEYS[1], 'sig', 'gen', 'created_at')
if cur[1] then
  if cur[1] == ARGV[1] then return {'exists', cur[2], cur[3]} end
  return {'conflict', cur[1]}
end
-- a half-made pool (no meta) leaves nothing that matters: start clean
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
local n = tonumber(ARGV[9])
local B = tonumber(ARGV[11])
local touched = {}
for i = 12, #ARGV, 2 do
  local s = tonumber(ARGV[i])
  local e = tonumber(ARGV[i + 1])
  fill_range(KEYS[2], s, e, 1)
  for b = math.floor(s / B), math.floor(e / B) do touched[b] = true end
end
for b, _ in pairs(touched) do
  if block_full(KEYS[2], b, n, B) then redis.call('SETBIT', KEYS[3], b, 1) end
end
local ts = now()
redis.call('HSET', KEYS[1], 'sig', ARGV[1], 'gen', ARGV[2], 'network_id', ARGV[3], 'family', ARGV[4],
  'cidr', ARGV[5], 'gateway', ARGV[6], 'reserved', ARGV[7], 'excluded', ARGV[8], 'window', ARGV[9],
  'capacity', ARGV[10], 'block', B, 'used', 0, 'cursor', -1, 'high', -1, 'created_at', ts)
return {'created', ARGV[2], ts}
""")

# KEYS: meta bits sum own off [rid]
# ARGV: gen owner want(-1: dynamic) rid_ttl
ALLOC = Script(_LUA_COMMON + """
local m = redis.call('HMGET', KEYS[1], 'gen', 'window', 'cursor', 'used', 'block', 'high')
if not m[1] then return {'nopool'} end
if m[1] ~= ARGV[1] then return {'stale', m[1]} end
local owner = ARGV[2]
local want = tonumber(ARGV[3])
local rid = KEYS[6]
local held = redis.call('HGET', KEYS[4], owner)
if rid then
  local prev = redis.call('GET', rid)
  if prev then
    local a = string.find(prev, '|', 1, true)
    local b = string.find(prev, '|', a + 1, true)
    local c = string.find(prev, '|', b + 1, true)
    local pgen = string.sub(prev, 1, a - 1)
    local powner = string.sub(prev, a + 1, b - 1)
    local poff = tonumber(string.sub(prev, b + 1, c - 1))
    if pgen == ARGV[1] then
      if powner ~= owner then return {'rid_conflict', powner, poff} end
      if not held then return {'rid_spent', poff, string.sub(prev, c + 1)} end
    end
  end
end
if held then
  local off, ts = split_record(held)
  if want >= 0 and want ~= off then return {'owner_has', off, ts} end
  return {'exists', off, ts}
end
local n = tonumber(m[2])
local B = tonumber(m[5]) or 1024
local o
if want >= 0 then
  if want >= n then return {'outside'} end
  if redis.call('GETBIT', KEYS[2], want) == 1 then
    local holder = redis.call('HGET', KEYS[5], want)
    if holder then
      local hrec = redis.call('HGET', KEYS[4], holder)
      local ts = ''
      if hrec then local _o, t = split_record(hrec); ts = t end
      return {'in_use', holder, ts}
    end
    return {'blocked'}
  end
  o = want
else
  local cursor = tonumber(m[3]) or -1
  o = find_free(KEYS[2], KEYS[3], cursor + 1, n - 1, B)
  if o < 0 then o = find_free(KEYS[2], KEYS[3], 0, math.min(cursor, n - 1), B) end
  if o < 0 then return {'exhausted', tonumber(m[4])} end
  redis.call('HSET', KEYS[1], 'cursor', o)
end
redis.call('SETBIT', KEYS[2], o, 1)
if block_full(KEYS[2], math.floor(o / B), n, B) then redis.call('SETBIT', KEYS[3], math.floor(o / B), 1) end
local ts = now()
redis.call('HSET', KEYS[4], owner, o .. '|' .. ts)
redis.call('HSET', KEYS[5], o, owner)
redis.call('HINCRBY', KEYS[1], 'used', 1)
if rid then
  redis.call('SET', rid, ARGV[1] .. '|' .. owner .. '|' .. o .. '|' .. ts, 'EX', tonumber(ARGV[4]))
end
-- first use: no one held this offset since the pool was made (every offset handed out is at
-- most 'high'); a pool made before 'high' existed has none and never says so
local high = tonumber(m[6])
local first = 0
if high and o > high then
  first = 1
  redis.call('HSET', KEYS[1], 'high', o)
end
return {'ok', o, ts, first}
""")

# KEYS: meta bits sum own off
# ARGV: owner expect_offset('' = any) allocated_before('' = any)
RELEASE = Script(_LUA_COMMON + """
local m = redis.call('HMGET', KEYS[1], 'cidr', 'block')
local cidr = m[1]
if not cidr then return {'nopool'} end
local B = tonumber(m[2]) or 1024
local rec = redis.call('HGET', KEYS[4], ARGV[1])
if not rec then return {'none', cidr} end
local off, ts = split_record(rec)
if ARGV[2] ~= '' and (tonumber(ARGV[2]) ~= off or tonumber(ts) > tonumber(ARGV[3])) then
  return {'changed', cidr}
end
redis.call('SETBIT', KEYS[2], off, 0)
redis.call('SETBIT', KEYS[3], math.floor(off / B), 0)
redis.call('HDEL', KEYS[4], ARGV[1])
if redis.call('HGET', KEYS[5], off) == ARGV[1] then redis.call('HDEL', KEYS[5], off) end
redis.call('HINCRBY', KEYS[1], 'used', -1)
return {'released', cidr, off, ts}
""")

# KEYS: meta bits sum own off
# ARGV: force('1'/'0') expect_gen('' = any)
DELETE = Script("""
local gen = redis.call('HGET', KEYS[1], 'gen')
if not gen then return {'absent'} end
if ARGV[2] ~= '' and ARGV[2] ~= gen then return {'changed'} end
local n = redis.call('HLEN', KEYS[4])
if n > 0 and ARGV[1] ~= '1' then
  return {'in_use', n, redis.call('HRANDFIELD', KEYS[4], 3)}
end
local meta = redis.call('HGETALL', KEYS[1])
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
return {'deleted', n, meta}
""")

# KEYS: meta bits sum
# ARGV: gen new_gen sig excluded_json capacity nset [s e]*nset (to block) [s e]... (to unblock)
EXCLUDE = Script(_LUA_COMMON + """
local m = redis.call('HMGET', KEYS[1], 'gen', 'window', 'block')
if not m[1] then return {'nopool'} end
if m[1] ~= ARGV[1] then return {'stale'} end
local n = tonumber(m[2])
local B = tonumber(m[3]) or 1024
local nset = tonumber(ARGV[6])
for i = 0, nset - 1 do
  local s = tonumber(ARGV[7 + 2 * i])
  local e = tonumber(ARGV[8 + 2 * i])
  if redis.call('BITCOUNT', KEYS[2], s, e, 'BIT') > 0 then return {'in_use', s, e} end
end
local touched = {}
for i = 7, #ARGV, 2 do
  local s = tonumber(ARGV[i])
  local e = tonumber(ARGV[i + 1])
  local v = 1
  if i >= 7 + 2 * nset then v = 0 end
  fill_range(KEYS[2], s, e, v)
  for b = math.floor(s / B), math.floor(e / B) do touched[b] = true end
end
for b, _ in pairs(touched) do
  if block_full(KEYS[2], b, n, B) then redis.call('SETBIT', KEYS[3], b, 1) else redis.call('SETBIT', KEYS[3], b, 0) end
end
redis.call('HSET', KEYS[1], 'gen', ARGV[2], 'sig', ARGV[3], 'excluded', ARGV[4], 'capacity', ARGV[5])
return {'ok'}
""")

SCRIPTS = (CREATE, ALLOC, RELEASE, DELETE, EXCLUDE)


class Batcher:
    """Script calls issued in the same event-loop turn go to Redis as one pipeline.

    Each call is still one script — one atomic decision — but 64 concurrent requests
    cost one write and one read instead of 64 of each (like ioredis' auto-pipelining).
    A script the server forgot (``NOSCRIPT``) is loaded and that call retried alone.

    ``wait_replicas`` > 0 ends every pipeline with ``WAIT wait_replicas wait_timeout_ms``
    on the same connection, so a call is answered only once that many replicas hold its
    write (or the timeout passed): an acknowledged allocation then survives the
    primary's loss and a Sentinel failover cannot hand the address out again
    (docs/scale.md: +0.4-0.5 ms per allocation on loopback). A WAIT that times out
    short of the count still answers the call (the write is on the primary; failing it
    would leave the caller unsure), logs it and counts it in ``short_waits``.
    """

    def __init__(self, r: aioredis.Redis, *, wait_replicas: int = 0, wait_timeout_ms: int = 500) -> None:
        self.r = r
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self.short_waits = 0
        self._pending: list[tuple[Script, list[str], list[Any], asyncio.Future[Any]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def __call__(self, script: Script, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((script, keys, args, fut))
        return fut

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if len(batch) == 1 and not self.wait_replicas:
            script, keys, args, fut = batch[0]
            task = asyncio.ensure_future(self._one(script, keys, args, fut))
        else:
            task = asyncio.ensure_future(self._send(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _one(self, script: Script, keys: list[str], args: list[Any], fut: asyncio.Future[Any]) -> None:
        try:
            res = await script(self.r, keys, args)
        except BaseException as exc:
            if not fut.done():
                fut.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        if not fut.done():
            fut.set_result(res)

    async def _send(self, batch: list[tuple[Script, list[str], list[Any], asyncio.Future[Any]]],
                    reloaded: bool = False) -> None:
        pipe = self.r.pipeline(transaction=False)
        for script, keys, args, _ in batch:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        if self.wait_replicas:
            pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
        try:
            results = await pipe.execute(raise_on_error=False)
        except BaseException as exc:
            for *_, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        if self.wait_replicas:
            acked = results.pop()
            if not isinstance(acked, int) or acked < self.wait_replicas:
                self.short_waits += 1
                log.warning("WAIT %d %d ms: %s replica(s) acknowledged %d script call(s); an acknowledged "
                            "write may be lost if the primary dies now", self.wait_replicas,
                            self.wait_timeout_ms, acked, len(batch))
        retry: list[tuple[Script, list[str], list[Any], asyncio.Future[Any]]] = []
        for item, res in zip(batch, results, strict=True):
            script, keys, args, fut = item
            if isinstance(res, NoScriptError):
                retry.append(item)
            elif fut.done():
                continue
            elif isinstance(res, Exception):
                fut.set_exception(res)
            else:
                fut.set_result(res)
        if retry and not reloaded:
            try:
                for script in {id(i[0]): i[0] for i in retry}.values():
                    await self.r.script_load(script.source)
            except BaseException as exc:
                for *_, fut in retry:
                    if not fut.done():
                        fut.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return
            await self._send(retry, reloaded=True)
        elif retry:
            for *_, fut in retry:
                if not fut.done():
                    fut.set_exception(NoScriptError("the script vanished again right after it was loaded"))
