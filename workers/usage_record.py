"""What PostgreSQL's usage log says of a job: the durable record that it was answered.

Redis remembers answered jobs for ``result_ttl``; when Redis loses its data that memory is
gone, and this is what keeps such a job from being called again (see ``workers.claims``).
"""

from __future__ import annotations

import asyncio
import logging
import time

import asyncpg

from queuegate.outage import OutageLog

log = logging.getLogger(__name__)

LOOKUP_TIMEOUT = 2.0
"""Seconds one lookup may take: a job waits for it before its provider call."""
RETRY_AFTER = 5.0
"""Seconds lookups are skipped after one failed, so an outage costs each job nothing."""
_DB_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


class UsageRecord:
    """Reads ``usage_log`` through the worker's pool; every answer is None when it cannot
    tell (PostgreSQL unreachable, or no usage table yet), and the caller serves the job."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._down_until = 0.0
        self._outage = OutageLog(log, "PostgreSQL", "answered jobs are not checked in usage_log")

    async def has(self, team: str, job_id: str) -> bool | None:
        """Whether the job has a usage row: it was answered (ok or error) and accounted."""
        query = "SELECT 1 FROM usage_log WHERE team = $1 AND job_id = $2"
        row = await self._fetch(query, team, job_id)
        return None if row is None else bool(row)

    async def any_since(self, seconds: float) -> bool | None:
        """Whether any job was accounted in the last ``seconds``."""
        row = await self._fetch(
            "SELECT 1 FROM usage_log WHERE ts > now() - make_interval(secs => $1) LIMIT 1",
            float(seconds),
        )
        return None if row is None else bool(row)

    async def _fetch(self, query: str, *args: object) -> list[asyncpg.Record] | None:
        if time.monotonic() < self._down_until:
            return None
        try:
            async with asyncio.timeout(LOOKUP_TIMEOUT):
                rows: list[asyncpg.Record] = await self._pool.fetch(query, *args)
        except asyncpg.UndefinedTableError:
            return []  # accounting has not created it yet: nothing was accounted
        except _DB_ERRORS as exc:
            self._down_until = time.monotonic() + RETRY_AFTER
            self._outage.failed(exc)
            return None
        self._outage.recovered()
        return rows
