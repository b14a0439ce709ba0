"""Versioned SQL migrations: ``migrations/NNNN_name.sql``, each applied once, in order.

Every migration runs in its own transaction that first takes the schema's advisory lock and
then checks ``schema_migrations``, so two processes starting at once apply it exactly once:
the second waits for the lock, then finds the version recorded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

from queuegate.db import lock_schema, quote_ident

_FILE_NAME = re.compile(r"^(\d{4})_(\w+)\.sql$")

_CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    text PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    sql: str


def available_migrations() -> list[Migration]:
    """The migrations shipped in the package, oldest first."""
    found = []
    for entry in (resources.files("accounting") / "migrations").iterdir():
        match = _FILE_NAME.match(entry.name)
        if match:
            found.append(Migration(match[1], match[2], entry.read_text(encoding="utf-8")))
    return sorted(found, key=lambda migration: migration.version)


async def migrate(pool_or_conn: asyncpg.Pool | asyncpg.Connection, schema: str) -> list[str]:
    """Apply the migrations ``schema`` lacks; return their versions (empty when up to date)."""
    if isinstance(pool_or_conn, asyncpg.Pool):
        async with pool_or_conn.acquire() as conn:
            return await _migrate(conn, schema)
    return await _migrate(pool_or_conn, schema)


async def _migrate(conn: asyncpg.Connection, schema: str) -> list[str]:
    applied = []
    for migration in available_migrations():
        async with conn.transaction():
            await lock_schema(conn, schema)
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema)}")
            # The migration lands in `schema` whatever search_path the connection came with.
            await conn.execute(f"SET LOCAL search_path TO {quote_ident(schema)}")
            await conn.execute(_CREATE_LEDGER)
            if await conn.fetchval(
                "SELECT true FROM schema_migrations WHERE version = $1", migration.version
            ):
                continue
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                migration.version,
                migration.name,
            )
        applied.append(migration.version)
    return applied
