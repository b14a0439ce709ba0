"""A batch's submitted file, read once, its entries kept by custom_id for asking again.

Collect asks again, a chunk at a time, for the results a full results queue refused, each
job rebuilt from the file as submit built it. Reading and hashing the whole file for each
chunk made collect's work grow with the square of the refusals; holding the jobs in memory
would take the file's size. So one pass proves the file is the one submitted (its digest)
and keeps its entries in a private temporary SQLite database, on disk and deleted with its
connection: memory stays small, and the file may move or go once it was read.
"""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson

from producer.batch.jobs import JobReader
from producer.batch.lines import BatchFile
from queuegate.messages import ChatJob

ROWS = 500
"""Entries written, or custom_ids looked up, per statement (SQLite binds up to 32,766)."""


class SubmittedFile:
    """The entries of the file a batch was submitted from, and the jobs submit made of them."""

    def __init__(self, db: sqlite3.Connection, reader: JobReader) -> None:
        self._db = db
        self._reader = reader

    @classmethod
    def read(cls, path: Path, reader: JobReader, fingerprint: str) -> SubmittedFile | None:
        """The file at ``path``, read once; None when it is gone or not the one submitted
        (its sha256 is not ``fingerprint``)."""
        if not path.is_file():
            return None
        file = BatchFile(path)
        # "": a private database in a temporary file, deleted when the connection closes.
        db = sqlite3.connect("")
        try:
            db.execute("CREATE TABLE entry (custom_id TEXT, line INTEGER, body BLOB)")
            for rows in _batched(_rows(file), ROWS):
                db.executemany("INSERT INTO entry VALUES (?, ?, ?)", rows)
            if file.digest.hexdigest() != fingerprint:
                db.close()
                return None
            db.execute("CREATE INDEX entry_id ON entry (custom_id)")
        except BaseException:
            db.close()
            raise
        return cls(db, reader)

    def jobs(self, wanted: Iterable[tuple[str, int | None]]) -> list[ChatJob]:
        """The job of each (custom_id, line submit indexed it on): from the first valid entry
        of the custom_id on that line, as submit published it (the line None: its first
        valid entry anywhere). Entries submit refused (a model not in the catalog, a job too
        large) are passed over by the line alone, whatever this reader checks."""
        lines = dict(wanted)
        jobs: dict[str, ChatJob] = {}
        for ids in _batched(lines, ROWS):
            marks = ",".join("?" * len(ids))
            query = f"SELECT custom_id, line, body FROM entry WHERE custom_id IN ({marks})"
            for custom_id, line, body in self._db.execute(query + " ORDER BY rowid", ids):
                if custom_id in jobs or lines[custom_id] not in (None, line):
                    continue
                try:
                    jobs[custom_id] = self._reader.job(orjson.loads(body))
                except ValueError:
                    continue  # not published by submit: a later entry may be the valid one
        return list(jobs.values())

    def close(self) -> None:
        self._db.close()


def _rows(file: BatchFile) -> Iterator[tuple[str, int, bytes]]:
    """(custom_id, line, entry) of each entry with a custom_id: the only ones asked for."""
    for number, entry in file:
        custom_id: Any = entry.get("custom_id") if isinstance(entry, dict) else None
        if not isinstance(custom_id, str):
            continue
        try:
            body = orjson.dumps(entry)
        except orjson.JSONEncodeError:
            continue  # nested past what orjson writes (254 levels): refused, never published
        yield custom_id, number, body


def _batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch
