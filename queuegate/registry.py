"""The team registry: which teams exist and are enabled, held in PostgreSQL's ``teams`` table.

Workers read it every few seconds, so a team added with ``queuegate teams add`` is served
without a restart. The table itself is created by accounting's migrations.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import asyncpg

from queuegate.errors import ConfigError

TEAM_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


def check_team_name(name: str) -> str:
    if not TEAM_NAME.match(name):
        raise ConfigError(
            f"team name {name!r} is invalid: use 1-64 lowercase letters, digits, '-' or '_'"
        )
    return name


@dataclass(frozen=True)
class Team:
    name: str
    enabled: bool


async def list_teams(pool: asyncpg.Pool, *, enabled_only: bool = False) -> list[Team]:
    rows: list[Any] = await pool.fetch(
        "SELECT name, enabled FROM teams WHERE enabled OR NOT $1 ORDER BY name", enabled_only
    )
    return [Team(name=row["name"], enabled=row["enabled"]) for row in rows]


async def add_team(pool: asyncpg.Pool, name: str) -> None:
    await pool.execute(
        "INSERT INTO teams (name) VALUES ($1)"
        " ON CONFLICT (name) DO UPDATE SET enabled = true, updated_at = now()",
        check_team_name(name),
    )


async def disable_team(pool: asyncpg.Pool, name: str) -> bool:
    status: str = await pool.execute(
        "UPDATE teams SET enabled = false, updated_at = now() WHERE name = $1", name
    )
    return status.endswith(" 1")
