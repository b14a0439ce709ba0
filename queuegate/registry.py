"""The team registry: which teams exist, whether they are enabled, and their ``TeamConfig``.

Held in PostgreSQL's ``teams`` table (``config`` is jsonb). Workers read it every few
seconds, so a team added or changed with ``queuegate teams add|set`` is served under its new
settings without a restart; a config changed is also told to them and to the front doors at
once (``queuegate.registry_changes``). The table itself is created by accounting's migrations.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Annotated, Any

import asyncpg
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from queuegate.db import TooDeep
from queuegate.errors import ConfigError
from queuegate.messages import MAX_OUTPUT_TOKENS, UnsupportedParams
from queuegate.numbers import Money
from queuegate.registry_changes import NOTIFY, notifying
from queuegate.visible import clipped

log = logging.getLogger(__name__)

TEAM_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
"""Matched whole (``fullmatch``): ``$`` would let a trailing newline through."""

BURST_SECONDS = 5
"""Seconds of its rpm a team bucket holds unless its ``burst`` says otherwise: a provider
counts its limit over any minute, so a bucket holding a full minute would let twice the
limit through a window that starts on a full bucket (after a start or a long idle)."""


MAX_PER_MINUTE = 10**12
"""The most an rpm, tpm or burst may be: far above any provider's limit, and far below 2^53,
the largest whole number the buckets' Lua (doubles) counts exactly."""
MAX_BUDGET_USD = Decimal(10**9)
"""The largest budget: larger is a typo, and would not fit the ledgers' or reports' numbers."""
BUDGET_PLACES = 10
"""Decimals a budget may have: usage_log's ``cost_usd`` keeps as many."""
MAX_COUNT = 10**9
"""The most jobs a queue, or connections and channels a broker user, may be allowed."""
MAX_BYTES = 2**50
"""The most bytes (1 PiB) a queue or a team's file storage may be allowed."""

Rate = Annotated[int, Field(ge=1, le=MAX_PER_MINUTE)]
Budget = Annotated[
    Money,
    Field(ge=0, le=MAX_BUDGET_USD, decimal_places=BUDGET_PLACES),
    # "-0" passes ge=0 but was stored as "-0", which the reports' SQL read as no budget while
    # workers refused every job against $0.
    AfterValidator(Decimal.copy_abs),
]


def default_burst(rpm: int) -> int:
    """Requests a bucket of ``rpm`` holds by default: ``BURST_SECONDS`` of the rate, at least 1."""
    return max(1, rpm * BURST_SECONDS // 60)


RESERVED_NAMES = frozenset(
    {"jobs", "results", "replies", "control", "usage", "accounting", "dead", "frontdoor", "in"}
)
"""The namespace's own words (``<ns>.<word>...``): no team is named after one, so no team's
broker user (``<ns>.<team>``) or routing key reads as one of the gateway's names."""


def check_team_name(name: str) -> str:
    """``name``, if a team may be named so; ConfigError saying why not otherwise (a row
    written with SQL under one of the gateway's own names is skipped as any bad row is: served,
    ``dead`` was a team whose queues were ``<ns>.jobs.dead`` and ``<ns>.dead.dead``)."""
    if not TEAM_NAME.fullmatch(name):
        raise ConfigError(
            f"team name {clipped(name)!r} is invalid: use 1-64 lowercase letters, digits, '-' "
            "or '_', starting with a letter or digit"
        )
    if name in RESERVED_NAMES:
        raise ConfigError(
            f"team name {name!r} is one of the gateway's own names "
            f"({', '.join(sorted(RESERVED_NAMES))}): pick another; a registry row of that "
            f"name is never served: delete it (DELETE FROM teams WHERE name = '{name}')"
        )
    return name


class ModelLimits(BaseModel):
    """A team's own limits on one model alias, on top of its team-wide ones."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rpm: Rate | None = None
    tpm: Rate | None = None
    burst: Rate | None = None
    """Requests its bucket holds; ``default_burst(rpm)`` when unset."""
    budget_usd: Budget | None = None
    """Monthly cap on what the team spends on this alias (requested, fallbacks included)."""


class TeamConfig(BaseModel):
    """A team's limits, budget and quota; every field optional, ``{}`` means no limits.

    Flat on purpose: a new concern adds its fields here. Unknown fields are ignored on read,
    so a config written by a newer gateway never stops an older worker from serving the team.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    rpm: Rate | None = None
    """Requests per minute across all the team's models."""
    tpm: Rate | None = None
    """Tokens (prompt + output) per minute across all the team's models."""
    burst: Rate | None = None
    """Requests the team's bucket holds, so at most ``rpm + burst`` start in any 60 s;
    ``default_burst(rpm)`` (five seconds of the rate) when unset."""
    models: dict[str, ModelLimits] = Field(default_factory=dict)
    """Per-alias limits and budget caps."""
    budget_usd: Budget | None = None
    """Monthly budget (UTC calendar month); jobs beyond it are answered ``budget_exhausted``."""
    alert_threshold: float = Field(default=0.8, gt=0, le=1)
    """Fraction of the budget whose crossing emits one alert per month."""
    max_queue_length: int | None = Field(default=None, ge=1, le=MAX_COUNT)
    """Jobs the team's queue holds before the broker refuses more (the producer's QueueFull)."""
    max_queue_bytes: int | None = Field(default=None, ge=1024, le=MAX_BYTES)
    """Bytes of job bodies the team's queue holds before the broker refuses more (the
    producer's QueueFull); the gateway default (``QUEUEGATE_MAX_QUEUE_BYTES``) if unset."""
    expected_output_tokens: int | None = Field(default=None, ge=1, le=MAX_OUTPUT_TOKENS)
    """Output tokens reserved for a job without ``max_tokens``; the gateway default if unset."""
    cache: bool = False
    """Whether the team's jobs use the response cache when they do not say (``ChatJob.cache``)."""
    max_connections: int | None = Field(default=None, ge=1, le=MAX_COUNT)
    """Connections the team's broker user may hold at once; the gateway default if unset."""
    max_channels: int | None = Field(default=None, ge=1, le=MAX_COUNT)
    """Channels the team's broker user may hold at once, over all its connections."""
    file_storage_bytes: int | None = Field(default=None, ge=0, le=MAX_BYTES)
    """Bytes of files the team may keep stored for its batches over HTTP; the gateway
    default if unset."""
    unsupported_params: UnsupportedParams | None = None
    """Refuse or drop job parameters a provider cannot take, over the catalog's policy (a
    job's own ``unsupported_params`` wins); unset, the catalog's."""


@dataclass(frozen=True)
class Team:
    name: str
    enabled: bool
    config: TeamConfig = field(default_factory=TeamConfig)


_JSON_KINDS = {
    list: "a JSON array",
    str: "a JSON string",
    bool: "a JSON boolean",
    TooDeep: "JSON nested too deep to read",
}


def unreadable(raw: Any) -> str | None:
    """What a stored config is when it is no JSON object (an array written with SQL), so that
    none of its fields can be read; None for an object (or empty: no limits)."""
    if isinstance(raw or {}, dict):
        return None
    return _JSON_KINDS.get(type(raw), "a JSON number")


def parse_config(name: str, raw: Any) -> TeamConfig:
    kind = unreadable(raw)
    if kind is not None:
        raise ConfigError(f"team {name!r} has an invalid config: it is {kind}, not an object")
    try:
        return TeamConfig.model_validate(raw or {})
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        raise ConfigError(f"team {name!r} has an invalid config: {field}: {first['msg']}") from exc


def _log_invalid(name: str, error: ConfigError) -> None:
    log.warning("team registry row %r skipped: %s", name, error)


Change = int
"""A registry write: the id of the PostgreSQL transaction that made it (``pg_current_xact_id``),
which a read's ``Version`` sees or not (``sees``)."""
_CHANGE = "pg_current_xact_id()::text"
"""SQL for the ``Change`` a write is (as text: asyncpg reads no xid8)."""
Version = str
"""What a registry read saw: the PostgreSQL snapshot it was taken in (``pg_current_snapshot``,
``xmin:xmax:xip,...``). A worker records the version it serves under, so that ``teams set``
can tell when every worker applies its change."""


def sees(version: Version, change: Change) -> bool:
    """Whether a read at ``version`` saw ``change``, a write that committed (PostgreSQL's
    ``pg_visible_in_snapshot``): one before the snapshot's ``xmin``, or before its ``xmax``
    and not in progress then."""
    xmin, xmax, in_progress = version.split(":")
    if change < int(xmin):
        return True
    return change < int(xmax) and str(change) not in in_progress.split(",")


@dataclass(frozen=True)
class Registry:
    teams: list[Team]
    version: Version


async def read_registry(
    pool: asyncpg.Pool,
    *,
    enabled_only: bool = False,
    on_invalid: Callable[[str, ConfigError], None] = _log_invalid,
) -> Registry:
    """The teams, by name, and the version they were read at. A row with an invalid name or
    config (written around ``teams add`` and ``teams set``, or by an older version) is left
    out and reported to ``on_invalid``: one bad row never keeps the others from being served."""
    # One snapshot for both statements (repeatable read): the version is the rows'.
    async with (
        pool.acquire() as connection,
        connection.transaction(isolation="repeatable_read", readonly=True),
    ):
        version: str = await connection.fetchval("SELECT pg_current_snapshot()::text")
        rows: list[Any] = await connection.fetch(
            "SELECT name, enabled, config FROM teams WHERE enabled OR NOT $1 ORDER BY name",
            enabled_only,
        )
    teams: list[Team] = []
    for row in rows:
        try:
            name = check_team_name(row["name"])
            teams.append(Team(name, row["enabled"], parse_config(name, row["config"])))
        except ConfigError as exc:
            on_invalid(row["name"], exc)
    return Registry(teams, version)


async def list_teams(
    pool: asyncpg.Pool,
    *,
    enabled_only: bool = False,
    on_invalid: Callable[[str, ConfigError], None] = _log_invalid,
) -> list[Team]:
    """``read_registry``'s teams."""
    registry = await read_registry(pool, enabled_only=enabled_only, on_invalid=on_invalid)
    return registry.teams


async def get_team(pool: asyncpg.Pool, name: str) -> Team | None:
    check_team_name(name)
    row: Any = await pool.fetchrow("SELECT name, enabled, config FROM teams WHERE name = $1", name)
    if row is None:
        return None
    return Team(name=row["name"], enabled=row["enabled"], config=parse_config(name, row["config"]))


async def team_exists(db: asyncpg.Pool | asyncpg.Connection, name: str) -> bool:
    """Whether the registry has a row for the team, whatever its config holds."""
    found: bool = await db.fetchval(
        "SELECT EXISTS (SELECT 1 FROM teams WHERE name = $1)", check_team_name(name)
    )
    return found


async def unregistered(db: asyncpg.Pool | asyncpg.Connection, names: Sequence[str]) -> list[str]:
    """Those of ``names`` the registry has no row for, in their order: one query for all."""
    found = await db.fetch(
        "SELECT name FROM teams WHERE name = ANY($1::text[])",
        [check_team_name(name) for name in names],
    )
    registered = {row["name"] for row in found}
    return [name for name in names if name not in registered]


@dataclass(frozen=True)
class StoredConfig:
    """A team's config as stored, unchecked, for ``teams set`` to repair a row
    ``parse_config`` refuses: one written before a bound existed, or with SQL."""

    fields: dict[str, Any]
    """Its fields; none when it is no JSON object."""
    unreadable: str | None
    """What it is when it is no JSON object (``unreadable``): a write replaces it whole."""


async def stored_config(pool: asyncpg.Pool, name: str) -> StoredConfig | None:
    """The team's config as stored (None: no such team)."""
    row: Any = await pool.fetchrow(
        "SELECT config FROM teams WHERE name = $1", check_team_name(name)
    )
    if row is None:
        return None
    kind = unreadable(row["config"])
    return StoredConfig({} if kind else dict(row["config"] or {}), kind)


async def set_team_config(
    pool: asyncpg.Pool,
    name: str,
    config: TeamConfig,
    *,
    before_commit: Callable[[], Awaitable[None]] | None = None,
) -> Change | None:
    """Write the team's config; the write, or None when there is no such team.

    Merged into the stored one, so fields this version does not know (written by a newer
    gateway) are kept; a field set to None is removed; a stored config that is no JSON object
    is replaced. ``before_commit`` runs last in the transaction, so that what it fails to do
    elsewhere (the broker's side of the config) leaves the row as it was. Running workers and
    front doors are told when it commits (``queuegate.registry_changes``): a budget lowered
    holds at once.
    """
    check_team_name(name)
    async with pool.acquire() as connection, connection.transaction():
        # Read as the gateway reads it: an object nested too deep to read is replaced too.
        stored = await connection.fetchval(
            "SELECT config FROM teams WHERE name = $1 FOR UPDATE", name
        )
        change = await connection.fetchval(
            "UPDATE teams SET config = jsonb_strip_nulls("
            "CASE WHEN $3 THEN '{}' ELSE config END || $2::jsonb),"
            f" updated_at = now() WHERE name = $1 RETURNING {_CHANGE}",
            name,
            config.model_dump(mode="json"),
            unreadable(stored) is not None,
        )
        if change is not None:
            await connection.execute(NOTIFY, name)
            if before_commit is not None:
                await before_commit()
    return None if change is None else int(change)


async def add_team(executor: asyncpg.Pool | asyncpg.Connection, name: str) -> Change:
    """Add the team, or enable it again; the write. Running processes are told with the
    insert, which on a caller's transaction PostgreSQL delivers only when it commits."""
    change: str = await executor.fetchval(
        notifying(
            "INSERT INTO teams (name) VALUES ($1)"
            " ON CONFLICT (name) DO UPDATE SET enabled = true, updated_at = now()"
            f" RETURNING {_CHANGE} AS change"
        ),
        check_team_name(name),
    )
    return int(change)


async def disable_team(pool: asyncpg.Pool, name: str) -> Change | None:
    """Disable the team; the write, or None when there is no such team. Running workers and
    front doors are told once it is written, so it is refused at once rather than at their
    next re-read."""
    change = await pool.fetchval(
        notifying(
            "UPDATE teams SET enabled = false, updated_at = now() WHERE name = $1"
            f" RETURNING {_CHANGE} AS change"
        ),
        name,
    )
    return None if change is None else int(change)
