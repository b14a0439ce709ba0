"""Writing usage events to ``usage_log``: one transaction per batch (a COPY, one INSERT),
idempotent by team and ``job_id`` (producers choose job ids, so they are unique within a team
only), and by claim: a job's event under another claim than its row's bills calls made again,
on a row of its own."""

from __future__ import annotations

import contextlib
import operator
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
from pydantic import TypeAdapter

from queuegate.messages import AGAIN_MARK, Attempt, UsageEvent

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
    ("claim", "text"),
    ("covers", "text[]"),
)
"""The ``usage_log`` columns filled from a UsageEvent's fields of the same name."""

_ROW = operator.attrgetter(*(name for name, _ in COLUMNS))
_TS = next(i for i, (name, _) in enumerate(COLUMNS) if name == "ts")
_ATTEMPT_LOG = next(i for i, (name, _) in enumerate(COLUMNS) if name == "attempt_log")
_ATTEMPTS = TypeAdapter(list[Attempt])
_KEY = operator.attrgetter("team", "job_id")
_COLUMN_NAMES = [name for name, _ in COLUMNS]

_CONTENT = (
    ("job_id", "text"),
    ("team", "text"),
    ("capture", "text"),
    # JSON text, cast in the statement: a list of lists would be sent as a 2-D array.
    ("prompt", "text"),
    ("response", "text"),
    ("ts", "timestamptz"),
)


_NAMES = ", ".join(_COLUMN_NAMES)
# A jsonb column is staged as its JSON text and cast in the statement: the pools' jsonb codec
# is a text one, which a binary COPY cannot use.
_STAGED = ", ".join(f"{name}::jsonb" if t == "jsonb" else name for name, t in COLUMNS)
_STAGE = (
    "CREATE TEMP TABLE IF NOT EXISTS usage_in ("
    + ", ".join(f"{name} {'text' if t == 'jsonb' else t}" for name, t in COLUMNS)
    + ") ON COMMIT DELETE ROWS"
)
"""The batch's rows are copied here first: a binary COPY of rows costs this process half the
CPU of the same rows as one array parameter a column (asyncpg checks every array element
against collections.abc), and PostgreSQL no more. Its rows go at the transaction's end."""

# The statement's text and plan stay the same whatever the batch size. Captured content is
# written by the same statement, for the rows it inserts, so a row and its content commit
# together and a redelivered event adds neither twice.
_INSERT = (
    f"WITH inserted AS (INSERT INTO usage_log ({_NAMES}) SELECT {_STAGED} FROM usage_in"
    # In key order: see insert_usage.
    " ORDER BY team, job_id ON CONFLICT (team, job_id) DO NOTHING RETURNING team, job_id),"
    f" kept AS (INSERT INTO audit_content ({', '.join(name for name, _ in _CONTENT)})"
    " SELECT c.job_id, c.team, c.capture, c.prompt::jsonb, c.response::jsonb, c.ts"
    " FROM unnest("
    + ", ".join(f"${i}::{t}[]" for i, (_, t) in enumerate(_CONTENT, start=1))
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


async def insert_usage(
    db: asyncpg.Pool | asyncpg.Connection, events: Iterable[UsageEvent], *, staged: bool = False
) -> int:
    """Store the events whose ``job_id`` is new, and those that bill a job's calls under
    another claim than its row's (``again``); return how many rows were inserted.

    ``staged``: ``db``'s connections have the staging table already (``stage``, as a pool's
    ``prepare``), so no batch asks for it again: a round trip a batch.

    Raises ``asyncpg.DataError`` or ``asyncpg.IntegrityConstraintViolationError`` when a
    value cannot be stored (the whole statement fails), other asyncpg errors or ``OSError``
    when PostgreSQL cannot be reached.
    """
    events = list(events)
    # In key order: two batches are written at once (see accounting.consumer.IN_FLIGHT), and
    # a job redelivered into both would otherwise deadlock them, each waiting on the other's
    # uncommitted row. In one order the second waits for the first's commit, then skips it.
    unique = sorted(first_per_job(events), key=_KEY)
    if not unique:
        return 0
    rows = [_stored(row) for row in map(_ROW, unique)]
    captured = [(e, e.content) for e in unique if e.content is not None]
    content = [
        [e.job_id for e, _ in captured],
        [e.team for e, _ in captured],
        [c.capture for _, c in captured],
        [_json(c.prompt) for _, c in captured],
        [None if c.response is None else _json(c.response) for _, c in captured],
        [_as_utc(e.ts) for e, _ in captured],
    ]
    async with contextlib.AsyncExitStack() as stack:
        if isinstance(db, asyncpg.Pool):
            conn = await stack.enter_async_context(db.acquire())
        else:
            conn = db
        # The copy and the insert commit together; in a transaction of the caller's, with it.
        if not conn.is_in_transaction():
            await stack.enter_async_context(conn.transaction())
        if not staged:
            await stage(conn)
        try:
            await conn.copy_records_to_table(
                "usage_in", records=rows, columns=_COLUMN_NAMES, timeout=STATEMENT_TIMEOUT
            )
        except (OverflowError, ValueError, TypeError) as exc:
            # A value asyncpg cannot encode (an int beyond bigint): the DataError it raises
            # for one in a statement's parameters, which callers take as unstorable.
            raise asyncpg.DataError(f"invalid input for usage_log: {exc}") from exc
        inserted: int = await conn.fetchval(_INSERT, *content, timeout=STATEMENT_TIMEOUT)
        if inserted < len(events):
            # Some were a job's row already (a redelivery, or calls made again): rarely, so
            # a batch of new jobs pays nothing for telling them apart.
            again = await _again(conn, events)
            if again:
                await conn.execute("DELETE FROM usage_in", timeout=STATEMENT_TIMEOUT)
                inserted += await insert_usage(conn, again, staged=True)
    return inserted


async def _again(conn: asyncpg.Connection, events: list[UsageEvent]) -> list[UsageEvent]:
    """Those of ``events`` that bill calls a job's row does not: made under another claim
    than the row's (after Redis lost the first claim's outcome, the job's duplicate was
    called again), as events of their own, ``<job id>/again/<claim>``.

    An event sent again (a redelivery, a stored outcome announced again) names its claim
    as stored: one row. So is one whose claims (its own and those whose calls it bills as
    lost, ``covers``) meet the row's: the same call may be in both (a sweep's outcome and a
    stalled owner's, each announced before the other's store). Without a claim on either
    side (from a worker before claims were named, a row from before) or without a call (a
    refusal) it is dropped."""
    called = [e for e in events if e.claim and e.attempts and AGAIN_MARK not in e.job_id]
    if not called:
        return []
    rows = await conn.fetch(
        "SELECT team, job_id, claim, covers FROM usage_log"
        " WHERE (team, job_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
        [e.team for e in called],
        [e.job_id for e in called],
        timeout=STATEMENT_TIMEOUT,
    )
    billed = {
        (row["team"], row["job_id"]): {row["claim"], *(row["covers"] or ())}
        for row in rows
        if row["claim"] is not None
    }
    return [
        e.model_copy(update={"job_id": f"{e.job_id}{AGAIN_MARK}{e.claim}"})
        for e in called
        if (claims := billed.get(_KEY(e))) is not None
        and claims.isdisjoint((e.claim, *(e.covers or ())))
    ]


async def stage(conn: asyncpg.Connection) -> None:
    """Create ``conn``'s staging table, if it has none: it lasts as long as the connection."""
    await conn.execute(_STAGE, timeout=STATEMENT_TIMEOUT)


async def prepare_insert(conn: asyncpg.Connection) -> None:
    """Have ``conn``, staged already (``stage``, as its pool's ``prepare``), prepare the batch
    insert as its first batch would, writing nothing.

    A connection's first batch otherwise pays for PostgreSQL parsing and planning the
    statement, loading the tables' catalogs into its backend, and asyncpg describing it.
    One statement, so no transaction of its own: it inserts no row.
    """
    empty: list[list[object]] = [[] for _ in _CONTENT]
    await conn.fetchval(_INSERT, *empty, timeout=STATEMENT_TIMEOUT)


# PostgreSQL text refuses NUL, and jsonb the escape of it that JSON allows: a usage event with
# one in any text (a tenant's key id or model, a prompt, a model's answer, a provider's error)
# would fail the whole statement, and the job would go unbilled. It is stored as U+FFFD
# instead; an escaped backslash before "u0000" is text, left as it is. (A lone surrogate,
# which neither can hold either, has no JSON form the workers write or pydantic reads.)
_JSON_NUL = re.compile(rb"(?<!\\)((?:\\\\)*)\\u0000")


def storable_json(data: bytes) -> bytes:
    """JSON with each NUL it holds as U+FFFD, so that every text in it can be stored: a usage
    message's body, every field of its events at once, before they are read
    (``accounting.consumer``), and the JSON of the jsonb columns."""
    return _JSON_NUL.sub(rb"\1\\ufffd", data) if b"\\u0000" in data else data


def _json(value: object) -> str:
    return storable_json(orjson.dumps(value)).decode()


def _stored(row: tuple[Any, ...]) -> list[Any]:
    """A row's values as staged: its time in UTC, its attempt log as jsonb's JSON text."""
    stored = list(row)
    stored[_TS] = _as_utc(row[_TS])
    log = row[_ATTEMPT_LOG]
    stored[_ATTEMPT_LOG] = None if log is None else storable_json(_ATTEMPTS.dump_json(log)).decode()
    return stored


def _as_utc(ts: datetime) -> datetime:
    # A timestamp without an offset is taken as UTC, never as this host's local time.
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts
