"""The Redis client of a long-running process: a bounded pool that waits rather than fails."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

CONNECTIONS = 50
"""Connections one client keeps: Redis answers each command in well under a millisecond, so
more would only add sockets, not throughput."""
WAIT = 5.0
"""Seconds a command waits for a free connection before it fails as Redis being unavailable."""
RETRIES = 3
"""Times a command is sent again on a fresh connection after its connection failed: a
restarted Redis leaves every pooled connection closed, and without a retry each one's next
command would fail once, as if Redis were still down (jobs then served unclaimed)."""


def pooled_redis(url: str) -> aioredis.Redis:
    """A client whose commands wait for one of ``CONNECTIONS`` connections; closing it closes
    the pool.

    redis-py's default pool raises MaxConnectionsError past 100 commands at once, which a
    worker holding hundreds of jobs reaches as soon as they arrive together.
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=CONNECTIONS,
        timeout=WAIT,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.01), RETRIES),
    )
    return aioredis.Redis.from_pool(pool)
