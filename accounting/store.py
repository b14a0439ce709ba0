"""Writing usage events to ``usage_log``: one statement per batch, idempotent by team and
``job_id`` (producers choose job ids, so they are unique within a team only)."""

from __future__ import annotations

import operator
import re
from collections.abc import Iterable
from datetime import UTC, datetime

import asyncpg
import orjson
from pydantic import TypeAdapter

from queuegate.messages import Attempt, UsageEvent

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
    ("identity", "text"),
    ("pii", "text"),
    ("attempt_log", "jsonb"),
    ("cache_write_tokens", "bigint"),
    ("reasoning_tokens", "bigint"),
    ("params_dropped", "text"),
    ("params_changed", "text"),
    ("tokens_estimated", "boolean"),
    ("trace_id", "text"),
    ("span_id", "text"),
)
"""The ``usage_log`` columns filled from a UsageEvent's fields of the same name."""

_ROW = operator.attrgetter(*(name for name, _ in COLUMNS))
_TS = next(i for i, (name, _) in enumerate(COLUMNS) if name == "ts")
_ATTEMPT_LOG = next(i for i, (name, _) in enumerate(COLUMNS) if name == "attempt_log")
_ATTEMPTS = TypeAdapter(list[Attempt])
_KEY = operator.attrgetter("team", "job_id")

_CONTENT = (
    ("job_id", "text"),
    ("team", "text"),
    ("capture", "text"),
    # JSON text, cast in the statement: a list of lists would be sent as a 2-D array.
    ("prompt", "text"),
    ("response", "text"),
    ("ts", "timestamptz"),
)


def _array(number: int, pg_type: str) -> str:
    # A jsonb column travels as JSON text too, for the same reason as the content's.
    if pg_type == "jsonb":
        return f"${number}::text[]::jsonb[]"
    return f"${number}::{pg_type}[]"


# One array parameter per column: the statement's text and plan stay the same whatever the
# batch size, and PostgreSQL receives the whole batch in one round trip. Captured content is
# written by the same statement, for the rows it inserts, so a row and its content commit
# together and a redelivered event adds neither twice.
_N = len(COLUMNS)
_INSERT = (
    f"WITH inserted AS (INSERT INTO usage_log ({', '.join(name for name, _ in COLUMNS)})"
    " SELECT * FROM unnest("
    + ", ".join(_array(i, pg_type) for i, (_, pg_type) in enumerate(COLUMNS, start=1))
    + ") ON CONFLICT (team, job_id) DO NOTHING RETURNING team, job_id),"
    f" kept AS (INSERT INTO audit_content ({', '.join(name for name, _ in _CONTENT)})"
    " SELECT c.job_id, c.team, c.capture, c.prompt::jsonb, c.response::jsonb, c.ts"
    " FROM unnest("
    + ", ".join(f"${i}::{t}[]" for i, (_, t) in enumerate(_CONTENT, start=_N + 1))
    + f") AS c({', '.join(name for name, _ in _CONTENT)})"
    " WHERE (c.team, c.job_id) IN (SELECT team, job_id FROM inserted)"
    " ON CONFLICT (team, job_id) DO NOTHING)"
    " SELECT count(*) FROM inserted"
)


def first_per_job(events: Iterable[UsageEvent]) -> list[UsageEvent]:
    """The first event of each team's ``job_id``, in order: a batch may hold redeliveries."""
    unique: dict[tuple[str, str], UsageEvent] = {}
    for event in events:
        unique.setdefault((event.team, event.job_id), event)
    return list(unique.values())


async def insert_usage(db: asyncpg.Pool | asyncpg.Connection, events: Iterable[UsageEvent]) -> int:
    """Store the events whose ``job_id`` is new; return how many rows were inserted.

    Raises ``asyncpg.DataError`` or ``asyncpg.IntegrityConstraintViolationError`` when a
    value cannot be stored (the whole statement fails), other asyncpg errors or ``OSError``
    when PostgreSQL cannot be reached.
    """
    # In key order: two batches are written at once (see accounting.consumer.IN_FLIGHT), and
    # a job redelivered into both would otherwise deadlock them, each waiting on the other's
    # uncommitted row. In one order the second waits for the first's commit, then skips it.
    unique = sorted(first_per_job(events), key=_KEY)
    if not unique:
        return 0
    # Transposed in C (attrgetter, zip): this runs for every event at full rate.
    columns = [list(column) for column in zip(*map(_ROW, unique), strict=True)]
    columns[_TS] = [_as_utc(ts) for ts in columns[_TS]]
    columns[_ATTEMPT_LOG] = [
        None if log is None else _jsonb(_ATTEMPTS.dump_json(log).decode())
        for log in columns[_ATTEMPT_LOG]
    ]
    captured = [(e, e.content) for e in unique if e.content is not None]
    content = [
        [e.job_id for e, _ in captured],
        [e.team for e, _ in captured],
        [c.capture for _, c in captured],
        [_json(c.prompt) for _, c in captured],
        [None if c.response is None else _json(c.response) for _, c in captured],
        [_as_utc(e.ts) for e, _ in captured],
    ]
    inserted: int = await db.fetchval(_INSERT, *columns, *content, timeout=STATEMENT_TIMEOUT)
    return inserted


async def prepare_insert(conn: asyncpg.Connection) -> None:
    """Have ``conn`` prepare the batch insert as its first batch would, writing nothing.

    A connection's first batch otherwise pays for PostgreSQL parsing and planning the
    statement, loading the tables' catalogs into its backend, and asyncpg describing it.
    """
    empty: list[list[object]] = [[] for _ in range(_N + len(_CONTENT))]
    await conn.fetchval(_INSERT, *empty, timeout=STATEMENT_TIMEOUT)


# jsonb refuses the escaped NUL that JSON allows: a prompt, a model's answer or a provider's
# error text holding one would fail the whole statement, and the job would go unbilled. It is
# stored as U+FFFD instead; an escaped backslash before "u0000" is text, left as it is.
_JSON_NUL = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")


def _jsonb(text: str) -> str:
    """JSON text as jsonb takes it."""
    return _JSON_NUL.sub(r"\1\\ufffd", text) if "\\u0000" in text else text


def _json(value: object) -> str:
    return _jsonb(orjson.dumps(value).decode())


def _as_utc(ts: datetime) -> datetime:
    # A timestamp without an offset is taken as UTC, never as this host's local time.
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts
