"""The audit log: pages of usage rows (who ran what, how it ended, what it cost), and the
retention of captured content.

Pages come newest first, by finish time then row id, and are read through indexes that keep
them fast on tens of millions of rows (migrations 0001 and 0008): a page after a ``cursor``
(keyset) costs the same however deep it is; an ``offset`` walks the rows it skips, so it is
capped at ``MAX_OFFSET``.

Retention: the usage rows themselves (``usage_log``: who, what model, tokens, cost) are the
spend record and are kept; only prompts and responses (``audit_content``) expire.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg

from admin.filters import known_team, plain_text, utc_moment
from queuegate.errors import ConfigError
from queuegate.messages import JobStatus
from queuegate.registry import check_team_name
from queuegate.visible import clipped

MAX_LIMIT = 1000
"""Rows a page holds at most."""
MAX_OFFSET = 10_000
"""Rows an offset may skip; deeper pages take the ``next_cursor`` of the page before."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_CURSOR = re.compile(r"^(-?\d{1,20})-(\d{1,20})$")


@dataclass(frozen=True)
class AuditFilter:
    """Which rows a page holds: one team, requested model, status, PII flag (True: flagged
    only, False: unflagged only), and finish times in [since, until) (UTC when they carry
    no offset); None keeps all."""

    team: str | None = None
    model: str | None = None
    status: JobStatus | None = None
    pii: bool | None = None
    since: datetime | None = None
    until: datetime | None = None


@dataclass(frozen=True)
class AuditEntry:
    """One finished job's usage row."""

    id: int
    job_id: str
    team: str
    ts: datetime
    """When the job finished."""
    model_requested: str
    model_used: str | None
    provider: str | None
    deployment: str | None
    status: JobStatus
    error_code: str | None
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    cost_usd: Decimal
    queued_ms: float
    latency_ms: float
    attempts: int
    fallback_used: bool
    cached: bool
    identity: str | None
    """The proven publisher: ``broker:<user>``, ``api_key:<key id>``, ``queue``..."""
    pii: list[str]
    """PII families found in the prompt (warn and redact policies); empty when none."""
    captured: bool
    """Whether its prompt and response are kept (``audit_content``)."""


@dataclass(frozen=True)
class AuditPage:
    entries: list[AuditEntry] = field(default_factory=list)
    next_cursor: str | None = None
    """Pass it as ``cursor`` for the next page; None on the last page."""
    next_offset: int | None = None
    """The ``offset`` of the next page; None on the last page or past ``MAX_OFFSET``."""


# The page's ids first, from the columns an index holds (see migration 0008), then its rows.
_SELECT = """
WITH page AS (
    SELECT u.id, u.ts FROM usage_log u{where}
    ORDER BY u.ts DESC, u.id DESC LIMIT {limit} OFFSET {offset}
)
SELECT u.id, u.job_id, u.team, u.ts, u.model_requested, u.model_used, u.provider,
       u.deployment, u.status, u.error_code, u.input_tokens, u.output_tokens, u.cached_tokens,
       u.cost_usd, u.queued_ms, u.latency_ms, u.attempts, u.fallback_used, u.cached,
       u.identity, u.pii,
       EXISTS (SELECT 1 FROM audit_content c WHERE c.team = u.team AND c.job_id = u.job_id)
           AS captured
FROM page JOIN usage_log u ON u.id = page.id
ORDER BY page.ts DESC, page.id DESC"""


async def audit_page(
    pool: asyncpg.Pool,
    where: AuditFilter = AuditFilter(),
    *,
    limit: int = 50,
    offset: int = 0,
    cursor: str | None = None,
) -> AuditPage:
    """The usage rows ``where`` keeps, newest first: ``limit`` of them after skipping
    ``offset``, from the row after ``cursor`` (a page's ``next_cursor``) when given.
    UnknownTeam when ``where`` names a team that is not registered."""
    sql, args = page_query(where, limit=limit, offset=offset, cursor=cursor)
    if where.team is not None:
        await known_team(pool, where.team)
    rows: list[Any] = await pool.fetch(sql, *args)
    entries = [_entry(row) for row in rows[:limit]]
    if len(rows) <= limit:
        return AuditPage(entries)
    following = offset + limit
    return AuditPage(
        entries,
        next_cursor=make_cursor(entries[-1].ts, entries[-1].id),
        next_offset=following if following <= MAX_OFFSET else None,
    )


def page_query(
    where: AuditFilter, *, limit: int, offset: int, cursor: str | None
) -> tuple[str, list[Any]]:
    """The statement of a page and its arguments; it asks for one row more than ``limit``,
    which tells whether a next page exists. Only the conditions of the filters given are in
    it, so the planner picks the index that serves them."""
    if not 1 <= limit <= MAX_LIMIT:
        raise ConfigError(f"limit {limit} is out of range: ask for 1 to {MAX_LIMIT} rows")
    if not 0 <= offset <= MAX_OFFSET:
        raise ConfigError(
            f"offset {offset} is out of range (0 to {MAX_OFFSET:,}): page deeper with the "
            "next_cursor of the page before"
        )
    args: list[Any] = []

    def bind(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    conditions = []
    if where.team is not None:
        conditions.append(f"u.team = {bind(check_team_name(where.team))}")
    if where.model is not None:
        conditions.append(f"u.model_requested = {bind(plain_text('model', where.model))}")
    if where.status is not None:
        # Literal text, not a parameter: the planner then picks the partial indexes on errors.
        conditions.append(f"u.status = '{'error' if where.status == 'error' else 'ok'}'")
    if where.pii is not None:
        conditions.append(f"u.pii IS {'NOT NULL' if where.pii else 'NULL'}")
    if where.since is not None:
        conditions.append(f"u.ts >= {bind(utc_moment('since', where.since))}")
    if where.until is not None:
        conditions.append(f"u.ts < {bind(utc_moment('until', where.until))}")
    if cursor is not None:
        ts, row_id = parse_cursor(cursor)
        # ts <= is what the indexes serve; the rest orders rows that finished at the same time.
        at, after = bind(ts), bind(row_id)
        conditions.append(f"u.ts <= {at} AND (u.ts < {at} OR u.id < {after})")
    where_sql = "\n    WHERE " + " AND ".join(conditions) if conditions else ""
    sql = _SELECT.format(where=where_sql, limit=bind(limit + 1), offset=bind(offset))
    return sql, args


def _entry(row: Any) -> AuditEntry:
    record = dict(row)
    record["pii"] = record["pii"].split(",") if record["pii"] else []
    return AuditEntry(**record)


def make_cursor(ts: datetime, row_id: int) -> str:
    """Where the page after the row of ``ts`` and ``row_id`` starts: its finish time (µs
    since the epoch) and id."""
    return f"{(ts - _EPOCH) // _MICROSECOND}-{row_id}"


def parse_cursor(cursor: str) -> tuple[datetime, int]:
    """The finish time and id a ``make_cursor`` cursor holds; ConfigError for another text."""
    match = _CURSOR.match(cursor)
    try:
        if match is None:
            raise ValueError(cursor)
        return _EPOCH + int(match[1]) * _MICROSECOND, int(match[2])
    except (ValueError, OverflowError):
        raise ConfigError(
            f"cursor {clipped(cursor)!r} is not one of ours: pass a page's next_cursor"
        ) from None


_AGE = re.compile(r"^(\d+)([dhm])$")
_UNITS = {"d": "days", "h": "hours", "m": "minutes"}


MAX_AGE = timedelta(days=36_500)
"""The oldest age ``parse_age`` takes (100 years): PostgreSQL's timestamps end where now()
minus far larger ones would fall (``timestamp out of range``)."""


def parse_age(text: str) -> timedelta:
    """``90d``, ``12h`` or ``30m`` as a timedelta."""
    match = _AGE.match(text.strip())
    if match is None:
        raise ConfigError(f"{clipped(text)!r} is not an age: use a number and d, h or m, e.g. 90d")
    try:
        age = timedelta(**{_UNITS[match[2]]: int(match[1])})
    except OverflowError:  # past timedelta's own range: older than MAX_AGE too
        age = timedelta.max
    if age > MAX_AGE:
        raise ConfigError(
            f"{clipped(text)!r} is older than anything kept: give at most {MAX_AGE.days}d"
        )
    return age


async def prune_content(pool: asyncpg.Pool, older_than: timedelta) -> int:
    """Delete captured content of jobs finished more than ``older_than`` ago; return how many."""
    status: str = await pool.execute(
        "DELETE FROM audit_content WHERE ts < now() - $1::interval", older_than
    )
    return int(status.rsplit(" ", 1)[1])
