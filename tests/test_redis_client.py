"""The pooled Redis client: commands past its connections wait for one instead of failing."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from queuegate.redis_client import CONNECTIONS, redis_for
from queuegate.settings import Settings


async def test_more_commands_at_once_than_connections_all_succeed(settings: Settings) -> None:
    # More than redis-py's default pool allows (100), which raised MaxConnectionsError.
    at_once = 4 * CONNECTIONS
    key = f"{settings.redis_prefix}:pooled"
    client = redis_for(settings)
    try:
        await client.set(key, "v", ex=60)
        values = await asyncio.gather(*(client.get(key) for _ in range(at_once)))
    finally:
        await client.delete(key)
        await client.aclose()
    assert values == [b"v"] * at_once


def test_sentinels_are_host_port_pairs_and_a_bad_one_is_named() -> None:
    listed = Settings(redis_sentinels="sentinel-1:26379, [::1]:26380")
    assert listed.sentinel_addresses == [("sentinel-1", 26379), ("::1", 26380)]
    with pytest.raises(ValidationError, match="'sentinel-2' is not host:port"):
        Settings(redis_sentinels="sentinel-1:26379,sentinel-2")
