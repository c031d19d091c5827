"""What the ``test_ipam_*.py`` modules share: the ``rds`` fixture (a Redis client on the
session's valkey) and ``_register_network`` (puts networks in the index IPAM's GC consults).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from vnet.adapters import ipam_store
from vnet.runtime.config import VNetConfig


@pytest.fixture
async def rds(config: VNetConfig) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.Redis.from_url(config.redis_url)
    yield r
    await r.aclose()


# --- helpers for the service tests ---------------------------------------------------------


async def _register_network(r: aioredis.Redis, *nids: str) -> None:
    await r.sadd(ipam_store.NETWORKS_INDEX, *nids)
