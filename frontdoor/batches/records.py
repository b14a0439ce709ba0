"""The HTTP APIs' batches in PostgreSQL (``api_batches``): what the caller sees, and what the
runner needs to take a batch up again wherever it stopped.

A runner holds a batch by a lease (``runner``, ``lease_until``), renewed while it works:
a process that stops, or stalls past its lease, loses the batch to the next runner that
looks. Every write of a runner names it (``held_by``), so a runner that lost its lease
changes nothing any more.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

import asyncpg

from frontdoor.chat_request import key_conflict

Api = Literal["openai", "anthropic"]
Phase = Literal["submit", "collect", "clean", "done"]

ENDED = ("completed", "failed", "expired", "cancelled")
"""Statuses of a batch whose every request has an answer (or that never ran)."""
CANCELLABLE = ("validating", "in_progress", "finalizing")
"""Statuses a cancel applies to: not ended, not being canceled already."""
MAX_FAULTS = 5
"""Runs that may end in a fault of ours before the batch fails, so it never loops."""

ID_PREFIX: dict[Api, str] = {"openai": "batch_", "anthropic": "msgbatch_"}
WINDOW = "24h"
"""The completion window of every batch: OpenAI's only one, Anthropic's fixed one."""
_WINDOW_LENGTH = timedelta(hours=24)


def new_batch_id(api: Api) -> str:
    """A batch id, also the gateway's name for the batch (lowercase, at most 48 characters)."""
    return ID_PREFIX[api] + secrets.token_hex(12)


@dataclass(frozen=True)
class BatchRow:
    id: str
    team: str
    api: Api
    status: str
    key_id: str
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None
    output_file_id: str | None
    error_file_id: str | None
    errors: list[dict[str, Any]] | None
    total: int
    done: int
    failed: int
    expired: int
    canceled: int
    refused: int
    spend_usd: Decimal
    """What its collected lines cost."""
    created_at: datetime
    expires_at: datetime
    in_progress_at: datetime | None
    finalizing_at: datetime | None
    completed_at: datetime | None
    failed_at: datetime | None
    expired_at: datetime | None
    cancelling_at: datetime | None
    cancelled_at: datetime | None
    phase: Phase
    faults: int
    idempotency_key: str | None
    """The Idempotency-Key it was created under, if any (``Bound``)."""
    request_digest: str | None
    """The fingerprint of the request that created it under that key."""

    @property
    def ended(self) -> bool:
        return self.status in ENDED

    @property
    def ended_at(self) -> datetime | None:
        return self.completed_at or self.cancelled_at or self.expired_at or self.failed_at

    @property
    def cancellable(self) -> bool:
        return self.status in CANCELLABLE

    @property
    def written(self) -> int:
        """Requests with a result line: answered, failed, expired, canceled or refused."""
        return self.done + self.failed + self.expired + self.canceled + self.refused


_FIELDS = tuple(BatchRow.__dataclass_fields__)
_COLUMNS = ", ".join(_FIELDS)


@dataclass(frozen=True)
class Bound:
    """A create under an Idempotency-Key: the key (the team's: every lookup is by team) and
    the fingerprint of the request, which a retry of it has too."""

    key: str
    digest: str


def _row(record: asyncpg.Record | None) -> BatchRow | None:
    return None if record is None else BatchRow(**{name: record[name] for name in _FIELDS})


async def create_batch(
    pool: asyncpg.Pool,
    *,
    batch_id: str,
    team: str,
    api: Api,
    key_id: str,
    input_file_id: str,
    endpoint: str,
    metadata: dict[str, str] | None,
    total: int = 0,
    bound: Bound | None = None,
) -> BatchRow:
    """Record a new batch, ``validating``, to expire ``WINDOW`` from now; under ``bound``'s
    key, unless the key is bound to a batch of the team already (another create under it
    committed first): then that batch, when the same request made it (``same_request``)."""
    while True:
        record = await pool.fetchrow(
            f"""
            INSERT INTO api_batches (id, team, api, status, key_id, input_file_id, endpoint,
                                     completion_window, metadata, expires_at, total,
                                     idempotency_key, request_digest)
            VALUES ($1, $2, $3, 'validating', $4, $5, $6, $7, $8, $9, $10, $11, $12)
            ON CONFLICT (team, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
            RETURNING {_COLUMNS}
            """,
            batch_id,
            team,
            api,
            key_id,
            input_file_id,
            endpoint,
            WINDOW,
            metadata,
            datetime.now(UTC) + _WINDOW_LENGTH,
            total,
            None if bound is None else bound.key,
            None if bound is None else bound.digest,
        )
        row = _row(record)
        if row is not None:
            return row
        assert bound is not None  # the key's index is the only conflict passed over
        made = await batch_under(pool, team, bound.key)
        if made is not None:
            return same_request(made, api, bound)
        # That batch was deleted in between (an ended Message Batch): the key is free again.


async def batch_under(pool: asyncpg.Pool, team: str, key: str) -> BatchRow | None:
    """The team's batch created under the Idempotency-Key ``key``, if any."""
    return _row(
        await pool.fetchrow(
            f"SELECT {_COLUMNS} FROM api_batches WHERE team = $1 AND idempotency_key = $2",
            team,
            key,
        )
    )


def same_request(made: BatchRow, api: Api, bound: Bound) -> BatchRow:
    """``made``, the batch under ``bound``'s key, to answer a retry of the request that
    created it with; IdempotencyConflict when another request (or the other batch API) did."""
    if (made.api, made.request_digest) != (api, bound.digest):
        raise key_conflict()
    return made


async def get_batch(pool: asyncpg.Pool, team: str, api: Api, batch_id: str) -> BatchRow | None:
    return _row(
        await pool.fetchrow(
            f"SELECT {_COLUMNS} FROM api_batches WHERE id = $1 AND team = $2 AND api = $3",
            batch_id,
            team,
            api,
        )
    )


async def list_batches(
    pool: asyncpg.Pool,
    team: str,
    api: Api,
    *,
    after: str | None = None,
    before: str | None = None,
    limit: int,
) -> list[BatchRow]:
    """Up to ``limit`` of the team's batches, newest first: older than ``after``, or the
    ones just newer than ``before`` (still listed newest first)."""
    cursor, cmp, order = (before, ">", "ASC") if before else (after, "<", "DESC")
    records = await pool.fetch(
        f"""
        SELECT {_COLUMNS} FROM api_batches
        WHERE team = $1 AND api = $2
          AND ($3::text IS NULL OR (created_at, id) {cmp}
               (SELECT created_at, id FROM api_batches WHERE id = $3 AND team = $1))
        ORDER BY created_at {order}, id {order}
        LIMIT $4
        """,
        team,
        api,
        cursor,
        limit,
    )
    rows = [_row(r) for r in records]
    found = [r for r in rows if r is not None]
    return found[::-1] if before else found


async def recent_batches(pool: asyncpg.Pool, team: str | None, *, limit: int) -> list[BatchRow]:
    """The newest ``limit`` batches of both APIs: the team's, or every team's (None)."""
    newest = "ORDER BY created_at DESC, id DESC LIMIT $1"
    if team is None:
        records = await pool.fetch(f"SELECT {_COLUMNS} FROM api_batches {newest}", limit)
    else:
        # A query of its own, so the team's index is used (a generic plan of an OR would not).
        records = await pool.fetch(
            f"SELECT {_COLUMNS} FROM api_batches WHERE team = $2 {newest}", limit, team
        )
    return [row for r in records if (row := _row(r)) is not None]


async def find_batch(pool: asyncpg.Pool, batch_id: str, team: str | None) -> BatchRow | None:
    """A batch of either API by its id: the team's only, or any team's (None)."""
    return _row(
        await pool.fetchrow(
            f"SELECT {_COLUMNS} FROM api_batches WHERE id = $1 AND ($2::text IS NULL OR team = $2)",
            batch_id,
            team,
        )
    )


async def request_cancel(pool: asyncpg.Pool, team: str, api: Api, batch_id: str) -> BatchRow | None:
    """Mark a batch ``cancelling`` unless it has ended (or is being canceled); the batch."""
    await pool.execute(
        """
        UPDATE api_batches SET status = 'cancelling', cancelling_at = now()
        WHERE id = $1 AND team = $2 AND api = $3 AND status = any($4::text[])
        """,
        batch_id,
        team,
        api,
        list(CANCELLABLE),
    )
    return await get_batch(pool, team, api, batch_id)


async def delete_batch(pool: asyncpg.Pool, team: str, api: Api, batch_id: str) -> bool:
    """Delete an ended batch with its files; whether there was one to delete."""
    async with pool.acquire() as conn, conn.transaction():
        record = await conn.fetchrow(
            "DELETE FROM api_batches WHERE id = $1 AND team = $2 AND api = $3 AND phase = 'done' "
            "RETURNING input_file_id, output_file_id, error_file_id",
            batch_id,
            team,
            api,
        )
        if record is None:
            return False
        await conn.execute(
            "DELETE FROM api_files WHERE team = $1 AND id = any($2::text[])",
            team,
            [f for f in record.values() if f is not None],
        )
    return True


async def running_with(pool: asyncpg.Pool, team: str, file_id: str) -> str | None:
    """A batch of the team still reading ``file_id`` as its input, if any."""
    found: str | None = await pool.fetchval(
        "SELECT id FROM api_batches WHERE team = $1 AND input_file_id = $2 AND phase <> 'done' "
        "LIMIT 1",
        team,
        file_id,
    )
    return found


_HELD = """
    WITH held AS (
        SELECT team, count(*) AS n FROM api_batches
        WHERE phase <> 'done' AND runner IS NOT NULL AND lease_until >= now()
        GROUP BY team
    )
"""
"""Runners each team's batches hold now, over every front-door process: a lease lapsed
(its process gone) holds nothing."""


async def claim(pool: asyncpg.Pool, runner: str, lease: float) -> BatchRow | None:
    """Take a batch left to run whose lease is free or lapsed, for ``lease`` s: one of the
    team whose batches hold the fewest runners, its oldest. So runners go round the teams
    that wait, and a team with many batches takes a free runner only when no team with
    fewer held has one waiting."""
    return _row(
        await pool.fetchrow(
            f"""
            {_HELD}
            UPDATE api_batches SET runner = $1, lease_until = now() + make_interval(secs => $2)
            WHERE id = (
                SELECT b.id FROM api_batches b LEFT JOIN held h ON h.team = b.team
                WHERE b.phase <> 'done' AND (b.lease_until IS NULL OR b.lease_until < now())
                ORDER BY coalesce(h.n, 0), b.created_at
                FOR UPDATE OF b SKIP LOCKED
                LIMIT 1
            )
            RETURNING {_COLUMNS}
            """,
            runner,
            lease,
        )
    )


@dataclass(frozen=True)
class Shares:
    """How the runners are shared now: batches held per team, and the fewest held by a
    team that has a batch waiting for one (None when no batch waits)."""

    held: dict[str, int]
    fewest_waiting: int | None


async def shares(pool: asyncpg.Pool) -> Shares:
    rows = await pool.fetch(
        f"""
        {_HELD}
        SELECT b.team, coalesce(max(h.n), 0) AS n,
               bool_or(b.lease_until IS NULL OR b.lease_until < now()) AS waiting
        FROM api_batches b LEFT JOIN held h ON h.team = b.team
        WHERE b.phase <> 'done'
        GROUP BY b.team
        """
    )
    waiting = [row["n"] for row in rows if row["waiting"]]
    return Shares({row["team"]: row["n"] for row in rows}, min(waiting, default=None))


async def renew(pool: asyncpg.Pool, batch_id: str, runner: str, lease: float) -> BatchRow | None:
    """Extend the lease; the batch as it is now, or None when ``runner`` lost it."""
    return _row(
        await pool.fetchrow(
            f"""
            UPDATE api_batches SET lease_until = now() + make_interval(secs => $3)
            WHERE id = $1 AND runner = $2
            RETURNING {_COLUMNS}
            """,
            batch_id,
            runner,
            lease,
        )
    )


async def release(pool: asyncpg.Pool, batch_id: str, runner: str, *, after: float = 0) -> None:
    """Give a batch up, for the next runner to take ``after`` seconds from now."""
    await pool.execute(
        "UPDATE api_batches SET runner = NULL, lease_until = now() + make_interval(secs => $3) "
        "WHERE id = $1 AND runner = $2",
        batch_id,
        runner,
        after,
    )


class LeaseLost(Exception):
    """The runner no longer holds the batch: another runner has it, or it was deleted."""


async def held_by(conn: asyncpg.Connection, batch_id: str, runner: str) -> BatchRow:
    """Inside a transaction: lock the batch's row, and the batch as it is; LeaseLost when
    ``runner`` lost it."""
    row = _row(
        await conn.fetchrow(
            f"SELECT {_COLUMNS} FROM api_batches WHERE id = $1 AND runner = $2 FOR UPDATE",
            batch_id,
            runner,
        )
    )
    if row is None:
        raise LeaseLost(f"batch {batch_id} is no longer held by {runner}")
    return row


_SETTABLE = frozenset(_FIELDS) - {
    "id",
    "team",
    "api",
    "key_id",
    "created_at",
    "idempotency_key",
    "request_digest",
}


async def update(conn: asyncpg.Connection, batch_id: str, runner: str, **values: Any) -> None:
    """Set columns of a batch its runner holds, inside the caller's transaction (LeaseLost
    when it lost it). A time (``*_at``) keeps its first value; a cancel the caller asked
    for stands against any status but an end."""
    unknown = set(values) - _SETTABLE
    assert not unknown, f"not settable: {unknown}"
    await held_by(conn, batch_id, runner)
    assignments = []
    for i, name in enumerate(values, start=2):
        if name.endswith("_at"):
            assignments.append(f"{name} = coalesce({name}, ${i})")
        elif name == "status" and values[name] not in ENDED:
            assignments.append(
                f"status = CASE WHEN status = 'cancelling' THEN status ELSE ${i} END"
            )
        else:
            assignments.append(f"{name} = ${i}")
    await conn.execute(
        f"UPDATE api_batches SET {', '.join(assignments)} WHERE id = $1",
        batch_id,
        *values.values(),
    )
