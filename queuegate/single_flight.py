"""One call under way per key, its answer shared by every caller that asks meanwhile.

A burst of callers asking the same thing at once (5,000 jobs delivered together asking whether
their one reply queue exists; a live key's burst of requests) would each make the call: past
the broker's 2,047 channels a connection, or PostgreSQL's connections. Here the first asks and
the others await its answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from functools import partial
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    """``await flight(key, call)``: ``call()``'s answer, or that of the call already under way
    for ``key``; its exception, raised to each caller alike."""

    def __init__(self) -> None:
        self._running: dict[K, asyncio.Future[V]] = {}

    async def __call__(self, key: K, call: Callable[[], Awaitable[V]]) -> V:
        running = self._running.get(key)
        if running is None:
            running = self._running[key] = asyncio.ensure_future(call())
            running.add_done_callback(partial(self._ended, key))
        # Shielded: one caller cancelled while it waits must not cancel the others' answer.
        return await asyncio.shield(running)

    def _ended(self, key: K, running: asyncio.Future[V]) -> None:
        del self._running[key]
        if not running.cancelled():
            # Retrieved here: every caller that waited raised it, and a call whose callers
            # were all cancelled meanwhile is not reported as an exception never retrieved.
            running.exception()
