"""A batch's result files in PostgreSQL, as ``collect_into`` writes them (a ResultSink).

Each ``sync`` appends the lines written since the last one as one part per file, in one
transaction that first checks the runner still holds the batch: a commit is durable before
collect acknowledges the results, no line is ever torn (``torn`` stays empty), and a runner
that lost its lease adds nothing to a file another runner now writes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg
import orjson

from frontdoor.batches.files import append_part, read_file
from frontdoor.batches.records import held_by
from queuegate.json_lines import json_line


class StoredResults:
    """The output file and, when a second is given, the file of failed requests."""

    def __init__(
        self, pool: asyncpg.Pool, *, batch_id: str, runner: str, files: Sequence[str]
    ) -> None:
        self._pool = pool
        self._batch_id = batch_id
        self._runner = runner
        self._files = list(files)
        self._pending = [bytearray() for _ in self._files]
        self.torn: set[str] = set()

    async def existing(self) -> AsyncIterator[dict[str, Any]]:
        # Every part holds whole lines: one sync's.
        for file_id in self._files:
            async for part in read_file(self._pool, file_id):
                for raw in part.splitlines():
                    if raw.strip():
                        yield orjson.loads(raw)

    def write(self, line: dict[str, Any], *, failed: bool) -> int:
        index = len(self._files) - 1 if failed else 0
        self._pending[index] += json_line(line)
        return index

    async def sync(self) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            await held_by(conn, self._batch_id, self._runner)
            await self.flush(conn)

    async def flush(self, conn: asyncpg.Connection) -> None:
        """Store the lines written since the last flush, in the caller's transaction (which
        has checked the lease): with whatever else it records of the batch, or nothing."""
        for file_id, pending in zip(self._files, self._pending, strict=True):
            if pending:
                await append_part(conn, file_id, bytes(pending))
                pending.clear()
