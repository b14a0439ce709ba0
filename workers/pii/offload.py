"""Scans of large texts run in a helper process, so the worker's event loop never waits on one.

    findings = await find(text)   # inline under OFFLOAD_CHARS, else in the helper process

A worker serves every team from one event loop: a 1 MiB prompt scanned on it would hold
every other team's jobs for the whole scan. A thread does not help, because the regex engine
keeps the GIL while it matches: the loop would still wait (``python -m bench.pii --stall``
measures both). So a large text goes to one helper process (``python -m
workers.pii.helper``), started on first use, at a lower CPU priority than the worker; it
exits when the worker does (its input closes). One thread of ours writes each text to it and
reads the findings back, blocked on the pipe without the GIL, one scan at a time: large scans
queue for the helper rather than take every core. Small texts, most prompts, are scanned
inline, where the hop would cost more than the scan.

Not ``multiprocessing``: its spawned children import the parent's main module again, which
breaks any program that embeds a worker without a ``__main__`` guard.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import subprocess
import sys
from array import array
from concurrent.futures import ThreadPoolExecutor
from typing import IO

from workers.pii import KINDS, Finding, scan

OFFLOAD_CHARS = 8_192
"""Texts this long or longer are scanned in the helper process (see bench/README.md)."""

_HEADER = 8
"""Each message on the helper's pipes: its length in 8 bytes (big-endian), then its bytes."""


async def find(text: str) -> list[Finding]:
    """The findings of ``scan(text)``, computed off the event loop when the text is large."""
    if len(text) < OFFLOAD_CHARS:
        return scan(text)
    payload = text.encode("utf-8", "surrogatepass")  # JSON may hold lone surrogates
    flat = array("q")
    # Shielded: a cancelled job must not leave a half-read answer on the pipe.
    reply = asyncio.get_running_loop().run_in_executor(_helper.thread, _helper.spans, payload)
    flat.frombytes(await asyncio.shield(reply))
    return [Finding(flat[i], flat[i + 1], KINDS[flat[i + 2]]) for i in range(0, len(flat), 3)]


def spans(text: str) -> array[int]:
    """``scan(text)`` as flat (start, end, index in KINDS) triples: cheap to send back."""
    flat = array("q")
    for finding in scan(text):
        flat.extend((finding.start, finding.end, KINDS.index(finding.kind)))
    return flat


def send(pipe: IO[bytes], payload: bytes) -> None:
    pipe.write(len(payload).to_bytes(_HEADER, "big"))
    pipe.write(payload)
    pipe.flush()


def receive(pipe: IO[bytes]) -> bytes | None:
    """The next message, or None when the pipe closed before one began."""
    header = pipe.read(_HEADER)
    if not header:
        return None
    size = int.from_bytes(header, "big")
    payload = pipe.read(size)
    if len(header) < _HEADER or len(payload) < size:
        raise EOFError("the pipe closed in the middle of a message")
    return payload


class _Helper:
    """The helper process and the one thread that talks to it; one per worker process."""

    def __init__(self) -> None:
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="pii-helper")
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def spans(self, payload: bytes) -> bytes:
        """The helper's answer for ``payload``; a helper that died is replaced once."""
        try:
            return self._exchange(payload)
        except (OSError, EOFError):
            # Killed (for memory, say): a new helper takes this scan and the next.
            self._discard()
            return self._exchange(payload)

    def _exchange(self, payload: bytes) -> bytes:
        process = self._running()
        assert process.stdin is not None and process.stdout is not None
        send(process.stdin, payload)
        reply = receive(process.stdout)
        if reply is None:
            raise EOFError("the helper process exited")
        return reply

    def close(self) -> None:
        """Stop the helper: its input closes, so it exits."""
        self._stop(kill=False)

    def _discard(self) -> None:
        self._stop(kill=True)

    def _stop(self, *, kill: bool) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        assert process.stdin is not None and process.stdout is not None
        if kill:
            process.kill()
        with contextlib.suppress(OSError):  # a dead helper's pipe may refuse the flush
            process.stdin.close()
        process.wait()
        process.stdout.close()

    def _running(self) -> subprocess.Popen[bytes]:
        if self._process is None:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "workers.pii.helper"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
        return self._process


_helper = _Helper()
atexit.register(_helper.close)
