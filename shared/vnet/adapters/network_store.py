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
    vnet:{global:idx}:netidem:<request_id>     STRING result of an idempotent request (24 h), or its
                                               pending claim while it runs (adapters/idempotency.py)
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

The scripts themselves are in :mod:`vnet.adapters.network_lua`.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgspec
import redis.asyncio as aioredis

from vnet.adapters.network_lua import (
    ALL_SCRIPTS,
    CONNECT,
    CREATE,
    DELETE,
    GET,
    LIST,
    MESH_CREATE,
    MESH_DELETE,
    MESH_GET,
    MESH_MEMBER,
    UNLOCK,
    UPDATE,
)
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
        raw = await self._run(GET, *refs)
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

    async def index_count(self, family: int, scope: str, from_hex: str, end_hex: str) -> int:
        """How many index members have a first address in ``[from_hex, end_hex]``."""
        return int(await self.r.zlexcount(self.k("netcidx", str(family), scope), f"[{from_hex}", f"({end_hex};"))

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
        raw = await self._run(LIST, cursor or "", limit, budget, json.dumps(labels) if labels else "{}",
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
        raw = await self._run(CREATE, doc.id, doc.name, _encoder.encode(doc), max_networks, scope, m4,
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
        raw = await self._run(UPDATE, ident, "" if labels is None else json.dumps(labels),
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
        raw = await self._run(DELETE, ident, now)
        if _s(raw[0]) != "ok":
            return None
        net = _view(raw[1])
        assert net is not None
        return Deleted(network=net, children=list(net.children))

    async def connect(self, a: str, b: str, *, on: bool) -> tuple[str, bool, VirtualNetwork | None,
                                                                   VirtualNetwork | None]:
        raw = await self._run(CONNECT, a, b, "1" if on else "0")
        if _s(raw[0]) != "ok":
            return _s(raw[1]), False, None, None
        return "", _s(raw[1]) == "1", _view(raw[2]), _view(raw[3])

    async def mesh_create(self, name: str, members: list[str], now: str) -> tuple[str, Mesh | str | None]:
        raw = await self._run(MESH_CREATE, name, now, *members)
        status = _s(raw[0])
        if status == "missing":
            return status, _s(raw[1])
        return status, _mesh(raw[1])

    async def mesh_member(self, name: str, ident: str, *, add: bool) -> tuple[str, bool, Mesh | None]:
        raw = await self._run(MESH_MEMBER, name, ident, "1" if add else "0")
        status = _s(raw[0])
        if status != "ok":
            return status, False, None
        return status, _s(raw[1]) == "1", _mesh(raw[2])

    async def mesh_delete(self, name: str) -> Mesh | None:
        raw = await self._run(MESH_DELETE, name)
        return _mesh(raw[1]) if _s(raw[0]) == "ok" else None

    async def mesh_names(self, after: str | None = None, count: int | None = None) -> list[str]:
        """Mesh names in order, those after ``after`` only, at most ``count``."""
        names = sorted(_s(x) for x in await self.r.hkeys(self.k("netmeshes")))
        if after is not None:
            names = [n for n in names if n > after]
        return names if count is None else names[:count]

    async def meshes(self, names: list[str] | None = None) -> list[Mesh]:
        raw = await self._run(MESH_GET, *(names or []))
        return sorted((m for m in (_mesh(x) for x in raw) if m is not None), key=lambda m: m.name)

    # -- idempotency (ops other than create, whose script checks it atomically) ---------------
    async def idem_get(self, request_id: str) -> bytes | None:
        v = await self.r.get(self.k("netidem", request_id))
        if v is None:
            return None
        return v if isinstance(v, bytes) else str(v).encode()

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

    async def host_routes(self, after: str | None = None,
                          count: int | None = None) -> dict[str, tuple[list[str], float]]:
        """Live reports: node -> (prefixes, seconds until it expires); with ``after`` /
        ``count``: the first ``count`` nodes in name order after ``after``."""
        now = time.time()
        nodes = await self.r.zrangebyscore(self.k("nethostroutes", "nodes"), now, "+inf", withscores=True)
        if not nodes:
            return {}
        entries: list[tuple[str, float]] = sorted((_s(item[0]), float(item[1])) for item in nodes)
        if after is not None:
            entries = [e for e in entries if e[0] > after]
        if count is not None:
            entries = entries[:count]
        if not entries:
            return {}
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
        await UNLOCK(self.r, [self.k("netlock", name)], [token])
