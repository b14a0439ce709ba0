"""Reading a batch file as numbered requests, streaming: JSONL, or a ``{"requests": [...]}``.

A JSONL file is read one line at a time; its numbers are line numbers. Anthropic's
``{"requests": [...]}`` document is read one request at a time too; its numbers are
positions in ``requests``. Either way memory stays constant, whatever the file's size.
"""

from __future__ import annotations

import codecs
import hashlib
import json
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
_OPENING = re.compile(r'\s*\{\s*"requests"\s*:\s*\[\s*')
_READ = 65536


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
        """The elements of ``requests``, decoded one by one from a buffer of a few blocks."""
        decoder = json.JSONDecoder()
        text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        buffer = ""
        with self.path.open("rb") as f:

            def more() -> bool:
                nonlocal buffer
                raw = f.read(_READ)
                self.digest.update(raw)
                buffer += text.decode(raw, final=not raw)
                return bool(raw)

            while len(buffer) < 64 and more():
                pass
            opening = _OPENING.match(buffer)
            if opening is None:
                raise BatchError(f'{self.path}: a batch document must begin {{"requests": [')
            position, number, need_comma = opening.end(), 0, False
            while True:
                position = _space_end(buffer, position)
                if position >= len(buffer):
                    buffer, position = "", 0
                    if more():
                        continue
                    raise BatchError(f"{self.path}: the document ends inside requests")
                if buffer[position] == "]":
                    return
                if need_comma:
                    if buffer[position] != ",":
                        raise BatchError(f"{self.path}: request {number} is not followed by , or ]")
                    position, need_comma = position + 1, False
                    continue
                try:
                    entry, end = decoder.raw_decode(buffer, position)
                except json.JSONDecodeError as exc:
                    buffer, position = buffer[position:], 0
                    if more():
                        continue
                    raise BatchError(
                        f"{self.path}: request {number + 1} is not valid JSON: {exc.msg}"
                    ) from exc
                number += 1
                yield number, entry
                buffer, position, need_comma = buffer[end:], 0, True


def _space_end(text: str, position: int) -> int:
    while position < len(text) and text[position].isspace():
        position += 1
    return position
