"""Reading a batch file as numbered requests, streaming: JSONL, or a ``{"requests": [...]}``.

A JSONL file is read one line at a time (constant memory, any size); its numbers are line
numbers. Anthropic's ``{"requests": [...]}`` document is one JSON value, so it is parsed
whole; its numbers are positions in ``requests``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson

from queuegate.errors import BatchError

Unit = Literal["line", "request"]

_DOCUMENT = re.compile(rb'^\s*\{\s*(?:"requests"|$)')
"""A file whose first line opens an object and goes on with ``"requests"`` (or nothing)."""


@dataclass
class BatchFile:
    """One pass over a batch file yields (number, parsed JSON or the reason it is not JSON)."""

    path: Path
    unit: Unit = "line"
    digest: hashlib._Hash = field(default_factory=hashlib.sha256, repr=False)

    def __post_init__(self) -> None:
        try:
            with self.path.open("rb") as f:
                first = f.readline()
        except OSError as exc:
            raise BatchError(f"cannot read {self.path}: {exc.strerror}") from exc
        if _DOCUMENT.match(first):
            self.unit = "request"

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        """Each entry as JSON, or a ValueError saying why it is not; also feeds ``digest``."""
        self.digest = hashlib.sha256()
        if self.unit == "request":
            yield from self._document()
            return
        with self.path.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                self.digest.update(raw)
                if not raw.strip():
                    continue
                try:
                    yield number, orjson.loads(raw)
                except orjson.JSONDecodeError as exc:
                    yield number, ValueError(f"not JSON: {exc.msg} (column {exc.pos + 1})")

    def _document(self) -> Iterator[tuple[int, Any]]:
        raw = self.path.read_bytes()
        self.digest.update(raw)
        try:
            document = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise BatchError(f"{self.path} is not a JSON document: {exc}") from exc
        requests = document.get("requests") if isinstance(document, dict) else None
        if not isinstance(requests, list):
            raise BatchError(f'{self.path}: a batch document needs a "requests" list')
        yield from enumerate(requests, start=1)
