"""The endpoint records and the node registry in Redis.

Every key but one shares the hash tag ``{global:idx}`` (:func:`vnet.adapters.redis.global_key`),
so each decision is one Lua script on one slot — atomic across any number of
endpoint service replicas, Redis Cluster included::

    vnet:{global:idx}:endpoints                  SET    ids of existing endpoints — exactly those (the metrics
                                                        service counts it; IPAM GC treats an allocation whose
                                                        owner is not in it as orphaned)
    vnet:{global:idx}:ep:<id>                    HASH   doc (JSON EndpointInfo as created), node, status,
                                                        reason, code, at (last report), ver (last report's version)
    vnet:{global:idx}:epnode:<node>              SET    ids of the endpoints on a node
    vnet:{global:idx}:epnet:<network>            SET    ids of the endpoints of a network (ours; see netep below)
    vnet:{global:idx}:epctr:<container>:<net>    STRING id: the (container, network) idempotency key
    vnet:{global:idx}:epcif:<container>          HASH   interface name inside the container -> id
    vnet:{global:idx}:epmac:<network>            HASH   MAC -> id (a MAC is unique within a network)
    vnet:{global:idx}:epidem:<request_id>        STRING id created by that request (24 h)
    vnet:{global:idx}:epatt:<request_id>         SET    the ids the attempts of a create with that request id
                                                        allocate for, until one commits (1 h): the one that
                                                        commits releases the others' addresses (an attempt
                                                        whose instance died cannot)
    vnet:{global:idx}:epdel:<request_id>         STRING JSON reply of a delete with that request id (24 h)
    vnet:{global:idx}:epupd:<request_id>         STRING JSON reply of an update with that request id (24 h)
    vnet:{global:idx}:epports:<node>             HASH   "<proto>/<host ip>/<host port>" -> id: the host-port
                                                        claims of a node, taken in the same script that records
                                                        (or updates) the endpoint, so two racing creates cannot
                                                        both publish one port (host ip ``*``: every address)
    vnet:{global:idx}:node:<node>                STRING JSON NodeInfo, expires 3 heartbeats after the last one
    vnet:{global:idx}:nodeinfo:<node>            STRING JSON NodeInfo, kept a day (for nodes that are gone)
    vnet:{global:idx}:nodes                      ZSET   node -> last heartbeat (seconds since the epoch)
    vnet:{global:idx}:nodewg                     HASH   node -> its WireGuard mesh address (kept; see wg_address)
    vnet:{global:idx}:nodewg:addr                HASH   mesh address -> node (uniqueness)
    vnet:{netep:<network>}                       SET    ids of the endpoints of a network, read by the network
                                                        service (its delete refuses while it is not empty)

``netep`` lives in another slot (the network service's choice), so it is written
outside the scripts: added *before* the record is committed and removed *after* the
record is deleted. A crash in between leaves an id there whose record does not exist;
the network service's forced delete treats a missing endpoint as deleted.
"""

from __future__ import annotations

import hashlib
import ipaddress
import time
from collections.abc import Iterable
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from vnet.adapters.redis import Script, global_key, key
from vnet.contracts.endpoint import EndpointInfo, NodeInfo

ENDPOINTS = global_key("endpoints")
NETWORKS = global_key("networks")  # the network service's index of existing networks
NODES = global_key("nodes")
WG_BY_NODE = global_key("nodewg")  # HASH node -> its WireGuard mesh address (CIDR)
WG_BY_ADDR = global_key("nodewg:addr")  # HASH mesh address -> node (uniqueness)
IDEM_TTL_S = 24 * 3600
NODE_INFO_KEEP_S = 24 * 3600
IFNAME_PLACEHOLDER = "@IFNAME@"
NO_IFNAME = "-"  # host driver: no interface in the container


def rec_key(ident: str) -> str:
    return global_key("ep", ident)


def node_set(node: str) -> str:
    return global_key("epnode", node)


def net_set(network_id: str) -> str:
    return global_key("epnet", network_id)


def net_nodes_key(network_id: str) -> str:
    """node -> how many endpoints of the network it holds: who is in play for a network's events
    without reading each endpoint (kept with the sets, in COMMIT and DELETE)."""
    return global_key("epnetnodes", network_id)


def ctr_key(container: str, network_id: str) -> str:
    return global_key("epctr", container, network_id)


def ifnames_key(container: str) -> str:
    return global_key("epcif", container)


def macs_key(network_id: str) -> str:
    return global_key("epmac", network_id)


def idem_key(request_id: str) -> str:
    return global_key("epidem", request_id)


def attempts_key(request_id: str) -> str:
    return global_key("epatt", request_id)


def netep_key(network_id: str) -> str:
    """The network service's view of a network's endpoints (another slot)."""
    return key("netep", network_id)


def ports_key(node: str) -> str:
    return global_key("epports", node)


def port_claims(ports: Iterable[Any]) -> list[str]:
    """The claim fields of published ports (``PortMapping``-like: protocol, host_port):
    ``tcp/*/8080`` — every host address, both families (DNAT matches any local address)."""
    return sorted({f"{p.protocol}/*/{p.host_port}" for p in ports})


def claim_port(field: str) -> tuple[str, int]:
    proto, _, port = field.split("/")
    return proto, int(port)


def node_key(node: str) -> str:
    return global_key("node", node)


def node_info_key(node: str) -> str:
    return global_key("nodeinfo", node)


ATTEMPTS_TTL_S = 3600  # longer than any create's retries (mutation_retry_s, the wait for the node)

# KEYS: the request id's key, its attempts set; ARGV: this attempt's id, ttl ms. The id the
# request made, or (none yet) nil once this attempt's id is in the set: one step, so an attempt
# either sees the commit or is in the set the committing attempt reads after it.
BEGIN_ATTEMPT = Script("""
local v = redis.call('GET', KEYS[1])
if v then return v end
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return false
""")

# KEYS: the request id's key, its attempts set; ARGV: an id committed for it and removed again
# because the create did not happen after all (its namespace was missing). The request id is
# free again (if it still names that id): a repeat attaches anew.
FORGET_REQUEST = Script("""
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
redis.call('SREM', KEYS[2], ARGV[1])
return 1
""")

# KEYS: the attempts set; ARGV: the committed id. The set's other ids; the set is gone.
SETTLE_ATTEMPTS = Script("""
local ids = redis.call('SMEMBERS', KEYS[1])
redis.call('DEL', KEYS[1])
local out = {}
for _, i in ipairs(ids) do if i ~= ARGV[1] then out[#out + 1] = i end end
return out
""")

COMMIT = Script("""
local id = ARGV[1]
if ARGV[7] == '1' then
  local prev = redis.call('GET', KEYS[9])
  if prev then return {'dup_rid', prev} end
end
local prev = redis.call('GET', KEYS[5])
if prev then return {'dup_ctr', prev} end
if redis.call('EXISTS', KEYS[8]) == 1 and redis.call('SISMEMBER', KEYS[8], ARGV[5]) == 0 then
  return {'no_network'}
end
local mac = ARGV[4]
if mac ~= '' then
  local h = redis.call('HGET', KEYS[7], mac)
  if h then return {'mac_in_use', h} end
end
local claims = {}
for f in string.gmatch(ARGV[9] or '', '%S+') do
  local h = redis.call('HGET', KEYS[10], f)
  if h and h ~= id then return {'port_in_use', h, f} end
  claims[#claims + 1] = f
end
local ifname = ARGV[3]
if ifname == '-' then
  ifname = ''
elseif ifname == '' then
  local i = 0
  while redis.call('HEXISTS', KEYS[6], 'eth' .. i) == 1 do i = i + 1 end
  ifname = 'eth' .. i
else
  local h = redis.call('HGET', KEYS[6], ifname)
  if h then return {'ifname_in_use', h} end
end
local doc = string.gsub(ARGV[2], '@IFNAME@', ifname, 1)
redis.call('HSET', KEYS[1], 'doc', doc, 'node', ARGV[6], 'status', 'pending', 'reason', '', 'code', '',
           'at', '', 'ver', '0')
redis.call('SADD', KEYS[2], id)
redis.call('SADD', KEYS[3], id)
redis.call('SADD', KEYS[4], id)
redis.call('SET', KEYS[5], id)
if ifname ~= '' then redis.call('HSET', KEYS[6], ifname, id) end
if mac ~= '' then redis.call('HSET', KEYS[7], mac, id) end
if ARGV[7] == '1' then redis.call('SET', KEYS[9], id, 'PX', ARGV[8]) end
for _, f in ipairs(claims) do redis.call('HSET', KEYS[10], f, id) end
redis.call('HINCRBY', KEYS[11], ARGV[6], 1)
-- the nodes holding an endpoint of the network now, this one's included: read with the
-- commit, the endpoint service addresses the created event with them (no read of its own)
return {'ok', ifname, '', redis.call('HKEYS', KEYS[11])}
""")

DELETE = Script("""
local id = ARGV[1]
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local r = redis.call('HMGET', KEYS[1], 'doc', 'status', 'reason', 'code', 'at')
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], id)
redis.call('SREM', KEYS[3], id)
redis.call('SREM', KEYS[4], id)
if redis.call('GET', KEYS[5]) == id then redis.call('DEL', KEYS[5]) end
if ARGV[2] ~= '' and redis.call('HGET', KEYS[6], ARGV[2]) == id then redis.call('HDEL', KEYS[6], ARGV[2]) end
if ARGV[3] ~= '' and redis.call('HGET', KEYS[7], ARGV[3]) == id then redis.call('HDEL', KEYS[7], ARGV[3]) end
-- the host ports it held (as its record says: the claims of the stored doc, passed in)
for f in string.gmatch(ARGV[4] or '', '%S+') do
  if redis.call('HGET', KEYS[8], f) == id then redis.call('HDEL', KEYS[8], f) end
end
if redis.call('HINCRBY', KEYS[9], ARGV[5], -1) <= 0 then redis.call('HDEL', KEYS[9], ARGV[5]) end
return {r[1], r[2] or 'pending', r[3] or '', r[4] or '', r[5] or ''}
""")

# Labels / published ports of an existing endpoint. Optimistic: the caller read revision
# ARGV[2] and computed the new doc from it; another writer in between -> 'stale' (re-read,
# retry). The host-port claims move in the same step: new ones taken (a port another
# endpoint holds -> 'port_in_use'), the ones it no longer publishes released.
UPDATE = Script("""
local id = ARGV[1]
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing'} end
local rev = redis.call('HGET', KEYS[1], 'rev') or '0'
if rev ~= ARGV[2] then return {'stale', rev} end
local keep = {}
for f in string.gmatch(ARGV[5] or '', '%S+') do
  local h = redis.call('HGET', KEYS[2], f)
  if h and h ~= id then return {'port_in_use', h, f} end
  keep[f] = true
end
for f in string.gmatch(ARGV[4] or '', '%S+') do
  if not keep[f] and redis.call('HGET', KEYS[2], f) == id then redis.call('HDEL', KEYS[2], f) end
end
for f, _ in pairs(keep) do redis.call('HSET', KEYS[2], f, id) end
local nrev = tostring(tonumber(rev) + 1)
redis.call('HSET', KEYS[1], 'doc', ARGV[3], 'rev', nrev)
return {'ok', nrev}
""")

# Repair (GC) of one host-port claim: drop it only if it is still held by the id the caller
# read and that endpoint is gone or, at the revision read, does not publish it.
UNCLAIM = Script("""
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 and (redis.call('HGET', KEYS[2], 'rev') or '0') ~= ARGV[3] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
""")

# Versions are microseconds (a Lua number holds them exactly up to 2**53).
STATUS = Script("""
if redis.call('EXISTS', KEYS[1]) == 0 then return 'missing' end
if redis.call('HGET', KEYS[1], 'node') ~= ARGV[1] then return 'other_node' end
local v = tonumber(redis.call('HGET', KEYS[1], 'ver') or '0') or 0
if tonumber(ARGV[5]) <= v then return 'stale' end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'reason', ARGV[3], 'code', ARGV[4], 'ver', ARGV[5], 'at', ARGV[6])
return 'ok'
""")

# Repair (GC) of a missing claim: take it only while the endpoint still exists at the
# revision the caller read (a record deleted or updated meanwhile gets no stale claim).
CLAIM = Script("""
if redis.call('EXISTS', KEYS[2]) == 0 or (redis.call('HGET', KEYS[2], 'rev') or '0') ~= ARGV[3] then return 0 end
return redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
""")

SCRIPTS = (COMMIT, DELETE, STATUS, UPDATE, UNCLAIM, CLAIM, BEGIN_ATTEMPT, SETTLE_ATTEMPTS)


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


_info_decoder = msgspec.json.Decoder(EndpointInfo)
_node_decoder = msgspec.json.Decoder(NodeInfo)


def _from_hash(h: dict[Any, Any]) -> EndpointInfo | None:
    if not h:
        return None
    d = {_s(k): v for k, v in h.items()}
    if "doc" not in d:
        return None
    info = _info_decoder.decode(d["doc"])
    status = _s(d.get("status", b"pending")) or "pending"
    return msgspec.structs.replace(info, status=status, reason=_s(d.get("reason", b"")),
                                   status_code=_s(d.get("code", b"")), status_at=_s(d.get("at", b"")),
                                   revision=int(_s(d.get("rev", b"0")) or 0))


class CommitResult(msgspec.Struct):
    status: str  # ok | dup_rid | dup_ctr | no_network | mac_in_use | ifname_in_use | port_in_use
    value: str = ""  # ok: the interface name; otherwise the id named
    claim: str = ""  # port_in_use: the claim field ("tcp/*/8080")
    # ok: the nodes holding an endpoint of the network after this commit (read by the script)
    hosts: set[str] | None = None


class UpdateResult(msgspec.Struct):
    status: str  # ok | missing | stale | port_in_use
    value: str = ""  # ok: the new revision; stale: the current one; port_in_use: the holder
    claim: str = ""


class EndpointStore:
    """Typed calls on the endpoint records and the node registry (no validation here)."""

    def __init__(self, r: aioredis.Redis) -> None:
        self.r = r

    async def load(self) -> None:
        for s in SCRIPTS:
            await self.r.script_load(s.source)

    # -- records -------------------------------------------------------------------------
    async def get(self, ident: str) -> EndpointInfo | None:
        return _from_hash(await self.r.hgetall(rec_key(ident)))

    async def get_many(self, ids: Iterable[str]) -> list[EndpointInfo | None]:
        ids = list(ids)
        if not ids:
            return []
        async with self.r.pipeline(transaction=False) as p:
            for i in ids:
                p.hgetall(rec_key(i))
            rows = await p.execute()
        return [_from_hash(h) for h in rows]

    async def id_for_request(self, request_id: str) -> str | None:
        v = await self.r.get(idem_key(request_id))
        return None if v is None else _s(v)

    async def begin_attempt(self, request_id: str, ident: str) -> str | None:
        """The id the create with ``request_id`` made, or None after noting that this attempt
        allocates for ``ident`` (see :meth:`settle_attempts`)."""
        v = await BEGIN_ATTEMPT(self.r, [idem_key(request_id), attempts_key(request_id)],
                                [ident, int(ATTEMPTS_TTL_S * 1000)])
        return None if v is None else _s(v)

    async def attempt_done(self, request_id: str, ident: str) -> None:
        """An attempt that failed and released what it held is no one else's to release."""
        await self.r.srem(attempts_key(request_id), ident)

    async def forget_request(self, request_id: str, ident: str) -> None:
        """``ident`` was committed for ``request_id`` and removed again as never made: the
        request id is free for a repeat (only while it still names ``ident``)."""
        await FORGET_REQUEST(self.r, [idem_key(request_id), attempts_key(request_id)], [ident])

    async def settle_attempts(self, request_id: str, ident: str) -> list[str]:
        """After ``ident`` committed for ``request_id``: the ids other attempts of it noted. None
        of them can commit any more (the request id is taken), so what IPAM holds for them is
        to release, their process alive or not."""
        return sorted(_s(x) for x in await SETTLE_ATTEMPTS(self.r, [attempts_key(request_id)], [ident]))

    async def id_for_container(self, container: str, network_id: str) -> str | None:
        v = await self.r.get(ctr_key(container, network_id))
        return None if v is None else _s(v)

    async def mac_holder(self, network_id: str, mac: str) -> str | None:
        v = await self.r.hget(macs_key(network_id), mac)
        return None if v is None else _s(v)

    async def ifname_holder(self, container: str, ifname: str) -> str | None:
        v = await self.r.hget(ifnames_key(container), ifname)
        return None if v is None else _s(v)

    async def commit(self, info: EndpointInfo, *, auto_ifname: bool, request_id: str | None,
                     netep_first: bool = False) -> CommitResult:
        """Record ``info`` and its indexes unless the (container, network) or request id already
        made one, the MAC or interface name is taken, or the network was deleted meanwhile.

        ``netep_first``: add the id to the network service's ``netep`` set first, in the same
        round trip (one pipeline on one connection: Redis runs the SADD before the script, which
        is the order the module docstring asks for; an attach waited for two round trips)."""
        ifname_arg = NO_IFNAME if not info.interface_name and not auto_ifname else (
            "" if auto_ifname else info.interface_name)
        doc = info if not auto_ifname else msgspec.structs.replace(info, interface_name=IFNAME_PLACEHOLDER)
        keys = [rec_key(info.id), ENDPOINTS, node_set(info.node), net_set(info.network_id),
                ctr_key(info.container_id, info.network_id), ifnames_key(info.container_id),
                macs_key(info.network_id), NETWORKS, idem_key(request_id) if request_id else rec_key(info.id),
                ports_key(info.node), net_nodes_key(info.network_id)]
        args: list[Any] = [info.id, msgspec.json.encode(doc), ifname_arg, info.mac_address, info.network_id, info.node,
                "1" if request_id else "", int(IDEM_TTL_S * 1000), " ".join(port_claims(info.ports))]
        if netep_first:
            async with self.r.pipeline(transaction=False) as p:
                p.sadd(netep_key(info.network_id), info.id)
                p.evalsha(COMMIT.sha, len(keys), *keys, *args)
                added, res = await p.execute(raise_on_error=False)
            if isinstance(added, Exception):
                raise added
            if isinstance(res, NoScriptError):  # the server forgot the script: load it, run it again
                res = await COMMIT(self.r, keys, args)
            elif isinstance(res, Exception):
                raise res
        else:
            res = await COMMIT(self.r, keys, args)
        hosts = {_s(x) for x in res[3]} if len(res) > 3 and isinstance(res[3], list) else None
        return CommitResult(_s(res[0]), _s(res[1]) if len(res) > 1 else "", _s(res[2]) if len(res) > 2 else "",
                            hosts)

    async def update(self, before: EndpointInfo, after: EndpointInfo) -> UpdateResult:
        """Replace the stored doc of ``before`` (read at ``before.revision``) with ``after``,
        moving its host-port claims; ``stale`` when another writer got there first."""
        doc = msgspec.structs.replace(after, status="pending", reason="", status_code="", status_at="", revision=0)
        res = await UPDATE(self.r, [rec_key(before.id), ports_key(before.node)],
                           [before.id, str(before.revision), msgspec.json.encode(doc),
                            " ".join(port_claims(before.ports)), " ".join(port_claims(after.ports))])
        return UpdateResult(_s(res[0]), _s(res[1]) if len(res) > 1 else "", _s(res[2]) if len(res) > 2 else "")

    async def port_holders(self, node: str, ports: Iterable[Any] | None = None) -> dict[str, str]:
        """The host-port claims of ``node`` (claim field -> endpoint id): every one, or only
        those of ``ports`` (one read whatever the node's number of endpoints)."""
        if ports is None:
            raw: Any = await self.r.hgetall(ports_key(node))
            return {_s(k): _s(v) for k, v in raw.items()}
        fields = port_claims(ports)
        if not fields:
            return {}
        got: list[Any] = await self.r.hmget(ports_key(node), fields)
        return {f: _s(v) for f, v in zip(fields, got, strict=True) if v is not None}

    async def repair_port_claims(self, node: str) -> tuple[int, int]:
        """GC of ``node``'s host-port claims against the records: a claim whose endpoint is
        gone or no longer publishes the port is dropped; a port a record publishes with no
        claim (a record from before claims existed) is claimed, the first endpoint by id
        winning (the policy engine's rule). (dropped, added)."""
        eps = await self.of_node(node)
        held = await self.port_holders(node)
        by_id = {e.id: e for e in eps}
        dropped = added = 0
        for f, holder in sorted(held.items()):
            e = by_id.get(holder)
            if e is not None and f in port_claims(e.ports):
                continue
            rev = str(e.revision) if e is not None else "0"
            dropped += int(await UNCLAIM(self.r, [ports_key(node), rec_key(holder)], [f, holder, rev]))
        for e in sorted(eps, key=lambda x: x.id):
            for f in port_claims(e.ports):
                if f not in held:
                    added += int(await CLAIM(self.r, [ports_key(node), rec_key(e.id)], [f, e.id, str(e.revision)]))
        return dropped, added

    async def delete(self, info: EndpointInfo) -> EndpointInfo | None:
        """Remove the record and its indexes; the record as it was, or None if it was already gone."""
        keys = [rec_key(info.id), ENDPOINTS, node_set(info.node), net_set(info.network_id),
                ctr_key(info.container_id, info.network_id), ifnames_key(info.container_id),
                macs_key(info.network_id)]
        keys += [ports_key(info.node), net_nodes_key(info.network_id)]
        res = await DELETE(self.r, keys, [info.id, info.interface_name, info.mac_address,
                                          " ".join(port_claims(info.ports)), info.node])
        if not res:
            return None
        doc, status, reason, code, at = (_s(x) for x in res)
        old = _info_decoder.decode(doc)
        if old.ports != info.ports:  # an update moved its ports after ``info`` was read: those claims too
            await self._release_claims(old)
        return msgspec.structs.replace(old, status=status or "pending", reason=reason,
                                       status_code=code, status_at=at)

    async def set_status(self, ident: str, node: str, status: str, reason: str, code: str, version: int,
                         at: str) -> str:
        """Fold a node's report in: ``ok``, or why not (``missing``, ``other_node``, ``stale``)."""
        return _s(await STATUS(self.r, [rec_key(ident)], [node, status, reason, code, version, at]))

    async def ids(self, *, node: str | None = None, network_id: str | None = None,
                  container: str | None = None) -> list[str]:
        """Candidate ids for a listing, from the narrowest index given."""
        if node is not None:
            raw: Any = await self.r.smembers(node_set(node))
        elif network_id is not None:
            raw = await self.r.smembers(net_set(network_id))
        elif container is not None:
            raw = await self.r.hvals(ifnames_key(container))
            if not raw:  # host-driver endpoints have no interface: fall back to every endpoint
                raw = await self.r.smembers(ENDPOINTS)
        else:
            raw = await self.r.smembers(ENDPOINTS)
        return sorted({_s(x) for x in raw})

    async def nodes_of_networks(self, network_ids: Iterable[str]) -> set[str]:
        """The nodes holding an endpoint of any of these networks: one small hash per network,
        whatever its number of endpoints."""
        nids = sorted(set(network_ids))
        if not nids:
            return set()
        async with self.r.pipeline(transaction=False) as p:
            for nid in nids:
                p.hkeys(net_nodes_key(nid))
            got: list[Any] = await p.execute()
        return {_s(n) for keys in got for n in keys}

    async def of_network(self, network_id: str) -> list[str]:
        return sorted(_s(x) for x in await self.r.smembers(net_set(network_id)))

    async def ids_of_node(self, node: str) -> list[str]:
        return sorted(_s(x) for x in await self.r.smembers(node_set(node)))

    async def of_node(self, node: str) -> list[EndpointInfo]:
        ids = await self.ids_of_node(node)
        return [e for e in await self.get_many(ids) if e is not None]

    async def network_size(self, network_id: str) -> int:
        return int(await self.r.scard(net_set(network_id)))

    # -- the network service's set (another slot) --------------------------------------------
    async def netep_add(self, network_id: str, ident: str) -> None:
        await self.r.sadd(netep_key(network_id), ident)

    async def netep_remove(self, network_id: str, ident: str) -> None:
        await self.r.srem(netep_key(network_id), ident)

    async def _release_claims(self, old: EndpointInfo) -> None:
        # the record is gone, so any revision is "gone": UNCLAIM drops a claim still held by this id
        for f in port_claims(old.ports):
            await UNCLAIM(self.r, [ports_key(old.node), rec_key(old.id)], [f, old.id, "0"])

    # -- node registry ---------------------------------------------------------------------
    async def register_node(self, info: NodeInfo, ttl_s: float) -> tuple[NodeInfo, NodeInfo | None, int]:
        """Store a heartbeat; keeps ``registered_at`` of the same instance. Returns the record
        stored, the live registration it renewed (None: the node (re)joins) and the node's
        endpoint count: two round trips (a heartbeat of each of 1,000 nodes every 10 s is
        100 of these a second)."""
        live, kept = await self.r.mget([node_key(info.node), node_info_key(info.node)])
        was = _node_decoder.decode(live) if live is not None else None
        prev = was if was is not None else (_node_decoder.decode(kept) if kept is not None else None)
        if prev is not None and prev.instance == info.instance and prev.registered_at:
            info = msgspec.structs.replace(info, registered_at=prev.registered_at)
        body = msgspec.json.encode(info)
        async with self.r.pipeline(transaction=False) as p:
            p.set(node_key(info.node), body, px=max(1, int(ttl_s * 1000)))
            p.set(node_info_key(info.node), body, ex=NODE_INFO_KEEP_S)
            p.zadd(NODES, {info.node: info.last_seen})
            p.zremrangebyscore(NODES, "-inf", time.time() - NODE_INFO_KEEP_S)
            p.scard(node_set(info.node))
            res: list[Any] = await p.execute()
        return info, was, int(res[-1])

    async def node(self, node: str, *, include_gone: bool = False) -> NodeInfo | None:
        v: Any = await self.r.get(node_key(node))
        if v is not None:
            return _node_decoder.decode(v)
        if not include_gone:
            return None
        v = await self.r.get(node_info_key(node))
        if v is None:
            return None
        return msgspec.structs.replace(_node_decoder.decode(v), alive=False)

    async def count_seen_nodes(self, since: float) -> int:
        """Nodes whose last heartbeat came at or after ``since`` (seconds since the epoch)."""
        return int(await self.r.zcount(NODES, since, "+inf"))

    async def nodes(self, *, include_gone: bool = False, counts: bool = True) -> list[NodeInfo]:
        """Registered nodes (``alive`` or, with ``include_gone``, not); ``counts``: their endpoints."""
        names = sorted(_s(x) for x in await self.r.zrange(NODES, 0, -1))
        if not names:
            return []
        live = await self.r.mget([node_key(n) for n in names])
        old = await self.r.mget([node_info_key(n) for n in names]) if include_gone else [None] * len(names)
        sizes: list[Any] = [0] * len(names)
        if counts:
            async with self.r.pipeline(transaction=False) as p:
                for n in names:
                    p.scard(node_set(n))
                sizes = await p.execute()
        out: list[NodeInfo] = []
        for v, gone, count in zip(live, old, sizes, strict=True):
            if v is not None:
                out.append(msgspec.structs.replace(_node_decoder.decode(v), alive=True, endpoints=int(count)))
            elif gone is not None:
                out.append(msgspec.structs.replace(_node_decoder.decode(gone), alive=False, endpoints=int(count)))
        return out

    async def deregister_node(self, node: str, instance: str) -> NodeInfo | None:
        """Drop the live registration of ``node`` if it is still that ``instance``'s (its
        info stays for ``include_gone``); the registration removed, or ``None``."""
        v: Any = await self.r.get(node_key(node))
        if v is None:
            return None
        info = _node_decoder.decode(v)
        if info.instance != instance:
            return None
        await self.r.delete(node_key(node))
        return info

    async def node_ttls(self, names: list[str] | None = None) -> dict[str, tuple[float | None, float]]:
        """Nodes of the registry (every one, or those of ``names``): (seconds left of their
        registration, None once it expired; last heartbeat) — two round trips of integers, no
        record decoded, so a watch of 1,000 nodes stays cheap."""
        if names is None:
            got: Any = await self.r.zrange(NODES, 0, -1, withscores=True)
            pairs = [(_s(n), float(t)) for n, t in got]
        else:
            scores: Any = await self.r.zmscore(NODES, names) if names else []
            pairs = [(n, float(t)) for n, t in zip(names, scores, strict=True) if t is not None]
        if not pairs:
            return {}
        async with self.r.pipeline(transaction=False) as p:
            for n, _ in pairs:
                p.pttl(node_key(n))
            left: list[Any] = await p.execute()
        # PTTL: -2 the key is gone (expired: silent past its timeout), -1 no expiry (kept alive)
        return {n: (None if ms == -2 else (ms / 1000 if ms >= 0 else float("inf")), t)
                for (n, t), ms in zip(pairs, left, strict=True)}

    async def alive_nodes(self) -> list[str]:
        return [n.node for n in await self.nodes()]

    async def wg_address(self, node: str, mesh: str) -> str:
        """The node's address in the WireGuard mesh ``mesh`` (a CIDR), as ``"a.b.c.d/len"``:
        allocated once per node and kept (a restarted node gets the same one). The first
        candidate is derived from the node name, then the next ones; ``HSETNX`` on the
        address -> node hash makes it unique across endpoint service replicas."""
        net = ipaddress.ip_network(mesh, strict=False)
        by_node, by_addr = WG_BY_NODE, WG_BY_ADDR
        have: Any = await self.r.hget(by_node, node)
        if have is not None:
            return _s(have)
        hosts = net.num_addresses - 2 if net.num_addresses > 2 else net.num_addresses
        first = 1 if net.num_addresses > 2 else 0
        start = int.from_bytes(hashlib.sha256(node.encode()).digest()[:8], "big") % hosts
        for i in range(min(hosts, 1 + await self.r.hlen(by_addr))):
            cand = f"{net.network_address + first + (start + i) % hosts}/{net.prefixlen}"
            if await self.r.hsetnx(by_addr, cand, node) or _s(await self.r.hget(by_addr, cand)) == node:
                await self.r.hset(by_node, node, cand)
                return cand
        raise RuntimeError(f"the WireGuard mesh {mesh} has no free address left for node {node}")


def describe_holder(info: EndpointInfo | None, ident: str) -> str:
    """``endpoint ep1 (container web-1)`` for messages; the id alone when the record is gone."""
    if info is None:
        return f"endpoint {ident}"
    return f"endpoint {ident} (container {info.container_id})"

