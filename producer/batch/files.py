"""Where collect writes result lines: local files, flushed and fsynced before their results
are acknowledged, or any other ``ResultSink`` (the HTTP front door keeps them in PostgreSQL)."""

from __future__ import annotations

import errno
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Protocol, Self

import orjson

from queuegate.errors import BatchError
from queuegate.json_lines import json_line
from queuegate.visible import clipped_path

_BLOCK = 65536
_CUSTOM_ID = re.compile(rb'"custom_id":("(?:[^"\\]|\\.)*")')
"""Where a torn line names its request: both formats write it near the line's start."""


class ResultSink(Protocol):
    """What collect writes to: the output and, for failed requests, possibly a second one.

    ``write`` buffers a line; ``sync`` makes every line written so far durable, and only
    then are their results acknowledged. ``existing`` reads back the lines an earlier run
    made durable; ``torn`` names the custom_ids of lines a crash cut short, to write again.
    """

    torn: set[str]

    def existing(self) -> AsyncIterator[dict[str, Any]]: ...

    def write(self, line: dict[str, Any], *, failed: bool) -> int:
        """Buffer ``line``; the index of the file it goes to (0: the output)."""
        ...

    async def sync(self) -> None: ...


def reason(exc: OSError) -> str:
    """Why a path cannot be used, in a few words: the system's, but for a path too long,
    whose ``[Errno 36] File name too long`` reads as a file that is."""
    return "the path is too long" if exc.errno == errno.ENAMETOOLONG else str(exc.strerror)


class ResultFiles:
    """The output file and, when given, a separate file for failed requests.

    On open, a last line cut short by a crash (one that does not parse) is removed and a
    complete last line without its newline gets one, so the files hold whole lines only.
    """

    def __init__(self, out: Path, errors: Path | None) -> None:
        self._paths = [out] if errors is None or errors == out else [out, errors]
        self._files: list[IO[bytes]] = []
        self.torn: set[str] = set()
        """custom_ids named by the torn lines cut on open: written once, lost since."""

    def __enter__(self) -> Self:
        try:
            for path in self._paths:
                path.parent.mkdir(parents=True, exist_ok=True)
                with path.open("ab"):
                    pass
                torn = _cut_partial_line(path)
                if torn is not None and (named := _CUSTOM_ID.search(torn)):
                    self.torn.add(str(orjson.loads(named[1])))
                self._files.append(path.open("ab"))
        except OSError as exc:
            self.close()
            raise BatchError(
                f"cannot write {clipped_path(exc.filename)} ({reason(exc)}): pick another path"
            ) from exc
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files.clear()

    async def existing(self) -> AsyncIterator[dict[str, Any]]:
        """Every line already in the files, as JSON."""
        for path in self._paths:
            with path.open("rb") as f:
                for raw in f:
                    if raw.strip():
                        yield orjson.loads(raw)

    def write(self, line: dict[str, Any], *, failed: bool) -> int:
        """Append ``line``; the index of the file it went to."""
        index = len(self._files) - 1 if failed else 0
        self._files[index].write(json_line(line))
        return index

    async def sync(self) -> None:
        """Flush and fsync: only then may the results written be acknowledged."""
        for f in self._files:
            f.flush()
            os.fsync(f.fileno())


def _cut_partial_line(path: Path) -> bytes | None:
    """End the file on a whole line: a last line that parses is complete and only lacks its
    newline (another tool may have written it so); one that does not parse is torn and cut,
    and returned."""
    with path.open("r+b") as f:
        end = f.seek(0, os.SEEK_END)
        position = end
        while position > 0:
            start = max(0, position - _BLOCK)
            f.seek(start)
            block = f.read(position - start)
            if position == end and block.endswith(b"\n"):
                return None
            newline = block.rfind(b"\n")
            if newline >= 0:
                return _end_last_line(f, start + newline + 1, end)
            position = start
        return _end_last_line(f, 0, end)


def _end_last_line(f: IO[bytes], start: int, end: int) -> bytes | None:
    f.seek(start)
    last = f.read(end - start)
    try:
        orjson.loads(last)
    except orjson.JSONDecodeError:
        f.truncate(start)
        return last
    f.seek(end)
    f.write(b"\n")
    return None
