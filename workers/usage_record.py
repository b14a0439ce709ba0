"""What PostgreSQL's usage log says of a job: the durable record that it was answered.

Redis remembers answered jobs for ``result_ttl``; when Redis loses its data that memory is
gone, and this is what keeps such a job from being called again (see ``workers.claims``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from functools import partial
from typing import NamedTuple, TypeVar

import asyncpg

from queuegate.db import DB_ERRORS, RETRY_CAP, RETRY_FIRST, is_unreachable, reconnect
from queuegate.errors import ServiceUnavailable
from queuegate.outage import OutageLog
from queuegate.usage_log import accounted

log = logging.getLogger(__name__)

T = TypeVar("T")

LOOKUP_TIMEOUT = 5.0
"""Seconds one lookup may take before it counts as PostgreSQL being unreachable."""
RETRY_AFTER = 1.0
"""Seconds lookups are not sent after one failed: the jobs waiting for an answer ask again
with backoff, and a dead or silent server is not asked once per job."""


class Row(NamedTuple):
    """What usage_log says of one job."""

    cost_usd: Decimal | None
    """What its usage row holds it cost; None when it has no row."""


class UsageRecord:
    """Reads ``usage_log`` through the worker's pool.

    ``accounted`` answers for one job, waiting while PostgreSQL cannot tell: a job that must
    be checked is never served on a guess. Lookups asked while one runs go together in the
    next query, so a burst of jobs to check (every job, for a while after Redis lost its
    data) costs a few queries, not one each.
    """

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._down_until = 0.0
        self._outage = OutageLog(
            log, "PostgreSQL (usage_log)", "jobs that must be looked up there wait for it"
        )
        self._asked: dict[tuple[str, str], asyncio.Future[Row | None]] = {}
        self._looking: asyncio.Task[None] | None = None

    async def accounted(self, team: str, job_id: str, *, until: float) -> Decimal | None:
        """What the job's usage row holds it cost, if it has one (it was answered, ok or
        error, and accounted); None when it has none, or one of it expired uncalled, nothing
        billed (``queuegate.usage_log.accounted``): a retry publishes that again.

        While PostgreSQL cannot tell, asked again with backoff up to ``until`` (a monotonic
        time), then ServiceUnavailable: the job goes back to its queue uncalled.
        """
        delay = RETRY_FIRST
        while (answer := await self._has(team, job_id)) is None:
            left = until - time.monotonic()
            if left <= 0:
                raise ServiceUnavailable(
                    f"PostgreSQL (usage_log) could not tell whether job {job_id} was answered "
                    "already; it goes back to its queue uncalled: check the database"
                )
            await asyncio.sleep(min(delay, left))
            delay = min(2 * delay, RETRY_CAP)
        return answer.cost_usd

    async def _has(self, team: str, job_id: str) -> Row | None:
        key = (team, job_id)
        answer = self._asked.get(key)
        if answer is None:
            answer = self._asked[key] = asyncio.get_running_loop().create_future()
        if self._looking is None or self._looking.done():
            self._looking = asyncio.create_task(self._look_up())
        return await asyncio.shield(answer)

    async def _look_up(self) -> None:
        while self._asked:
            asked, self._asked = self._asked, {}
            try:
                nothing: dict[tuple[str, str], Decimal] = {}
                found = await self._read(
                    partial(accounted, self._pool, list(asked), expired_uncalled=False), nothing
                )
            except asyncio.CancelledError:
                for answer in asked.values():
                    answer.cancel()
                raise
            except Exception:
                log.exception("looking up %d jobs in usage_log failed; they wait", len(asked))
                found = None
            for key, answer in asked.items():
                if not answer.done():
                    answer.set_result(None if found is None else Row(found.get(key)))

    async def accounted_before(self, epoch_ms: float, seconds: float) -> bool | None:
        """Whether any job that finished in the ``seconds`` before ``epoch_ms`` (Unix time,
        ms) is accounted; None when PostgreSQL cannot tell."""
        nothing: list[asyncpg.Record] = []
        rows = await self._read(
            lambda: self._pool.fetch(
                "SELECT 1 FROM usage_log WHERE ts > to_timestamp($1) AND ts <= to_timestamp($2)"
                " LIMIT 1",
                epoch_ms / 1000 - seconds,
                epoch_ms / 1000,
            ),
            nothing,
        )
        return None if rows is None else bool(rows)

    async def _read(self, query: Callable[[], Awaitable[T]], nothing: T) -> T | None:
        """``query()``'s answer; ``nothing`` before accounting made usage_log; None while
        PostgreSQL cannot tell."""
        if time.monotonic() < self._down_until:
            return None
        try:
            async with asyncio.timeout(LOOKUP_TIMEOUT):
                answer = await query()
        except asyncpg.UndefinedTableError:
            return nothing  # accounting has not created it yet: nothing was accounted
        except DB_ERRORS as exc:  # TimeoutError (LOOKUP_TIMEOUT) is among them
            self._down_until = time.monotonic() + RETRY_AFTER
            self._outage.failed(exc)
            if is_unreachable(exc):
                await reconnect(self._pool)
            return None
        self._outage.recovered()
        return answer
