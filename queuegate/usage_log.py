"""Which jobs ``usage_log`` holds: a job with a usage row was answered and accounted.

Workers ask it of a job Redis may have forgotten (``workers.usage_record``), a ledger's
reconciliation of the jobs whose entries it holds (``queuegate.spend``)::

    rows = await accounted(pool, [("alpha", "job-1"), ("beta", "job-2")])
    # {("alpha", "job-1"): Decimal("0.000042")}: each with the cost its row holds
"""

from __future__ import annotations

from collections.abc import Collection
from decimal import Decimal

import asyncpg

from queuegate.messages import storable

_ACCOUNTED = (
    "SELECT team, job_id, cost_usd FROM usage_log"
    " WHERE team = ANY($1::text[]) AND job_id = ANY($2::text[])"
)
"""Read by the (team, job_id) index. A row of one asked team under another's job id can come
too (rarely: ids are unique per team), and is dropped below; pairs through ``unnest`` took
1.5-3 times as long on a large usage_log."""
_CALLED = " AND (error_code IS DISTINCT FROM 'deadline_exceeded' OR attempts > 0 OR cost_usd <> 0)"
"""Leaves out the rows of jobs that ended past their deadline uncalled, nothing billed."""


async def accounted(
    db: asyncpg.Pool | asyncpg.Connection,
    jobs: Collection[tuple[str, str]],
    *,
    expired_uncalled: bool = True,
) -> dict[tuple[str, str], Decimal]:
    """Those of ``jobs``, (team, job id) pairs, that have a usage row, each with the cost its
    row holds. Raises asyncpg's errors (``queuegate.db``).

    ``expired_uncalled``: whether a row of a job that ended past its deadline with no call
    and nothing billed counts. Not for a worker asking whether to call a job: such a job is
    published again under its id, with a new deadline, by a retry under its Idempotency-Key
    (``frontdoor.outcomes``), and a delivery of it as it was is past its deadline still."""
    # A text PostgreSQL cannot store has no row, and asking for it would fail the whole
    # lookup (a job id with a NUL, in a ledger from before jobs were checked for one).
    jobs = [(team, job) for team, job in jobs if storable(team) == team and storable(job) == job]
    if not jobs:
        return {}
    teams, ids = {team for team, _ in jobs}, {job_id for _, job_id in jobs}
    query = _ACCOUNTED if expired_uncalled else _ACCOUNTED + _CALLED
    rows = await db.fetch(query, list(teams), list(ids))
    asked = set(jobs)
    return {
        pair: row["cost_usd"] for row in rows if (pair := (row["team"], row["job_id"])) in asked
    }


__all__ = ["accounted"]
