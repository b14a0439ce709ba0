"""The checks every report filter passes before it reaches PostgreSQL, shared by the command
line, the admin API and the dashboard: what PostgreSQL would refuse (a NUL byte in a text, a
time whose UTC instant no datetime holds) is the caller's mistake, said as such."""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg

from queuegate.errors import ConfigError, UnknownTeam
from queuegate.messages import storable_problem
from queuegate.registry import get_team


def plain_text(name: str, value: str | None) -> str | None:
    """``value`` unchanged; ConfigError when it holds what no stored text has (a NUL byte)."""
    problem = None if value is None else storable_problem(value)
    if problem is not None:
        raise ConfigError(f"{name}: {problem}")
    return value


def utc_moment(name: str, moment: datetime | None) -> datetime | None:
    """``moment`` in UTC (taken as UTC when it carries no offset); ConfigError when its UTC
    instant falls outside years 1 to 9999."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise ConfigError(
            f"{name}: {moment.isoformat()} is out of range: its UTC time falls outside years "
            "1 to 9999"
        ) from None


async def known_team(pool: asyncpg.Pool, name: str) -> str:
    """``name``, a registered team; UnknownTeam otherwise, so a mistyped team filter is said
    to be one rather than answered with an empty report."""
    if await get_team(pool, name) is None:
        raise UnknownTeam(name)
    return name
