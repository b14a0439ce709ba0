"""Writing usage events to ``usage_log``: one statement per batch, idempotent by ``job_id``."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

import asyncpg

from queuegate.messages import UsageEvent

STATEMENT_TIMEOUT = 30.0
"""Seconds one batch insert may take before it counts as a failed write (and is retried)."""

COLUMNS: tuple[tuple[str, str], ...] = (
    ("job_id", "text"),
    ("team", "text"),
    ("model_requested", "text"),
    ("model_used", "text"),
    ("provider", "text"),
    ("deployment", "text"),
    ("input_tokens", "bigint"),
    ("output_tokens", "bigint"),
    ("cached_tokens", "bigint"),
    ("cost_usd", "numeric"),
    ("status", "text"),
    ("error_code", "text"),
    ("queued_ms", "float8"),
    ("latency_ms", "float8"),
    ("attempts", "integer"),
    ("fallback_used", "boolean"),
    ("cached", "boolean"),
    ("reply_delivered", "boolean"),
    ("worker", "text"),
    ("ts", "timestamptz"),
)
"""The ``usage_log`` columns filled from a UsageEvent's fields of the same name."""

# One array parameter per column: the statement's text and plan stay the same whatever the
# batch size, and PostgreSQL receives the whole batch in one round trip.
_INSERT = (
    f"INSERT INTO usage_log ({', '.join(name for name, _ in COLUMNS)})"
    " SELECT * FROM unnest("
    + ", ".join(f"${i}::{pg_type}[]" for i, (_, pg_type) in enumerate(COLUMNS, start=1))
    + ") ON CONFLICT (job_id) DO NOTHING"
)


def first_per_job(events: Iterable[UsageEvent]) -> list[UsageEvent]:
    """The first event of each ``job_id``, in order: a batch may hold redeliveries."""
    unique: dict[str, UsageEvent] = {}
    for event in events:
        unique.setdefault(event.job_id, event)
    return list(unique.values())


async def insert_usage(db: asyncpg.Pool | asyncpg.Connection, events: Iterable[UsageEvent]) -> int:
    """Store the events whose ``job_id`` is new; return how many rows were inserted.

    Raises ``asyncpg.DataError`` or ``asyncpg.IntegrityConstraintViolationError`` when a
    value cannot be stored (the whole statement fails), other asyncpg errors or ``OSError``
    when PostgreSQL cannot be reached.
    """
    unique = first_per_job(events)
    if not unique:
        return 0
    columns = {name: [getattr(event, name) for event in unique] for name, _ in COLUMNS}
    columns["ts"] = [_as_utc(ts) for ts in columns["ts"]]
    status: str = await db.execute(_INSERT, *columns.values(), timeout=STATEMENT_TIMEOUT)
    return int(status.rsplit(" ", 1)[1])


def _as_utc(ts: datetime) -> datetime:
    # A timestamp without an offset is taken as UTC, never as this host's local time.
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts
