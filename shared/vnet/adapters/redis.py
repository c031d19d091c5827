"""Redis adapter: connection from config, Lua scripts by SHA, hash-tagged key names."""

from __future__ import annotations

import hashlib
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

from vnet.core import errors as E
from vnet.runtime.config import VNetConfig

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


class Script:
    """A Lua script loaded once and called by SHA (reloaded if the server forgot it)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, r: aioredis.Redis, keys: list[str], args: list[Any]) -> Any:
        try:
            return await r.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await r.script_load(self.source)
            return await r.evalsha(self.sha, len(keys), *keys, *args)


def connect(config: VNetConfig) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        config.redis_url,
        username=config.redis_username,
        password=config.redis_password,
        decode_responses=False,
        socket_connect_timeout=2.0,
        socket_timeout=5.0,
        health_check_interval=10,
        retry_on_timeout=True,
    )


async def ping(r: aioredis.Redis, url: str) -> None:
    try:
        await r.ping()
    except (RedisError, OSError) as exc:
        raise E.make(E.UNAVAILABLE, f"cannot reach Redis at {url}: {exc}; is it running? "
                     "(`vnetctl up` starts one)", url=url) from None


async def load_scripts(r: aioredis.Redis, *scripts: Script) -> None:
    for s in scripts:
        await r.script_load(s.source)
