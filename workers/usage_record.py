"""What PostgreSQL's usage log says of a job: the durable record that it was answered.

Redis remembers answered jobs for ``result_ttl``; when Redis loses its data that memory is
gone, and this is what keeps such a job from being called again (see ``workers.claims``).
"""

from __future__ import annotations

import asyncio
import logging
import time

import asyncpg

from queuegate.db import DB_ERRORS
from queuegate.outage import OutageLog

log = logging.getLogger(__name__)

LOOKUP_TIMEOUT = 5.0
"""Seconds one lookup may take: jobs wait for it before their provider call."""
RETRY_AFTER = 5.0
"""Seconds lookups are skipped after one failed, so an outage costs each job nothing."""


class UsageRecord:
    """Reads ``usage_log`` through the worker's pool; every answer is None when it cannot
    tell (PostgreSQL unreachable, or no usage table yet), and the caller serves the job.

    Lookups asked while one runs go together in the next query, so a burst of jobs to check
    (every job, for a while after Redis lost its data) costs a few queries, not one each.
    """

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._down_until = 0.0
        self._outage = OutageLog(log, "PostgreSQL", "answered jobs are not checked in usage_log")
        self._asked: dict[tuple[str, str], asyncio.Future[bool | None]] = {}
        self._looking: asyncio.Task[None] | None = None

    async def has(self, team: str, job_id: str) -> bool | None:
        """Whether the job has a usage row: it was answered (ok or error) and accounted."""
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
            teams, ids = zip(*asked, strict=True)
            try:
                rows = await self._fetch(
                    "SELECT team, job_id FROM usage_log"
                    " WHERE (team, job_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
                    list(teams),
                    list(ids),
                )
            except asyncio.CancelledError:
                for answer in asked.values():
                    answer.cancel()
                raise
            except Exception:
                log.exception("looking up %d jobs in usage_log failed; serving them", len(asked))
                rows = None
            found = None if rows is None else {(row[0], row[1]) for row in rows}
            for key, answer in asked.items():
                if not answer.done():
                    answer.set_result(None if found is None else key in found)

    async def any_since(self, seconds: float) -> bool | None:
        """Whether any job was accounted in the last ``seconds``."""
        rows = await self._fetch(
            "SELECT 1 FROM usage_log WHERE ts > now() - make_interval(secs => $1) LIMIT 1",
            float(seconds),
        )
        return None if rows is None else bool(rows)

    async def _fetch(self, query: str, *args: object) -> list[asyncpg.Record] | None:
        if time.monotonic() < self._down_until:
            return None
        try:
            async with asyncio.timeout(LOOKUP_TIMEOUT):
                rows: list[asyncpg.Record] = await self._pool.fetch(query, *args)
        except asyncpg.UndefinedTableError:
            return []  # accounting has not created it yet: nothing was accounted
        except DB_ERRORS as exc:  # TimeoutError (LOOKUP_TIMEOUT) is among them
            self._down_until = time.monotonic() + RETRY_AFTER
            self._outage.failed(exc)
            return None
        self._outage.recovered()
        return rows
