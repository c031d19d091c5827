"""Redis adapter: connection from config, Lua scripts by SHA, hash-tagged key names."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    BusyLoadingError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.maint_notifications import MaintNotificationsConfig

from vnet.adapters.settings import RedisSettings
from vnet.core import errors as E

KEY_PREFIX = "vnet"


def key(kind: str, tag: str, *parts: str) -> str:
    """``vnet:{<kind>:<tag>}:part...`` — the braces are a Redis Cluster hash tag, so
    every key of one object (a pool's bitmap, cursor and owners) lands in one slot
    and a Lua script may touch them together."""
    suffix = ":".join(parts)
    base = f"{KEY_PREFIX}:{{{kind}:{tag}}}"
    return f"{base}:{suffix}" if suffix else base


def global_key(*parts: str) -> str:
    """Keys of cluster-wide indexes share one tag so scripts can update them atomically."""
    return key("global", "idx", *parts)


# Commands that only read: sending one again after its connection broke cannot change
# anything, so :class:`_Redis` retries them once on a fresh connection.
_READ_COMMANDS = frozenset({
    "GET", "MGET", "STRLEN", "GETRANGE", "EXISTS", "TYPE", "TTL", "PTTL", "PING", "TIME", "DBSIZE", "INFO",
    "HGET", "HMGET", "HGETALL", "HKEYS", "HVALS", "HLEN", "HEXISTS", "HSCAN",
    "SMEMBERS", "SISMEMBER", "SMISMEMBER", "SCARD", "SSCAN", "SRANDMEMBER",
    "ZRANGE", "ZREVRANGE", "ZRANGEBYLEX", "ZREVRANGEBYLEX", "ZRANGEBYSCORE", "ZREVRANGEBYSCORE", "ZSCORE",
    "ZMSCORE", "ZCARD", "ZCOUNT", "ZLEXCOUNT", "ZRANK", "ZSCAN", "LRANGE", "LLEN", "LINDEX",
    "GETBIT", "BITCOUNT", "BITPOS", "SCAN", "KEYS", "XLEN", "XRANGE", "EVALSHA_RO",
})
# SHAs of the scripts made with ``Script(..., readonly=True)`` (their EVALSHA is a read too).
_READONLY_SHAS: set[str] = set()


class Script:
    """A Lua script loaded once and called by SHA (reloaded if the server forgot it).

    ``readonly``: the script writes nothing, so a call whose connection broke may be sent
    again (:class:`_Redis`); say so only for scripts that call no writing command."""

    def __init__(self, source: str, *, readonly: bool = False) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        self.readonly = readonly
        if readonly:
            _READONLY_SHAS.add(self.sha)

    async def __call__(self, r: aioredis.Redis, keys: list[str], args: list[Any]) -> Any:
        try:
            return await r.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await r.script_load(self.source)
            return await r.evalsha(self.sha, len(keys), *keys, *args)


def _retry_safe(args: tuple[Any, ...]) -> bool:
    """True when sending this command again cannot change anything (a read)."""
    if not args:
        return False
    name = args[0].upper() if isinstance(args[0], str) else bytes(args[0]).decode().upper()
    if name == "EVALSHA":
        sha = args[1] if len(args) > 1 else ""
        return (sha.decode() if isinstance(sha, bytes) else str(sha)) in _READONLY_SHAS
    return name in _READ_COMMANDS


class _Redis(aioredis.Redis):
    """A client that sends a read once more when its pooled connection turns out dead.

    After a Redis restart every pooled connection is dead, and the first command on each
    failed with "Connection closed by server": the first reads after a restart answered 503.
    A write is still not retried (it may have run before the connection broke: see
    :func:`connect`), but a read may be, and its second try runs on a new connection
    (redis-py dropped the dead one; the pool checks the others before handing them out)."""

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        # redis-py leaves execute_command unannotated, so strict mypy refuses the call without this
        send = cast(Callable[..., Awaitable[Any]], super().execute_command)
        try:
            return await send(*args, **options)
        except RedisConnectionError as exc:
            # Not: a full pool (waited already), a loading server (as busy a moment later), a
            # timeout (a frozen server: a second try would double the wait), or a write.
            if isinstance(exc, BusyLoadingError) or "No connection available" in str(exc) or not _retry_safe(args):
                raise
            return await send(*args, **options)


def connect(config: RedisSettings, *, max_connections: int | None = None) -> aioredis.Redis:
    """A client whose pool blocks instead of failing when every connection is in use.

    The plain pool raises ``MaxConnectionsError`` at 100 connections while a service runs
    ``max_inflight`` (256) handlers at once, so a burst turned into 500s. This pool holds
    ``redis_max_connections`` (default: ``max_inflight``) and a handler waits for a free
    connection at most ``redis_timeout_s``. Every command has the same socket timeout, so a
    frozen server (SIGSTOP) fails a request within that time instead of holding it.

    Writes are not retried here: a command whose connection broke after it was sent may
    have run, and sending it again could run a script twice (a network create's script sent
    twice answers "duplicate", and the network service then rolls back the pools of the
    network it did create). The caller gets 503 and retries the whole request with its
    request_id. Reads are retried once (:class:`_Redis`).

    Stale connections after a Redis restart: the pool checks a connection before handing
    it out (data or EOF waiting on it: reconnect), but redis-py 8 skips that check while
    "maintenance notifications" are on, which is their default ("auto", a Redis Enterprise
    feature Valkey does not send); they are off here, so a connection whose server went
    away is replaced before a command is written to it — a write after a restart runs on a
    live connection too. What the check cannot see (the server died while the connection
    sat in the pool and its EOF has not been read yet) costs a read nothing (retried) and a
    write one 503.
    """
    size = max_connections or config.redis_max_connections or config.max_inflight
    if config.redis_sentinels:
        return _sentinel_client(config, size)
    pool = aioredis.BlockingConnectionPool.from_url(
        config.redis_url,
        max_connections=size,
        timeout=config.redis_timeout_s,
        username=config.redis_username,
        password=config.redis_password,
        decode_responses=False,
        socket_connect_timeout=config.redis_timeout_s,
        socket_timeout=config.redis_timeout_s,
        health_check_interval=10,
        retry=Retry(NoBackoff(), 0),
        maint_notifications_config=MaintNotificationsConfig(enabled=False),
    )
    return _Redis.from_pool(pool)


def sentinel_addresses(spec: str) -> list[tuple[str, int]]:
    """``"h1:26379,h2:26380"`` -> ``[("h1", 26379), ("h2", 26380)]``."""
    out: list[tuple[str, int]] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        host, sep, port = part.rpartition(":")
        if not sep or not port.isdigit():
            raise E.make(E.INVALID_CONFIG, f"redis_sentinels entry {part!r} is not host:port")
        out.append((host.strip("[]"), int(port)))
    if not out:
        raise E.make(E.INVALID_CONFIG, "redis_sentinels names no sentinel")
    return out


def _sentinel_client(config: RedisSettings, size: int) -> aioredis.Redis:
    """A client of whichever server the Sentinels call the primary of ``redis_sentinel_service``.

    redis-py's SentinelConnectionPool asks the Sentinels for the primary when it opens a
    connection, so after a failover the next connection goes to the promoted replica; a
    connection to the old primary that survived (a demoted server answers READONLY) is
    dropped by the pool. Requests in flight at the failover fail with 503 (nothing is retried
    here, as with one server) and the caller retries with its request_id. The pool does not
    block when full; it holds ``size`` connections, one per concurrently running handler.
    """
    from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

    db = urlsplit(config.redis_url).path.lstrip("/") or "0"
    common: dict[str, Any] = dict(socket_connect_timeout=config.redis_timeout_s,
                                  socket_timeout=config.redis_timeout_s)
    # redis-py leaves Sentinel.__init__ unannotated, so strict mypy refuses the call without this
    sentinel = Sentinel(sentinel_addresses(config.redis_sentinels or ""), sentinel_kwargs=dict(common),  # type: ignore[no-untyped-call]
                        username=config.redis_username, password=config.redis_password,
                        db=int(db) if db.isdigit() else 0, decode_responses=False,
                        health_check_interval=10, retry=Retry(NoBackoff(), 0), **common)
    client: aioredis.Redis = sentinel.master_for(config.redis_sentinel_service, redis_class=_Redis,
                                                 connection_pool_class=SentinelConnectionPool, max_connections=size)
    return client


def safe_url(url: str) -> str:
    """``url`` without its password, fit for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


# Server replies that mean "the store cannot serve now", not "the command was wrong".
_UNAVAILABLE_REPLIES = ("LOADING", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "READONLY", "OOM", "MISCONF", "BUSY")


def dependency_error(exc: BaseException, url: str) -> E.VNetError | None:
    """The ``unavailable`` error for a Redis failure that is the store's, not ours; else None.

    Connection refused or reset, a socket or pool timeout, LOADING, READONLY, OOM and the
    like are the store's state: the caller should retry later. A script error or a wrong
    type is a bug on our side and stays ``internal``.
    """
    where = safe_url(url)
    what: str | None = None
    if isinstance(exc, BusyLoadingError):
        what = "is loading its data set into memory"
    elif isinstance(exc, RedisTimeoutError):
        what = "did not answer in time (frozen or overloaded?)"
    elif isinstance(exc, RedisConnectionError):
        text = str(exc)
        what = ("has no free connection in this instance's pool in time (overloaded)"
                if "No connection available" in text else f"cannot be reached ({text or type(exc).__name__})")
    elif isinstance(exc, ResponseError) and not isinstance(exc, NoScriptError):
        first = str(exc).split(" ", 1)[0].upper()
        if first in _UNAVAILABLE_REPLIES or isinstance(exc, (ReadOnlyError, OutOfMemoryError)):
            what = f"refused the command: {exc}"
    elif isinstance(exc, OSError):
        # Raised from inside the client's socket code without being wrapped.
        what = f"cannot be reached ({exc or type(exc).__name__})"
    if what is None:
        return None
    return E.make(E.UNAVAILABLE, f"Redis at {where} {what}; retry later (the same request_id is safe to "
                  "retry)", dependency="redis", url=where)


async def ping(r: aioredis.Redis, url: str) -> None:
    try:
        await r.ping()
    except (RedisError, OSError) as exc:
        raise E.make(E.UNAVAILABLE, f"cannot reach Redis at {safe_url(url)}: {exc}; is it running? "
                     "(`vnetctl up` starts one)", url=safe_url(url)) from None


async def load_scripts(r: aioredis.Redis, *scripts: Script) -> None:
    for s in scripts:
        await r.script_load(s.source)
