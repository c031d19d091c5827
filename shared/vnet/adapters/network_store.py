"""The network registry in Redis: every decision that must be atomic is one Lua script.

All keys share the hash tag ``{global:idx}`` (:func:`vnet.adapters.redis.global_key`),
so each script touches a single slot and is atomic across any number of network
service replicas (Redis Cluster included)::

    vnet:{global:idx}:networks                 SET   ids of existing networks (the metrics service counts it)
    vnet:{global:idx}:net:<id>                 HASH  doc (JSON record), scope, m4, m6 (index members)
    vnet:{global:idx}:net:<id>:conn            SET   ids of connected networks (kept symmetric)
    vnet:{global:idx}:net:<id>:children        SET   ids of child networks
    vnet:{global:idx}:net:<id>:meshes          SET   names of the mesh groups it belongs to
    vnet:{global:idx}:netnames                 HASH  name -> id (uniqueness)
    vnet:{global:idx}:netnames:lex             ZSET  names, score 0 (ordered listing, name cursor)
    vnet:{global:idx}:netcidx:<4|6>:<scope>    ZSET  "<first>:<last>:<id>" in fixed-width hex, score 0
    vnet:{global:idx}:netmeshes                HASH  mesh name -> created_at
    vnet:{global:idx}:netmesh:<name>           SET   member ids
    vnet:{global:idx}:netidem:<request_id>     STRING result of an idempotent request (24 h)
    vnet:{global:idx}:nethostroutes:<node>     STRING JSON prefixes a node reported (expires)
    vnet:{global:idx}:nethostroutes:nodes      ZSET  node -> expiry time
    vnet:{global:idx}:netcarve:<4|6>:<scope>:<pool>  STRING hex position after the last carved subnet
    vnet:{global:idx}:netlock:<name>           STRING short-lived lock (parent pool exclusions)
    vnet:{global:idx}:netvni                   HASH  VNI -> id of the overlay network holding it
    vnet:{global:idx}:netvni:next              STRING the VNI after the last one allocated (next-fit cursor)

**The overlap index.** ``<scope>`` is ``root`` for top-level networks and the parent's
id for children. Within one scope the subnets are pairwise disjoint (children nest
inside their parent, siblings do not overlap), so a new ``[first, last]`` overlaps
something iff the member with the greatest ``first <= last`` ends at or after
``first``: one ``ZREVRANGEBYLEX`` with ``LIMIT 0 1``, O(log n). Fixed-width lower-case
hex makes lexicographic order numeric order; IPv4 and IPv6 have separate indexes.

The endpoints of a network are the endpoint service's set ``vnet:{netep:<id>}``
(another slot): read here, never written except to drop it once the network is gone.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgspec
import redis.asyncio as aioredis

from vnet.adapters.redis import Script, global_key, key
from vnet.core.model import NetworkRecord, VirtualNetwork

PREFIX = global_key() + ":"
NETWORKS = global_key("networks")
IDEM_TTL_S = 24 * 3600
VNI_MIN, VNI_MAX = 1, (1 << 24) - 1  # VXLAN network identifiers (24 bits; 0 is not used)


# The stored record: a network without its relation sets (those live in SETs).
NetworkDoc = NetworkRecord

_doc_decoder = msgspec.json.Decoder(NetworkDoc)
_encoder = msgspec.json.Encoder()


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _view(raw: Any) -> VirtualNetwork | None:
    """A network from a script's ``{id, doc, conn, children, meshes}`` (``{}``: missing)."""
    if not raw:
        return None
    doc = _doc_decoder.decode(raw[1])
    return VirtualNetwork(
        id=doc.id, name=doc.name, cidr=doc.cidr, gateway=doc.gateway, driver_type=doc.driver_type,
        isolation_mode=doc.isolation_mode, options=doc.options, labels=doc.labels, created_at=doc.created_at,
        updated_at=doc.updated_at, cidr_v6=doc.cidr_v6, gateway_v6=doc.gateway_v6, parent=doc.parent,
        children=sorted(_s(x) for x in raw[3]), connected=sorted(_s(x) for x in raw[2]),
        mesh_groups=sorted(_s(x) for x in raw[4]))


_PRELUDE = """
local P = ARGV[1]
local function R(id) return P .. 'net:' .. id end
local function view(id)
  local r = R(id)
  local doc = redis.call('HGET', r, 'doc')
  if not doc then return {} end
  return {id, doc, redis.call('SMEMBERS', r .. ':conn'), redis.call('SMEMBERS', r .. ':children'),
          redis.call('SMEMBERS', r .. ':meshes')}
end
local function resolve(ref)
  if redis.call('EXISTS', R(ref)) == 1 then return ref end
  return redis.call('HGET', P .. 'netnames', ref)
end
"""

# ARGV: prefix, ref...
_GET = Script(_PRELUDE + """
local out = {}
for i = 2, #ARGV do
  local id = resolve(ARGV[i])
  if id then out[#out + 1] = view(id) else out[#out + 1] = {} end
end
return out
""")

# ARGV: prefix, id, name, doc, max, scope, m4, first4, last4, m6, first6, last6, parent, request_id, idem_ttl,
#       vni ('' none | 'auto' allocate | a number asked for), vni_min, vni_max
_CREATE = Script(_PRELUDE + """
local id, name, scope, parent, rid = ARGV[2], ARGV[3], ARGV[6], ARGV[13], ARGV[14]
if rid ~= '' then
  local prev = redis.call('GET', P .. 'netidem:' .. rid)
  if prev then return {'dup', prev} end
end
local holder = redis.call('HGET', P .. 'netnames', name)
if holder then return {'name_taken', holder} end
if redis.call('EXISTS', R(id)) == 1 then return {'id_taken', id} end
local n = redis.call('SCARD', P .. 'networks')
if n >= tonumber(ARGV[5]) then return {'limit', tostring(n)} end
if parent ~= '' and redis.call('EXISTS', R(parent)) == 0 then return {'no_parent', parent} end
local function conflict(fam, first, last)
  local r = redis.call('ZREVRANGEBYLEX', P .. 'netcidx:' .. fam .. ':' .. scope, '(' .. last .. ';', '-',
                       'LIMIT', 0, 1)
  if #r > 0 then
    local _, mlast, mid = string.match(r[1], '^(%x+):(%x+):(.+)$')
    if mlast >= first then return {'overlap', fam, r[1], view(mid)} end
  end
  return nil
end
local c = conflict('4', ARGV[8], ARGV[9])
if c then return c end
if ARGV[10] ~= '' then
  c = conflict('6', ARGV[11], ARGV[12])
  if c then return c end
end
local doc = ARGV[4]
local VK = P .. 'netvni'
local vni, vnext = nil, 0
if ARGV[16] ~= '' then
  if ARGV[16] ~= 'auto' then
    local h = redis.call('HGET', VK, ARGV[16])
    if h then return {'vni_taken', ARGV[16], h} end
    vni = ARGV[16]
  else
    -- next free VNI from the cursor: with n VNIs held, n + 1 consecutive candidates hold a free one
    local lo, hi = tonumber(ARGV[17]), tonumber(ARGV[18])
    local size = hi - lo + 1
    local cur = tonumber(redis.call('GET', VK .. ':next') or lo)
    if cur < lo or cur > hi then cur = lo end
    local steps = math.min(size, redis.call('HLEN', VK) + 1)
    for _ = 1, steps do
      if redis.call('HEXISTS', VK, tostring(cur)) == 0 then vni = tostring(cur) break end
      cur = cur + 1
      if cur > hi then cur = lo end
    end
    if not vni then return {'vni_exhausted', tostring(size)} end
    vnext = cur + 1
    if vnext > hi then vnext = lo end
    local d = cjson.decode(doc)
    if type(d.options) ~= 'table' then d.options = {} end
    d.options.vni = vni
    doc = cjson.encode(d)
  end
end
redis.call('HSET', R(id), 'doc', doc, 'scope', scope, 'm4', ARGV[7], 'm6', ARGV[10])
redis.call('HSET', P .. 'netnames', name, id)
redis.call('ZADD', P .. 'netnames:lex', 0, name)
redis.call('SADD', P .. 'networks', id)
redis.call('ZADD', P .. 'netcidx:4:' .. scope, 0, ARGV[7])
if ARGV[10] ~= '' then redis.call('ZADD', P .. 'netcidx:6:' .. scope, 0, ARGV[10]) end
if parent ~= '' then redis.call('SADD', R(parent) .. ':children', id) end
if rid ~= '' then redis.call('SET', P .. 'netidem:' .. rid, id, 'EX', tonumber(ARGV[15])) end
if vni then
  redis.call('HSET', VK, vni, id)
  if ARGV[16] == 'auto' then redis.call('SET', VK .. ':next', tostring(vnext)) end
end
return {'ok', id}
""")

# ARGV: prefix, id, labels-json|'' (replace), set-json, remove-json, isolation|'', now
_UPDATE = Script(_PRELUDE + """
local r = R(ARGV[2])
local doc = redis.call('HGET', r, 'doc')
if not doc then return {'missing'} end
local d = cjson.decode(doc)
if type(d.labels) ~= 'table' then d.labels = {} end
if ARGV[3] ~= '' then d.labels = cjson.decode(ARGV[3]) end
for k, v in pairs(cjson.decode(ARGV[4])) do d.labels[k] = v end
for _, k in ipairs(cjson.decode(ARGV[5])) do d.labels[k] = nil end
local n = 0
for _ in pairs(d.labels) do n = n + 1 end
if n > 64 then return {'too_many_labels', tostring(n)} end
if ARGV[6] ~= '' then d.isolation_mode = ARGV[6] end
d.updated_at = ARGV[7]
redis.call('HSET', r, 'doc', cjson.encode(d))
return {'ok', view(ARGV[2])}
""")

# ARGV: prefix, id, now. Children become top-level networks (their subnets lay inside the
# deleted parent's, which is disjoint from every other top-level network).
_DELETE = Script(_PRELUDE + """
local id, now = ARGV[2], ARGV[3]
local r = R(id)
local before = view(id)
if #before == 0 then return {'missing'} end
local d = cjson.decode(before[2])
local scope = redis.call('HGET', r, 'scope')
local m4 = redis.call('HGET', r, 'm4')
local m6 = redis.call('HGET', r, 'm6')
redis.call('ZREM', P .. 'netcidx:4:' .. scope, m4)
if m6 and m6 ~= '' then redis.call('ZREM', P .. 'netcidx:6:' .. scope, m6) end
redis.call('HDEL', P .. 'netnames', d.name)
redis.call('ZREM', P .. 'netnames:lex', d.name)
redis.call('SREM', P .. 'networks', id)
for _, peer in ipairs(before[3]) do redis.call('SREM', R(peer) .. ':conn', id) end
for _, mesh in ipairs(before[5]) do redis.call('SREM', P .. 'netmesh:' .. mesh, id) end
if type(d.parent) == 'string' then redis.call('SREM', R(d.parent) .. ':children', id) end
if type(d.options) == 'table' and type(d.options.vni) == 'string' then
  if redis.call('HGET', P .. 'netvni', d.options.vni) == id then redis.call('HDEL', P .. 'netvni', d.options.vni) end
end
for _, child in ipairs(before[4]) do
  local cr = R(child)
  local cdoc = redis.call('HGET', cr, 'doc')
  if cdoc then
    local cd = cjson.decode(cdoc)
    cd.parent = cjson.null
    cd.updated_at = now
    local c4 = redis.call('HGET', cr, 'm4')
    local c6 = redis.call('HGET', cr, 'm6')
    redis.call('ZREM', P .. 'netcidx:4:' .. id, c4)
    redis.call('ZADD', P .. 'netcidx:4:root', 0, c4)
    if c6 and c6 ~= '' then
      redis.call('ZREM', P .. 'netcidx:6:' .. id, c6)
      redis.call('ZADD', P .. 'netcidx:6:root', 0, c6)
    end
    redis.call('HSET', cr, 'doc', cjson.encode(cd), 'scope', 'root')
  end
end
redis.call('DEL', r, r .. ':conn', r .. ':children', r .. ':meshes', P .. 'netcidx:4:' .. id, P .. 'netcidx:6:' .. id)
return {'ok', before}
""")

# ARGV: prefix, a, b, '1' connect | '0' disconnect
_CONNECT = Script(_PRELUDE + """
local a, b = ARGV[2], ARGV[3]
if redis.call('EXISTS', R(a)) == 0 then return {'missing', a} end
if redis.call('EXISTS', R(b)) == 0 then return {'missing', b} end
local changed
if ARGV[4] == '1' then
  changed = redis.call('SADD', R(a) .. ':conn', b)
  redis.call('SADD', R(b) .. ':conn', a)
else
  changed = redis.call('SREM', R(a) .. ':conn', b)
  redis.call('SREM', R(b) .. ':conn', a)
end
return {'ok', tostring(changed), view(a), view(b)}
""")

_MESH_VIEW = """
local function mesh(name)
  local created = redis.call('HGET', P .. 'netmeshes', name)
  if not created then return {} end
  return {name, created, redis.call('SMEMBERS', P .. 'netmesh:' .. name)}
end
"""

# ARGV: prefix, name, now, id...
_MESH_CREATE = Script(_PRELUDE + _MESH_VIEW + """
local name = ARGV[2]
if redis.call('HEXISTS', P .. 'netmeshes', name) == 1 then return {'exists', mesh(name)} end
for i = 4, #ARGV do
  if redis.call('EXISTS', R(ARGV[i])) == 0 then return {'missing', ARGV[i]} end
end
redis.call('HSET', P .. 'netmeshes', name, ARGV[3])
for i = 4, #ARGV do
  redis.call('SADD', P .. 'netmesh:' .. name, ARGV[i])
  redis.call('SADD', R(ARGV[i]) .. ':meshes', name)
end
return {'ok', mesh(name)}
""")

# ARGV: prefix, name, id, '1' add | '0' remove
_MESH_MEMBER = Script(_PRELUDE + _MESH_VIEW + """
local name, id = ARGV[2], ARGV[3]
if redis.call('HEXISTS', P .. 'netmeshes', name) == 0 then return {'no_mesh'} end
if redis.call('EXISTS', R(id)) == 0 then return {'missing', id} end
local changed
if ARGV[4] == '1' then
  changed = redis.call('SADD', P .. 'netmesh:' .. name, id)
  redis.call('SADD', R(id) .. ':meshes', name)
else
  changed = redis.call('SREM', P .. 'netmesh:' .. name, id)
  redis.call('SREM', R(id) .. ':meshes', name)
end
return {'ok', tostring(changed), mesh(name)}
""")

# ARGV: prefix, name
_MESH_DELETE = Script(_PRELUDE + _MESH_VIEW + """
local name = ARGV[2]
local m = mesh(name)
if #m == 0 then return {'no_mesh'} end
for _, id in ipairs(m[3]) do redis.call('SREM', R(id) .. ':meshes', name) end
redis.call('DEL', P .. 'netmesh:' .. name)
redis.call('HDEL', P .. 'netmeshes', name)
return {'ok', m}
""")

# ARGV: prefix, name... (none: every mesh)
_MESH_GET = Script(_PRELUDE + _MESH_VIEW + """
local out = {}
if #ARGV == 1 then
  for _, name in ipairs(redis.call('HKEYS', P .. 'netmeshes')) do out[#out + 1] = mesh(name) end
else
  for i = 2, #ARGV do out[#out + 1] = mesh(ARGV[i]) end
end
return out
""")

# ARGV: prefix, cursor|'' , limit, budget, labels-json, parent-id|''
_LIST = Script(_PRELUDE + """
local limit, budget = tonumber(ARGV[3]), tonumber(ARGV[4])
local want = cjson.decode(ARGV[5])
local filtered = next(want) ~= nil
local parent = ARGV[6]
local start = '-'
if ARGV[2] ~= '' then start = '(' .. ARGV[2] end
local items, scanned, last, done = {}, 0, nil, false
while not done and #items < limit and scanned < budget do
  local names = redis.call('ZRANGEBYLEX', P .. 'netnames:lex', start, '+', 'LIMIT', 0, 128)
  local consumed = 0
  for _, name in ipairs(names) do
    scanned = scanned + 1
    consumed = consumed + 1
    last = name
    local id = redis.call('HGET', P .. 'netnames', name)
    if id then
      local v = view(id)
      if #v > 0 then
        local ok = true
        if filtered or parent ~= '' then
          local d = cjson.decode(v[2])
          if parent ~= '' and d.parent ~= parent then ok = false end
          if ok and filtered then
            local labels = d.labels
            if type(labels) ~= 'table' then labels = {} end
            for k, val in pairs(want) do
              if labels[k] ~= val then ok = false break end
            end
          end
        end
        if ok then items[#items + 1] = v end
      end
    end
    if #items >= limit or scanned >= budget then break end
  end
  if #names < 128 and consumed == #names then done = true end
  if last then start = '(' .. last end
end
local cursor = ''
if last and not done then
  if #redis.call('ZRANGEBYLEX', P .. 'netnames:lex', '(' .. last, '+', 'LIMIT', 0, 1) > 0 then cursor = last end
end
return {cursor, items}
""")

ALL_SCRIPTS = (_GET, _CREATE, _UPDATE, _DELETE, _CONNECT, _MESH_CREATE, _MESH_MEMBER, _MESH_DELETE, _MESH_GET,
               _LIST)


@dataclass
class CreateResult:
    status: str  # ok | dup | name_taken | id_taken | limit | no_parent | overlap | vni_taken | vni_exhausted
    id: str = ""  # ok/dup: the network; name_taken, vni_taken: the holder
    count: int = 0  # limit: networks that exist; vni_exhausted: the size of the VNI range
    vni: int = 0  # vni_taken: the VNI asked for
    family: int = 0  # overlap
    conflict: VirtualNetwork | None = None  # overlap: the network in the way
    conflict_member: str = ""


@dataclass
class Deleted:
    network: VirtualNetwork
    children: list[str] = field(default_factory=list)


@dataclass
class Mesh:
    name: str
    created_at: str
    members: list[str]


def _mesh(raw: Any) -> Mesh | None:
    if not raw:
        return None
    return Mesh(name=_s(raw[0]), created_at=_s(raw[1]), members=sorted(_s(x) for x in raw[2]))


def new_id() -> str:
    return uuid.uuid4().hex[:16]


class NetworkStore:
    """Typed calls on the network registry (no validation: the service does that)."""

    def __init__(self, r: aioredis.Redis, prefix: str = PREFIX) -> None:
        self.r = r
        self.p = prefix

    def k(self, *parts: str) -> str:
        return self.p + ":".join(parts)

    async def load(self) -> None:
        for s in ALL_SCRIPTS:
            await self.r.script_load(s.source)

    async def _run(self, script: Script, *args: Any) -> Any:
        return await script(self.r, [NETWORKS], [self.p, *args])

    # -- reads -------------------------------------------------------------------------------
    async def get_many(self, refs: list[str]) -> list[VirtualNetwork | None]:
        if not refs:
            return []
        raw = await self._run(_GET, *refs)
        return [_view(x) for x in raw]

    async def get(self, ref: str) -> VirtualNetwork | None:
        return (await self.get_many([ref]))[0]

    async def name_holder(self, name: str) -> str | None:
        v = await self.r.hget(self.k("netnames"), name)
        return None if v is None else _s(v)

    async def count(self) -> int:
        return int(await self.r.scard(NETWORKS))

    async def predecessor(self, family: int, scope: str, last_hex: str) -> str | None:
        """The index member with the greatest first address <= ``last_hex`` (O(log n))."""
        got = await self.r.zrevrangebylex(self.k("netcidx", str(family), scope), f"({last_hex};", "-", 0, 1)
        return _s(got[0]) if got else None

    async def index_window(self, family: int, scope: str, from_hex: str, to_hex: str,
                           count: int) -> tuple[str | None, list[str]]:
        """The member just before ``from_hex`` and up to ``count`` members whose first address
        lies in ``[from_hex, to_hex]``, in order (one round trip)."""
        idx = self.k("netcidx", str(family), scope)
        pipe = self.r.pipeline(transaction=False)
        pipe.zrevrangebylex(idx, f"({from_hex}", "-", 0, 1)
        pipe.zrangebylex(idx, f"[{from_hex}", f"({to_hex};", 0, count)
        before, window = await pipe.execute()
        return (_s(before[0]) if before else None), [_s(m) for m in window]

    async def list_page(self, *, labels: dict[str, str], parent: str | None, limit: int, cursor: str | None,
                   budget: int = 2000) -> tuple[list[VirtualNetwork], str | None]:
        raw = await self._run(_LIST, cursor or "", limit, budget, json.dumps(labels) if labels else "{}",
                              parent or "")
        nets = [n for n in (_view(x) for x in raw[1]) if n is not None]
        nxt = _s(raw[0])
        return nets, (nxt or None)

    # -- writes ------------------------------------------------------------------------------
    async def create(self, doc: NetworkDoc, *, max_networks: int, scope: str, m4: str, span4: tuple[str, str],
                     m6: str | None, span6: tuple[str, str] | None, request_id: str | None,
                     vni: str = "", vni_range: tuple[int, int] = (VNI_MIN, VNI_MAX)) -> CreateResult:
        """``vni``: ``""`` (not an overlay), ``"auto"`` (the next free one of ``vni_range``, written into
        ``options["vni"]``) or the number asked for (refused when another network holds it)."""
        s6 = span6 or ("", "")
        raw = await self._run(_CREATE, doc.id, doc.name, _encoder.encode(doc), max_networks, scope, m4,
                              span4[0], span4[1], m6 or "", s6[0], s6[1], doc.parent or "", request_id or "",
                              IDEM_TTL_S, vni, vni_range[0], vni_range[1])
        status = _s(raw[0])
        if status == "vni_taken":
            return CreateResult(status, id=_s(raw[2]), vni=int(_s(raw[1])))
        if status == "vni_exhausted":
            return CreateResult(status, count=int(_s(raw[1])))
        if status in ("ok", "dup", "name_taken", "id_taken", "no_parent"):
            return CreateResult(status, id=_s(raw[1]))
        if status == "limit":
            return CreateResult(status, count=int(_s(raw[1])))
        if status == "overlap":
            return CreateResult(status, family=int(_s(raw[1])), conflict_member=_s(raw[2]), conflict=_view(raw[3]))
        raise RuntimeError(f"unexpected create result {raw!r}")

    async def update(self, ident: str, *, labels: dict[str, str] | None, set_labels: dict[str, str],
                     remove_labels: list[str], isolation: str | None, now: str) -> tuple[str, VirtualNetwork | None]:
        raw = await self._run(_UPDATE, ident, "" if labels is None else json.dumps(labels),
                              json.dumps(set_labels) if set_labels else "{}",
                              json.dumps(remove_labels) if remove_labels else "[]", isolation or "", now)
        status = _s(raw[0])
        if status == "ok":
            return status, _view(raw[1])
        if status == "too_many_labels":
            return status, None
        return status, None

    async def vni_holders(self) -> dict[int, str]:
        """Every allocated VNI and the network holding it."""
        raw = await self.r.hgetall(self.k("netvni"))
        return {int(_s(k)): _s(v) for k, v in raw.items()}

    async def delete(self, ident: str, now: str) -> Deleted | None:
        raw = await self._run(_DELETE, ident, now)
        if _s(raw[0]) != "ok":
            return None
        net = _view(raw[1])
        assert net is not None
        return Deleted(network=net, children=list(net.children))

    async def connect(self, a: str, b: str, *, on: bool) -> tuple[str, bool, VirtualNetwork | None,
                                                                   VirtualNetwork | None]:
        raw = await self._run(_CONNECT, a, b, "1" if on else "0")
        if _s(raw[0]) != "ok":
            return _s(raw[1]), False, None, None
        return "", _s(raw[1]) == "1", _view(raw[2]), _view(raw[3])

    async def mesh_create(self, name: str, members: list[str], now: str) -> tuple[str, Mesh | str | None]:
        raw = await self._run(_MESH_CREATE, name, now, *members)
        status = _s(raw[0])
        if status == "missing":
            return status, _s(raw[1])
        return status, _mesh(raw[1])

    async def mesh_member(self, name: str, ident: str, *, add: bool) -> tuple[str, bool, Mesh | None]:
        raw = await self._run(_MESH_MEMBER, name, ident, "1" if add else "0")
        status = _s(raw[0])
        if status != "ok":
            return status, False, None
        return status, _s(raw[1]) == "1", _mesh(raw[2])

    async def mesh_delete(self, name: str) -> Mesh | None:
        raw = await self._run(_MESH_DELETE, name)
        return _mesh(raw[1]) if _s(raw[0]) == "ok" else None

    async def meshes(self, names: list[str] | None = None) -> list[Mesh]:
        raw = await self._run(_MESH_GET, *(names or []))
        return sorted((m for m in (_mesh(x) for x in raw) if m is not None), key=lambda m: m.name)

    # -- idempotency (ops other than create, whose script checks it atomically) ---------------
    async def idem_get(self, request_id: str) -> bytes | None:
        v = await self.r.get(self.k("netidem", request_id))
        if v is None:
            return None
        return v if isinstance(v, bytes) else str(v).encode()

    async def idem_put(self, request_id: str, value: bytes) -> None:
        await self.r.set(self.k("netidem", request_id), value, ex=IDEM_TTL_S)

    # -- carving cursor (a hint: next-fit starts here) ----------------------------------------
    async def carve_cursor(self, family: int, scope: str, pool: str) -> int | None:
        v = await self.r.get(self.k("netcarve", str(family), scope, pool))
        return None if v is None else int(_s(v), 16)

    async def set_carve_cursor(self, family: int, scope: str, pool: str, value: int) -> None:
        await self.r.set(self.k("netcarve", str(family), scope, pool), f"{value:x}")

    # -- host routes -----------------------------------------------------------------------------
    async def put_host_routes(self, node: str, prefixes: list[str], ttl_s: float,
                              foreign: list[str] | None = None) -> None:
        now = time.time()
        pipe = self.r.pipeline(transaction=True)
        pipe.set(self.k("nethostroutes", node), json.dumps(prefixes), px=int(ttl_s * 1000))
        if foreign is not None:  # the node's prefixes that are not VNet's (route-overlap checks)
            pipe.set(self.k("nethostroutes", "foreign", node), json.dumps(foreign), px=int(ttl_s * 1000))
        pipe.zadd(self.k("nethostroutes", "nodes"), {node: now + ttl_s})
        pipe.zremrangebyscore(self.k("nethostroutes", "nodes"), "-inf", now)
        await pipe.execute()

    async def foreign_routes(self, nodes: list[str]) -> dict[str, list[str]]:
        """The last reported non-VNet prefixes of these nodes (absent: never reported or expired)."""
        if not nodes:
            return {}
        values = await self.r.mget([self.k("nethostroutes", "foreign", n) for n in nodes])
        return {n: list(json.loads(v)) for n, v in zip(nodes, values, strict=True) if v is not None}

    async def host_routes(self) -> dict[str, tuple[list[str], float]]:
        """Live reports: node -> (prefixes, seconds until it expires)."""
        now = time.time()
        nodes = await self.r.zrangebyscore(self.k("nethostroutes", "nodes"), now, "+inf", withscores=True)
        if not nodes:
            return {}
        entries: list[tuple[str, float]] = [(_s(item[0]), float(item[1])) for item in nodes]
        values = await self.r.mget([self.k("nethostroutes", name) for name, _ in entries])
        out: dict[str, tuple[list[str], float]] = {}
        for (name, expires), v in zip(entries, values, strict=True):
            if v is not None:
                out[name] = (list(json.loads(v)), max(0.0, expires - now))
        return out

    # -- endpoints (the endpoint service's set) and locks --------------------------------------
    async def endpoints_of(self, ident: str) -> list[str]:
        return sorted(_s(x) for x in await self.r.smembers(key("netep", ident)))

    async def drop_endpoints_set(self, ident: str) -> None:
        await self.r.delete(key("netep", ident))

    async def lock(self, name: str, ttl_s: float) -> str | None:
        token = uuid.uuid4().hex
        ok = await self.r.set(self.k("netlock", name), token, nx=True, px=int(ttl_s * 1000))
        return token if ok else None

    async def unlock(self, name: str, token: str) -> None:
        await _UNLOCK(self.r, [self.k("netlock", name)], [token])


_UNLOCK = Script("""
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
""")
