"""API keys: a team's (any identity mode), and administrators' for cross-team admin calls.

A key is shown once, when issued; only its SHA-256 is stored (``api_keys``, ``admin_keys``),
so ``lookup_key`` finds whose a presented key is by its hash, in one indexed query.

A team's keys prove its jobs on the queue when its identity is ``api_key``
(``queuegate.signing``); whatever its identity, they authenticate it to the HTTP front door.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from queuegate.errors import ConfigError
from queuegate.keys import Keys
from queuegate.redis_client import text
from queuegate.registry import team_exists
from queuegate.tenancy import (
    ADMIN_KEY_PREFIX,
    add_api_key,
    hash_api_key,
    new_api_key,
    revoke_api_keys,
)

LABEL_MAX = 200


@dataclass(frozen=True)
class IssuedKey:
    """A new key: ``key`` is shown once and stored nowhere."""

    key_id: str
    key: str


@dataclass(frozen=True)
class KeyInfo:
    """A key as listed: never the key, nor its hash."""

    key_id: str
    created_at: datetime
    revoked_at: datetime | None
    label: str = ""
    """What an admin key is for (team keys have none)."""


@dataclass(frozen=True)
class KeyOwner:
    """Whose a presented key is: a team's, or an administrator's (``team`` None)."""

    team: str | None
    key_id: str
    key_hash: str

    @property
    def is_admin(self) -> bool:
        return self.team is None


@dataclass(frozen=True)
class DisabledTeamKey:
    """A team's live key while the team is disabled: a real key, that serves nothing."""

    team: str


async def add_team_key(pool: asyncpg.Pool, team: str) -> IssuedKey:
    """A new key for the team, whatever its identity mode; its other keys stay live."""
    await _existing(pool, team)
    key_id, key = await add_api_key(pool, team)
    return IssuedKey(key_id, key)


async def team_keys(pool: asyncpg.Pool, team: str) -> list[KeyInfo]:
    """The team's keys, live and revoked, oldest first."""
    await _existing(pool, team)
    rows: list[Any] = await pool.fetch(
        "SELECT id, created_at, revoked_at FROM api_keys WHERE team = $1 ORDER BY created_at, id",
        team,
    )
    return [KeyInfo(row["id"], row["created_at"], row["revoked_at"]) for row in rows]


async def revoke_team_key(pool: asyncpg.Pool, team: str, key_id: str) -> bool:
    """Revoke one live key of the team; False when it has no such live key."""
    return await revoke_api_keys(pool, team, key_id=key_id) == 1


async def end_dashboard_sessions(client: aioredis.Redis, keys: Keys, key_ids: list[str]) -> None:
    """End every dashboard session the keys ``key_ids`` opened, through each key's index of
    its sessions (``Keys.dashboard_sessions``): for a team disabled, whose keys would be live
    again once it is enabled, and whose sessions must not be. Two round trips, however many
    keys: one reads every index, one deletes the sessions and the indexes."""
    if not key_ids:
        return
    indexes = [keys.dashboard_sessions(key_id) for key_id in key_ids]
    async with client.pipeline(transaction=False) as pipe:
        for index in indexes:
            pipe.zrange(index, 0, -1)
        opened: list[list[bytes]] = await pipe.execute()
    sessions = [keys.dashboard_session(text(session_id)) for ids in opened for session_id in ids]
    await client.delete(*sessions, *indexes)


DASHBOARD_SESSION_TTL = 8 * 3600
"""Seconds a dashboard session lives after its sign-in."""


async def dashboard_generation(client: aioredis.Redis, keys: Keys, team: str) -> str:
    """The current generation of the team's dashboard sessions, drawn when there is none,
    kept a session's lifetime from now, so it outlives every session made
    with it. A session takes it before its key is found live again and holds it: a disable
    racing the sign-in draws a new one once the team is disabled, so the session is dead
    however the race went. A generation lost (expired, or Redis lost it) is no generation:
    it ends its sessions rather than reviving any."""
    generation = keys.dashboard_generation(team)
    async with client.pipeline(transaction=True) as pipe:
        pipe.set(generation, secrets.token_hex(16), nx=True)
        pipe.expire(generation, DASHBOARD_SESSION_TTL)
        pipe.get(generation)
        *_, current = await pipe.execute()
    return text(current)


async def new_dashboard_generation(client: aioredis.Redis, keys: Keys, team: str) -> None:
    """End every dashboard session the team has, made or being made: each holds the
    generation this replaces."""
    await client.set(
        keys.dashboard_generation(team), secrets.token_hex(16), ex=DASHBOARD_SESSION_TTL
    )


async def issue_admin_key(pool: asyncpg.Pool, label: str = "") -> IssuedKey:
    """A new administrator key, allowed every team's admin calls."""
    if len(label) > LABEL_MAX:
        raise ConfigError(f"the label is {len(label)} characters: keep it to {LABEL_MAX}")
    key_id, key = new_api_key(ADMIN_KEY_PREFIX)
    await pool.execute(
        "INSERT INTO admin_keys (id, key_hash, label) VALUES ($1, $2, $3)",
        key_id,
        hash_api_key(key),
        label,
    )
    return IssuedKey(key_id, key)


async def admin_keys(pool: asyncpg.Pool) -> list[KeyInfo]:
    """Every administrator key, live and revoked, oldest first."""
    rows: list[Any] = await pool.fetch(
        "SELECT id, created_at, revoked_at, label FROM admin_keys ORDER BY created_at, id"
    )
    return [KeyInfo(row["id"], row["created_at"], row["revoked_at"], row["label"]) for row in rows]


async def revoke_admin_key(pool: asyncpg.Pool, key_id: str) -> bool:
    """Revoke a live administrator key; False when there is no such live key."""
    status: str = await pool.execute(
        "UPDATE admin_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL", key_id
    )
    return status == "UPDATE 1"


# A team's key counts only while its team is enabled: a disabled team is served nowhere.
# Its keys are still found, so that one is told apart from a wrong key.
_LOOKUP = """
SELECT k.team, k.id, k.key_hash, t.enabled FROM api_keys k JOIN teams t ON t.name = k.team
WHERE k.{column} = $1 AND k.revoked_at IS NULL
UNION ALL
SELECT NULL, a.id, a.key_hash, true FROM admin_keys a
WHERE a.{column} = $1 AND a.revoked_at IS NULL
LIMIT 1
"""
_BY_HASH = _LOOKUP.format(column="key_hash")
_BY_ID = _LOOKUP.format(column="id")


async def lookup_key(pool: asyncpg.Pool, key: str) -> KeyOwner | DisabledTeamKey | None:
    """Whose the presented ``key`` is, by its hash; ``DisabledTeamKey`` when it is a team's
    live key but the team is disabled; None when it is unknown or revoked."""
    row = await pool.fetchrow(_BY_HASH, hash_api_key(key))
    if row is not None and not row["enabled"]:
        return DisabledTeamKey(row["team"])
    return _owner(row)


async def live_key_owner(pool: asyncpg.Pool, key_id: str) -> KeyOwner | None:
    """Whose the key ``key_id`` is while ``lookup_key`` would still accept it; None once it
    is revoked or its team disabled."""
    return _owner(await pool.fetchrow(_BY_ID, key_id))


def _owner(row: Any) -> KeyOwner | None:
    if row is None or not row["enabled"]:
        return None
    return KeyOwner(row["team"], row["id"], row["key_hash"])


async def _existing(pool: asyncpg.Pool, team: str) -> None:
    if not await team_exists(pool, team):
        raise ConfigError(f"no team named {team}: list them with queuegate teams list")
