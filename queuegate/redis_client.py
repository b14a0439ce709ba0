"""The Redis client of a long-running process: a bounded pool that waits rather than fails."""

from __future__ import annotations

import redis.asyncio as aioredis

CONNECTIONS = 50
"""Connections one client keeps: Redis answers each command in well under a millisecond, so
more would only add sockets, not throughput."""
WAIT = 5.0
"""Seconds a command waits for a free connection before it fails as Redis being unavailable."""


def pooled_redis(url: str) -> aioredis.Redis:
    """A client whose commands wait for one of ``CONNECTIONS`` connections; closing it closes
    the pool.

    redis-py's default pool raises MaxConnectionsError past 100 commands at once, which a
    worker holding hundreds of jobs reaches as soon as they arrive together.
    """
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=CONNECTIONS, timeout=WAIT)
    return aioredis.Redis.from_pool(pool)
