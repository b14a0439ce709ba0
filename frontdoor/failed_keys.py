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
import contextlib
import ipaddress
import logging
import math
from collections.abc import AsyncIterator

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
        self._looking: dict[str, dict[str | None, int]] = {}
        """Client → the keys this process looks up for it now → requests waiting for each."""

    @contextlib.asynccontextmanager
    async def looking_up(self, who: str, key_hash: str | None) -> AsyncIterator[None]:
        """Around the lookup of a key ``who`` presents (and its ``failed``): Throttled first
        when its failures for the window, with the other keys this process looks up for it
        meanwhile, are used up, unless the key of ``key_hash`` (None: not shaped like a key)
        was found live. Those in flight count: counted only once failed, wrong keys sent all
        at once were each looked up (200 at once, 200 lookups). A key already being looked
        up for it adds none (a live key's burst of requests at once is not a flood)."""
        looking = self._looking.setdefault(who, {})
        ahead = 0 if key_hash in looking else len(looking)
        looking[key_hash] = looking.get(key_hash, 0) + 1
        try:
            await self._check(who, key_hash, ahead)
            yield
        finally:
            if looking[key_hash] > 1:
                looking[key_hash] -= 1
            else:
                del looking[key_hash]
            if not looking:
                del self._looking[who]

    async def _check(self, who: str, key_hash: str | None, ahead: int) -> None:
        count_key = self._keys.failed_keys(who)
        try:
            async with asyncio.timeout(WAIT), self._client.pipeline(transaction=False) as pipe:
                pipe.get(count_key)
                pipe.pttl(count_key)
                if key_hash is not None:
                    pipe.exists(self._keys.proven_key(key_hash))
                count, left, *proven = await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            self._outage.failed(exc)
            return
        self._outage.recovered()
        if int(count or 0) + ahead >= self._limit and not any(proven):
            # Not positive when the count expired between the two reads.
            raise Throttled(left / 1000 if left > 0 else 1.0)

    async def failed(self, who: str, key_hash: str | None) -> None:
        """Count a failed lookup of ``who``; the window starts with its first. The key, if
        it was found live once, is so no longer (revoked, its team disabled)."""
        try:
            async with asyncio.timeout(WAIT), self._client.pipeline(transaction=True) as pipe:
                pipe.incr(self._keys.failed_keys(who))
                pipe.pexpire(self._keys.failed_keys(who), self._window_ms, nx=True)
                if key_hash is not None:
                    pipe.delete(self._keys.proven_key(key_hash))
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

    def proven(self, key_hash: str) -> None:
        """Record the key of ``key_hash`` found live, in the background: its request waits
        for PostgreSQL's answer only, never for Redis."""
        task = asyncio.create_task(self._prove(key_hash))
        self._recording.add(task)
        task.add_done_callback(self._recording.discard)

    async def _prove(self, key_hash: str) -> None:
        try:
            async with asyncio.timeout(WAIT):
                await self._client.set(self._keys.proven_key(key_hash), 1, ex=PROVEN_FOR)
        except (RedisError, OSError, TimeoutError) as exc:
            self._outage.failed(exc)
            return
        self._outage.recovered()


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
