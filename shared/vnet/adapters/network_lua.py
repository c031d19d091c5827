"""The network registry's Lua: every decision that must be atomic, one script each (run
by Valkey in one slot, ``{global:idx}``).

Kept apart from :mod:`vnet.adapters.network_store` (which decides what to call and
decodes the answers), as :mod:`vnet.adapters.ipam_lua` is from the IPAM store: these
are the only lines that run inside the server, so a reader checking atomicity reads
this file alone. Key layout and the overlap index: the store's docstring.
"""

from __future__ import annotations

from vnet.adapters.redis import Script

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
GET = Script(_PRELUDE + """
local out = {}
for i = 2, #ARGV do
  local id = resolve(ARGV[i])
  if id then out[#out + 1] = view(id) else out[#out + 1] = {} end
end
return out
""", readonly=True)

# ARGV: prefix, id, name, doc, max, scope, m4, first4, last4, m6, first6, last6, parent, request_id, idem_ttl,
#       vni ('' none | 'auto' allocate | a number asked for), vni_min, vni_max
CREATE = Script(_PRELUDE + """
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
UPDATE = Script(_PRELUDE + """
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
DELETE = Script(_PRELUDE + """
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
CONNECT = Script(_PRELUDE + """
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
MESH_CREATE = Script(_PRELUDE + _MESH_VIEW + """
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
MESH_MEMBER = Script(_PRELUDE + _MESH_VIEW + """
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
MESH_DELETE = Script(_PRELUDE + _MESH_VIEW + """
local name = ARGV[2]
local m = mesh(name)
if #m == 0 then return {'no_mesh'} end
for _, id in ipairs(m[3]) do redis.call('SREM', R(id) .. ':meshes', name) end
redis.call('DEL', P .. 'netmesh:' .. name)
redis.call('HDEL', P .. 'netmeshes', name)
return {'ok', m}
""")

# ARGV: prefix, name... (none: every mesh)
MESH_GET = Script(_PRELUDE + _MESH_VIEW + """
local out = {}
if #ARGV == 1 then
  for _, name in ipairs(redis.call('HKEYS', P .. 'netmeshes')) do out[#out + 1] = mesh(name) end
else
  for i = 2, #ARGV do out[#out + 1] = mesh(ARGV[i]) end
end
return out
""", readonly=True)

# ARGV: prefix, cursor|'' , limit, budget, labels-json, parent-id|''
LIST = Script(_PRELUDE + """
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
""", readonly=True)

ALL_SCRIPTS = (GET, CREATE, UPDATE, DELETE, CONNECT, MESH_CREATE, MESH_MEMBER, MESH_DELETE, MESH_GET,
               LIST)

UNLOCK = Script("""
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
""")
