"""Where a worker's jobs wait their turn for the same buckets or budget ledgers: one at a time.

Only the job at the head asks Redis (``Ticket._wait_in_line``, ``_wait_for_budget``); the
others wait here, first come, first served. A line is one team's: a deployment's buckets,
shared by teams, give the teams their turns in Redis, across every worker process
(``lua/take.lua``); a per-process line taking teams in turn let each process put its own
jobs of a flooding team ahead of another team's (two per process: 5 ahead with 2 processes,
10 with 4).
"""

from __future__ import annotations

import asyncio
from collections import deque


class Line:
    """An ``asyncio.Lock`` handed straight to its next waiter: held from a release until that
    waiter wakes, so a job arriving meanwhile finds it ``locked`` and goes behind it, rather
    than take what the waiter is woken for."""

    def __init__(self) -> None:
        self._held = False
        self._waiting: deque[asyncio.Future[None]] = deque()
        self.ready = 0.0
        """``time.monotonic()`` before which a deployment's buckets will not have what the
        last job admitted from the line took (its take said so): the next one asks then."""

    def locked(self) -> bool:
        return self._held

    async def acquire(self) -> None:
        if not self._held:
            self._held = True
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.release()  # handed the line as it was cancelled: pass it on
            elif turn in self._waiting:
                # Not there when a release ran between the cancel and this: it passed over
                # the cancelled turn (a drain's stop cancels waits as jobs leave the line).
                self._waiting.remove(turn)
            raise

    def release(self) -> None:
        """Hand the line to its first waiter, or free it."""
        while self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self._held = False
