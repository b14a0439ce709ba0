"""Reading a batch file as numbered requests, streaming: JSONL, or a ``{"requests": [...]}``.

A JSONL file is read one line at a time. Anthropic's ``{"requests": [...]}`` document is
read one request at a time too, whatever the order of its keys. Either way each entry is
numbered by the line it starts on, and memory stays constant, whatever the file's size. A
UTF-8 byte order mark at the start is skipped; a file that is not UTF-8 text is refused
whole (NotText), at its first byte that is not.
"""

from __future__ import annotations

import codecs
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from producer.batch.files import reason
from queuegate.errors import BatchError, NotText
from queuegate.request_limits import MAX_NESTING
from queuegate.visible import clipped, clipped_path

BOM = codecs.BOM_UTF8
_READ = 65536


@dataclass
class BatchFile:
    """One pass over a batch file yields (line number, parsed JSON or why it is not JSON)."""

    path: Path
    document: bool = False
    """A ``{"requests": [...]}`` document rather than JSONL."""
    digest: hashlib._Hash = field(default_factory=hashlib.sha256, repr=False)
    aside: list[str] = field(default_factory=list)
    """A document's keys beside ``requests``, read and left aside, once it was read."""

    def __post_init__(self) -> None:
        try:
            with self.path.open("rb") as f:
                first = f.readline().removeprefix(BOM).strip()
        except OSError as exc:
            raise BatchError(
                f"cannot read {clipped_path(self.path)} ({reason(exc)}): give the batch file's path"
            ) from exc
        self.document = _opens_document(first)

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        """Each entry as JSON, or a ValueError saying why it is not; also feeds ``digest``."""
        self.digest = hashlib.sha256()
        self.aside = []
        if self.document:
            yield from _Document(self.path, self.digest, self.aside).entries()
            return
        offset = 0  # the file's bytes before the line read
        with self.path.open("rb") as f:
            for number, read in enumerate(f, start=1):
                self.digest.update(read)
                raw = read.removeprefix(BOM) if number == 1 else read
                if raw.strip():
                    try:
                        yield number, orjson.loads(raw)
                    except orjson.JSONDecodeError as exc:
                        # Looked at only here: orjson refuses what is not UTF-8, in its words.
                        _check_text(self.path, "JSONL", number, offset + len(read) - len(raw), raw)
                        yield number, ValueError(f"not JSON: {exc.msg} (column {exc.pos + 1})")
                offset += len(read)


def _check_text(path: Path, kind: str, line: int, start: int, raw: bytes) -> None:
    """NotText when ``raw``, line ``line`` of ``path`` from its byte ``start``, is not UTF-8."""
    try:
        raw.decode()
    except UnicodeDecodeError as exc:
        raise _not_text(path, kind, line, start + exc.start, raw[exc.start]) from None


def _not_text(path: Path, kind: str, line: int, at: int, byte: int) -> NotText:
    found = f"byte 0x{byte:02x} at offset {at:,}"
    return NotText(
        f"{path}: not UTF-8 {kind} text (line {line}: {found}), nothing published: a batch "
        "file is UTF-8 text; save it as UTF-8",
        [(line, f"not UTF-8 text: {found}")],
    )


def _opens_document(first: bytes) -> bool:
    """Whether a file whose first line is ``first`` is a document, not JSONL: a line that is
    a whole object is a document only with ``requests`` and no ``custom_id``; one that is
    not is the start of a multi-line object unless it looks like a (broken) request."""
    if not first.startswith(b"{"):
        return False
    try:
        entry = orjson.loads(first)
    except orjson.JSONDecodeError:
        return b'"custom_id"' not in first
    return isinstance(entry, dict) and "requests" in entry and "custom_id" not in entry


class _Document:
    """The elements of a document's ``requests``, decoded one by one from a buffer of a few
    blocks; other keys, before or after it, are read and left aside."""

    def __init__(self, path: Path, digest: hashlib._Hash, aside: list[str]) -> None:
        self._path = path
        self._digest = digest
        self._aside = aside
        self._text = codecs.getincrementaldecoder("utf-8-sig")()
        self._decoder = json.JSONDecoder()
        self._buffer = ""
        self._position = 0
        self._line = 1
        """The line number of ``_buffer[0]``."""
        self._eof = False
        self._read = 0
        """The file's bytes read."""

    def entries(self) -> Iterator[tuple[int, Any]]:
        with self._path.open("rb") as f:
            self._file = f
            self._expect("{", 'a batch document must be one JSON object, {"requests": [...]}')
            found, first = False, True
            while not self._peek("}"):
                if not first:
                    self._expect(",", "its keys must be separated by ,")
                first = False
                key = self._value("a key")
                self._expect(":", f"key {clipped(str(key))!r} must be followed by :")
                if key == "requests":
                    found = True
                    yield from self._requests()
                else:
                    self._aside.append(str(key))
                    self._value(f"the value of {clipped(str(key))!r}")
            if not found:
                raise BatchError(f'{self._path}: the document has no "requests" array')

    def _requests(self) -> Iterator[tuple[int, Any]]:
        self._expect("[", '"requests" must be an array')
        first = True
        while not self._peek("]"):
            if not first:
                self._expect(
                    ",", f"the request before line {self._line_here()} must be followed by , or ]"
                )
            first = False
            self._skip_space()
            line = self._line_here()
            yield line, self._value(f"the request on line {line}")

    def _line_here(self) -> int:
        return self._line + self._buffer.count("\n", 0, self._position)

    def _more(self) -> bool:
        """Read a block, dropping what has been consumed; False at the end of the file."""
        if self._eof:
            return False
        self._line = self._line_here()
        self._buffer, self._position = self._buffer[self._position :], 0
        raw = self._file.read(_READ)
        self._digest.update(raw)
        try:
            self._buffer += self._text.decode(raw, final=not raw)
        except UnicodeDecodeError as exc:
            # Decoded with the bytes of a character the last block cut, held before ``raw``.
            held = len(exc.object) - len(raw)
            line = self._line + self._buffer.count("\n") + exc.object[: exc.start].count(b"\n")
            at = self._read - held + exc.start
            raise _not_text(self._path, "JSON", line, at, exc.object[exc.start]) from None
        self._read += len(raw)
        self._eof = not raw
        return True

    def _skip_space(self) -> None:
        while True:
            while self._position < len(self._buffer) and self._buffer[self._position].isspace():
                self._position += 1
            if self._position < len(self._buffer) or not self._more():
                return

    def _peek(self, char: str) -> bool:
        """Whether the next non-space character is ``char`` (taken if so)."""
        self._skip_space()
        if self._position >= len(self._buffer):
            raise BatchError(
                f"{self._path}: the document ends on line {self._line_here()}, cut short"
            )
        if self._buffer[self._position] == char:
            self._position += 1
            return True
        return False

    def _expect(self, char: str, what: str) -> None:
        if not self._peek(char):
            raise BatchError(f"{self._path}: line {self._line_here()}: {what}")

    def _value(self, what: str) -> Any:
        self._skip_space()
        while True:
            try:
                value, end = self._decoder.raw_decode(self._buffer, self._position)
            except json.JSONDecodeError as exc:
                if self._more():
                    continue
                raise BatchError(f"{self._path}: {what} is not valid JSON: {exc.msg}") from exc
            except RecursionError:
                # Past the interpreter's stack (about 1,000 levels): no request nests so deep.
                raise BatchError(
                    f"{self._path}: {what} nests too deep to read: a request may nest at most "
                    f"{MAX_NESTING} levels"
                ) from None
            self._position = end
            return value
