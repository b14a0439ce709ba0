"""The pooled Redis client: commands past its connections wait for one instead of failing."""

from __future__ import annotations

import asyncio

from queuegate.redis_client import CONNECTIONS, pooled_redis
from queuegate.settings import Settings


async def test_more_commands_at_once_than_connections_all_succeed(settings: Settings) -> None:
    # More than redis-py's default pool allows (100), which raised MaxConnectionsError.
    at_once = 4 * CONNECTIONS
    key = f"{settings.redis_prefix}:pooled"
    client = pooled_redis(settings.redis_url)
    try:
        await client.set(key, "v", ex=60)
        values = await asyncio.gather(*(client.get(key) for _ in range(at_once)))
    finally:
        await client.delete(key)
        await client.aclose()
    assert values == [b"v"] * at_once
