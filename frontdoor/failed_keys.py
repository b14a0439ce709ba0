"""A bound on the wrong keys one client may present: each one costs a PostgreSQL lookup.

Counted per client address in Redis, under the deployment's namespace, so every front-door
process shares the count: past ``limit`` failed lookups in a window of ``window`` seconds,
the client's lookups of keys not known live are refused (``Throttled``, with the seconds
left of the window) before they reach PostgreSQL, until the window ends. Only failures
count; a known key found in ``KeyBook``'s copy asks nothing of Redis. The API routes and the
dashboard's sign-in share it through ``KeyBook.owner``.

A lockout never refuses a key the front door has found live (``proven``, by its hash, for
``PROVEN_FOR``): an address is a NAT's or a proxy's, shared by many teams, and one attacker
behind it failing on purpose must not deny them service. So a locked-out address still has
its teams' keys looked up, which costs PostgreSQL only what those keys cost anyway (their
answer is cached), while guesses, which are never proven, are refused unlooked-up. A live
key that the front door has not served within ``PROVEN_FOR`` (a new key, say), presented
first from an address locked out, waits for the window like a guess.

The client is the address the connection comes from, or the one a trusted proxy forwards
(``X-Forwarded-For``, read by uvicorn from ``QUEUEGATE_HTTP_TRUSTED_PROXIES`` only: see
``frontdoor.serve``).

Best effort: while Redis is unreachable, or does not answer within ``WAIT`` (a frozen
Redis neither answers nor refuses), nothing is counted and no one is refused, so an outage
of Redis does not lock every caller out nor hold their requests; a key found live is
recorded so in the background, never holding its request.
"""

from __future__ import annotations

import asyncio
import ipaddress
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


PROVEN_FOR = 30 * 86_400
"""Seconds a key found live is let through a lockout after it was last looked up (each
front-door process looks a key in use up every ``security_cache_ttl``)."""


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
        self._recording: set[asyncio.Task[None]] = set()

    async def check(self, who: str, key_hash: str | None) -> bool:
        """Take one of ``who``'s lookups for the window, before the lookup: Throttled when it
        has used them up, unless the key of ``key_hash`` (None: not shaped like a key) was
        found live (then nothing is taken). Whether one was taken, to give back if the key
        is found live (``proven``). Taken first and counted in one step, as many lookups at
        once as the limit allows: checked first and counted after each failed, a burst of
        wrong keys sent together was looked up whole."""
        count_key = self._keys.failed_keys(who)
        try:
            async with asyncio.timeout(WAIT), self._client.pipeline(transaction=True) as pipe:
                if key_hash is not None:
                    pipe.exists(self._keys.proven_key(key_hash))
                pipe.incr(count_key)
                pipe.pexpire(count_key, self._window_ms, nx=True)
                pipe.pttl(count_key)
                *proven, count, _, left = await pipe.execute()
            if any(proven):
                async with asyncio.timeout(WAIT):
                    await self._client.decr(count_key)
                return False
        except (RedisError, OSError, TimeoutError) as exc:
            self._outage.failed(exc)
            return False
        self._outage.recovered()
        if int(count) > self._limit:
            # Not positive when the count expired between the two reads.
            raise Throttled(left / 1000 if left > 0 else 1.0)
        return True

    async def failed(self, key_hash: str | None) -> None:
        """A lookup found no live key: the key, if it was found live once, is so no longer
        (revoked, its team disabled). Its lookup was counted by ``check``."""
        if key_hash is None:
            return
        try:
            async with asyncio.timeout(WAIT):
                await self._client.delete(self._keys.proven_key(key_hash))
        except (RedisError, OSError, TimeoutError) as exc:
            self._outage.failed(exc)
            return
        self._outage.recovered()

    async def give_back(self, who: str | None) -> None:
        """Give back the lookup ``check`` took of ``who`` (None: it took none), for a key
        that was no guess (its team disabled) or was not looked up (PostgreSQL failed)."""
        if who is None:
            return
        try:
            async with asyncio.timeout(WAIT):
                await self._client.decr(self._keys.failed_keys(who))
        except (RedisError, OSError, TimeoutError) as exc:
            self._outage.failed(exc)
            return
        self._outage.recovered()

    def proven(self, key_hash: str, taken_from: str | None) -> None:
        """Record the key of ``key_hash`` found live, and give back the lookup ``check`` took
        of ``taken_from`` (None: it took none), in the background: its request waits for
        PostgreSQL's answer only, never for Redis."""
        task = asyncio.create_task(self._prove(key_hash, taken_from))
        self._recording.add(task)
        task.add_done_callback(self._recording.discard)

    async def _prove(self, key_hash: str, taken_from: str | None) -> None:
        try:
            async with asyncio.timeout(WAIT), self._client.pipeline(transaction=False) as pipe:
                pipe.set(self._keys.proven_key(key_hash), 1, ex=PROVEN_FOR)
                if taken_from is not None:
                    pipe.decr(self._keys.failed_keys(taken_from))
                await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            self._outage.failed(exc)
            return
        self._outage.recovered()

    async def aclose(self) -> None:
        """Wait for the records still on their way (each within ``WAIT``), before Redis's
        client closes under them."""
        if self._recording:
            await asyncio.gather(*self._recording, return_exceptions=True)


def client_of(request: Request) -> str:
    """Whom a request's failures are counted against: its client's address, an IPv4 one as
    such however it came (``::ffff:10.0.0.5`` on a listener on ``::``), an IPv6 one by its
    /64, which one host usually holds whole (counted per address, it had as many tries as
    addresses)."""
    if request.client is None:
        return "unknown"
    try:
        address = ipaddress.ip_address(request.client.host)
    except ValueError:
        return request.client.host  # not an address (a Unix socket's peer): as it is
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


__all__ = ["PROVEN_FOR", "FailedKeys", "Throttled", "client_of"]
