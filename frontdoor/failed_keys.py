"""A bound on the wrong keys one client may present: each one costs a PostgreSQL lookup.

Counted per client address in Redis, under the deployment's namespace, so every front-door
process shares the count: past ``limit`` failed lookups in a window of ``window`` seconds,
the client's lookups are refused (``Throttled``, with the seconds left of the window) before
they reach PostgreSQL, until the window ends. Only failures count; a known key found in
``KeyBook``'s copy asks nothing of Redis. The API routes and the dashboard's sign-in share it
through ``KeyBook.owner``.

Behind a proxy the client is the address it forwards (``X-Forwarded-For``), when the proxy's
address is trusted (uvicorn's ``--forwarded-allow-ips``, ``FORWARDED_ALLOW_IPS``; loopback by
default).

Best effort: while Redis is unreachable, or does not answer within ``WAIT`` (a frozen
Redis neither answers nor refuses), nothing is counted and no one is refused, so an outage
of Redis does not lock every caller out nor hold their requests.
"""

from __future__ import annotations

import asyncio
import logging
import math

import redis.asyncio as aioredis
from fastapi import Request
from redis.exceptions import RedisError

from queuegate.keys import Keys
from queuegate.outage import OutageLog

log = logging.getLogger(__name__)

WAIT = 1.0
"""Seconds a count is waited for: Redis answers in well under a millisecond, and a caller's
deadline has only begun."""


class Throttled(Exception):
    """Too many wrong keys from this client: none is looked up for ``retry_after`` seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"too many wrong keys: retry in {math.ceil(retry_after)} s")
        self.retry_after = retry_after


class FailedKeys:
    """Failed key lookups per client, ``limit`` per window of ``window`` seconds."""

    def __init__(self, client: aioredis.Redis, keys: Keys, *, limit: int, window: float) -> None:
        self._client = client
        self._keys = keys
        self._limit = limit
        self._window_ms = max(1, round(window * 1000))
        self._outage = OutageLog(log, "Redis", "wrong keys are not counted")

    async def check(self, who: str) -> None:
        """Throttled when ``who`` has used up its failures for the window."""
        key = self._keys.failed_keys(who)
        try:
            async with asyncio.timeout(WAIT), self._client.pipeline(transaction=False) as pipe:
                pipe.get(key)
                pipe.pttl(key)
                count, left = await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            self._outage.failed(exc)
            return
        self._outage.recovered()
        if count is not None and int(count) >= self._limit:
            # Not positive when the count expired between the two reads.
            raise Throttled(left / 1000 if left > 0 else 1.0)

    async def failed(self, who: str) -> None:
        """Count a failed lookup of ``who``; the window starts with its first."""
        key = self._keys.failed_keys(who)
        try:
            async with asyncio.timeout(WAIT), self._client.pipeline(transaction=True) as pipe:
                pipe.incr(key)
                pipe.pexpire(key, self._window_ms, nx=True)
                await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            self._outage.failed(exc)
            return
        self._outage.recovered()


def client_of(request: Request) -> str:
    """Whom a request's failures are counted against: its client's address."""
    return request.client.host if request.client is not None else "unknown"


__all__ = ["FailedKeys", "Throttled", "client_of"]
