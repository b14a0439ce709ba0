"""Where a worker's jobs wait their turn for the same buckets: one at a time, teams in turn.

Only the job at the head asks Redis (``Ticket._wait_in_line``); the others wait here. A
deployment's buckets are shared by every team calling it, so a plain first-come line put a
team's few jobs behind all of a flooding team's: with a deployment at 600 RPM, one team
offering 2 jobs/s waited 7.9 s at p99 behind another's backlog, against 0.22 s alone. Here
each team has its own first-come queue, and the turn passes from team to team (round robin),
so a team waits behind at most one job of each other team waiting.
"""

from __future__ import annotations

import asyncio
from collections import deque


class Line:
    """An ``asyncio.Lock`` whose waiters take turns by team."""

    def __init__(self) -> None:
        self._held = False
        self._waiting: dict[str, deque[asyncio.Future[None]]] = {}
        """Each team's waiters, first come first; the dict's order is the teams' turns."""

    def locked(self) -> bool:
        return self._held

    async def acquire(self, team: str) -> None:
        if not self._held and not self._waiting:
            self._held = True
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(team, deque()).append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.release()  # handed the line as it was cancelled: pass it on
            else:
                self._forget(team, turn)
            raise

    def release(self) -> None:
        """Hand the line to the first waiter of the team next in turn, or free it."""
        while self._waiting:
            team = next(iter(self._waiting))
            queue = self._waiting.pop(team)
            turn = queue.popleft()
            if queue:
                self._waiting[team] = queue  # to the back of the turns
            if not turn.done():
                turn.set_result(None)
                return
        self._held = False

    def _forget(self, team: str, turn: asyncio.Future[None]) -> None:
        queue = self._waiting.get(team)
        if queue is not None and turn in queue:
            queue.remove(turn)
            if not queue:
                del self._waiting[team]
