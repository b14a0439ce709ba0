"""Files of the HTTP APIs, kept in PostgreSQL (``api_files``, ``api_file_parts``).

Why PostgreSQL, not Redis or a directory: a batch's input must outlive the request that
uploaded it and its output the process that wrote it, and any front-door process (there are
several, and one may take a batch over from another that stopped) must read both. A commit
is durable and seen by all of them; Redis may lose its data (the gateway plans for it) and
keeps everything in memory; a directory would have to be a volume shared by every process.
A file is stored in parts of ``PART_BYTES``, so an upload, a batch's output and a download
each hold one part in memory at a time.

Every query is by team: a file of another team is not found, whatever its id. The bytes a
team keeps stored, every purpose counted (its batches' outputs too), are bounded by its
storage quota: a file that would take them past it is not stored, so no key fills the disk
every team's accounting shares.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterable, AsyncIterator, Collection
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from queuegate.registry import get_team

PART_BYTES = 1 << 20
"""Bytes per stored part of an uploaded file."""

UPLOADED = "batch"
"""The purpose of an uploaded batch input, the one purpose ``POST /v1/files`` takes."""
OPENAI_PURPOSES = ("batch", "batch_output")
"""What the Files API shows; the Message Batches API's own files stay out of its lists."""


class TooLarge(Exception):
    """A file is larger than the limit it is stored under."""


class OverQuota(Exception):
    """A file would take its team's stored files past the team's storage quota."""

    def __init__(self, team: str, used: int, quota: int) -> None:
        super().__init__(f"team {team} keeps {used:,} bytes of files, its quota is {quota:,}")
        self.team = team
        self.used = used
        self.quota = quota


@dataclass(frozen=True)
class StoredFile:
    id: str
    team: str
    purpose: str
    filename: str
    bytes: int
    created_at: datetime


_COLUMNS = "id, team, purpose, filename, bytes, created_at"


def new_file_id() -> str:
    return f"file-{secrets.token_hex(12)}"


def _file(row: asyncpg.Record) -> StoredFile:
    return StoredFile(
        row["id"], row["team"], row["purpose"], row["filename"], row["bytes"], row["created_at"]
    )


async def store_file(
    pool: asyncpg.Pool,
    *,
    team: str,
    purpose: str,
    filename: str,
    chunks: AsyncIterable[bytes],
    max_bytes: int,
    quota: int,
) -> StoredFile:
    """Store what ``chunks`` yields as a new file, in one transaction: a file is there
    whole or not at all. TooLarge past ``max_bytes``, OverQuota when the team's files would
    then be over ``quota`` bytes, and nothing is kept."""
    file_id = new_file_id()
    async with pool.acquire() as conn, conn.transaction():
        # Read before: a file that cannot fit is stopped as its bytes arrive, unwritten.
        used = await _stored_bytes(conn, team)
        if used >= quota:
            raise OverQuota(team, used, quota)
        await conn.execute(
            "INSERT INTO api_files (id, team, purpose, filename) VALUES ($1, $2, $3, $4)",
            file_id,
            team,
            purpose,
            filename,
        )
        size = 0
        async for part in _parts(chunks):
            size += len(part)
            if size > max_bytes:
                raise TooLarge(f"the file is over {max_bytes:,} bytes")
            if used + size > quota:
                raise OverQuota(team, used, quota)
            await append_part(conn, file_id, part)
        # Counted again under the team's lock, held only until this commits: the files
        # another upload of the team committed meanwhile count, so two at once never pass
        # the quota together (while nothing waits on a lock as the bytes arrive).
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext(current_schema() || '.files.' || $1))", team
        )
        total = await _stored_bytes(conn, team)
        if total > quota:
            raise OverQuota(team, total - size, quota)
        row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM api_files WHERE id = $1", file_id)
    return _file(row)


async def check_room(pool: asyncpg.Pool, team: str, quota: int) -> None:
    """OverQuota when the team's stored files are already at or over ``quota`` bytes.

    For a new batch: its output is always written and counted, so one started over the
    quota would take the team further past it; refused here, the excess is bounded by the
    batches the team had in flight when it reached the quota."""
    async with pool.acquire() as conn:
        used = await _stored_bytes(conn, team)
    if used >= quota:
        raise OverQuota(team, used, quota)


async def _stored_bytes(conn: asyncpg.Connection, team: str) -> int:
    """Bytes of the team's files, as the caller's transaction sees them."""
    used: int = await conn.fetchval(
        "SELECT coalesce(sum(bytes), 0)::bigint FROM api_files WHERE team = $1", team
    )
    return used


async def storage_quota(pool: asyncpg.Pool, team: str, default: int) -> int:
    """Bytes of files the team may keep: its own ``file_storage_bytes``, else ``default``."""
    found = await get_team(pool, team)
    own = None if found is None else found.config.file_storage_bytes
    return default if own is None else own


async def _parts(chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """``chunks`` regrouped into parts of ``PART_BYTES`` (the last one shorter)."""
    pending = bytearray()
    async for chunk in chunks:
        pending += chunk
        while len(pending) >= PART_BYTES:
            yield bytes(pending[:PART_BYTES])
            del pending[:PART_BYTES]
    if pending:
        yield bytes(pending)


async def append_part(conn: asyncpg.Connection, file_id: str, data: bytes) -> None:
    """Add ``data`` at the end of a file, inside the caller's transaction."""
    await conn.execute(
        """
        INSERT INTO api_file_parts (file_id, seq, data)
        SELECT $1, coalesce(max(seq) + 1, 0), $2 FROM api_file_parts WHERE file_id = $1
        """,
        file_id,
        data,
    )
    await conn.execute("UPDATE api_files SET bytes = bytes + $2 WHERE id = $1", file_id, len(data))


async def new_result_file(
    conn: asyncpg.Connection, *, team: str, purpose: str, filename: str
) -> str:
    """A file a batch will write its results to, hidden until ``show_files``."""
    file_id = new_file_id()
    await conn.execute(
        "INSERT INTO api_files (id, team, purpose, filename, ready) VALUES ($1, $2, $3, $4, false)",
        file_id,
        team,
        purpose,
        filename,
    )
    return file_id


async def show_files(conn: asyncpg.Connection, file_ids: Collection[str]) -> None:
    await conn.execute("UPDATE api_files SET ready = true WHERE id = any($1::text[])", file_ids)


async def get_file(
    pool: asyncpg.Pool, team: str, file_id: str, purposes: Collection[str] = OPENAI_PURPOSES
) -> StoredFile | None:
    row = await pool.fetchrow(
        f"SELECT {_COLUMNS} FROM api_files "
        "WHERE id = $1 AND team = $2 AND ready AND purpose = any($3::text[])",
        file_id,
        team,
        list(purposes),
    )
    return None if row is None else _file(row)


async def list_files(
    pool: asyncpg.Pool,
    team: str,
    *,
    purpose: str | None,
    after: str | None,
    limit: int,
    newest_first: bool,
) -> list[StoredFile]:
    """Up to ``limit`` of the team's files in the Files API, after the file ``after``."""
    order, cmp = ("DESC", "<") if newest_first else ("ASC", ">")
    rows = await pool.fetch(
        f"""
        SELECT {_COLUMNS} FROM api_files f
        WHERE team = $1 AND ready AND purpose = any($2::text[])
          AND ($3::text IS NULL OR purpose = $3)
          AND ($4::text IS NULL OR (created_at, id) {cmp}
               (SELECT created_at, id FROM api_files WHERE id = $4 AND team = $1))
        ORDER BY created_at {order}, id {order}
        LIMIT $5
        """,
        team,
        list(OPENAI_PURPOSES),
        purpose,
        after,
        limit,
    )
    return [_file(row) for row in rows]


async def delete_file(
    pool: asyncpg.Pool, team: str, file_id: str, purposes: Collection[str] = OPENAI_PURPOSES
) -> bool:
    """Delete one of the team's files (of the Files API by default); whether there was one."""
    deleted = await pool.fetchval(
        "DELETE FROM api_files WHERE id = $1 AND team = $2 AND ready "
        "AND purpose = any($3::text[]) RETURNING id",
        file_id,
        team,
        list(purposes),
    )
    return deleted is not None


async def read_file(pool: asyncpg.Pool, file_id: str) -> AsyncIterator[bytes]:
    """A file's bytes, part by part, each read on its own (no transaction held open while
    the caller sends them). The caller has checked the file is its team's."""
    seq = -1
    while True:
        row = await pool.fetchrow(
            "SELECT seq, data FROM api_file_parts WHERE file_id = $1 AND seq > $2 "
            "ORDER BY seq LIMIT 1",
            file_id,
            seq,
        )
        if row is None:
            return
        seq = row["seq"]
        yield bytes(row["data"])
