"""Scans of large texts run in a helper process, so the worker's event loop never waits on one.

    findings = await find(text)   # inline under OFFLOAD_CHARS, else in the helper process

A worker serves every team from one event loop: a 1 MiB prompt scanned on it would hold
every other team's jobs for the whole scan. A thread does not help, because the regex engine
keeps the GIL while it matches: the loop would still wait (``python -m bench.pii`` measures
both). So a large text goes to one helper process, started on first use, at a lower CPU
priority than the worker, and shut down by ``concurrent.futures`` when the worker exits.
Large scans queue for that one process rather than take every core; small texts, most
prompts, are scanned inline, where the hop would cost more than the scan.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from array import array
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from workers.pii import KINDS, Finding, scan

OFFLOAD_CHARS = 16_384
"""Texts this long or longer are scanned in the helper process (inline they would hold the
loop for about a millisecond or more; see bench/README.md)."""

NICENESS = 10
"""How much lower the helper's CPU priority is: when cores are short, jobs' own work first."""


async def find(text: str) -> list[Finding]:
    """The findings of ``scan(text)``, computed off the event loop when the text is large."""
    if len(text) < OFFLOAD_CHARS:
        return scan(text)
    loop = asyncio.get_running_loop()
    pool = _helper.pool()
    try:
        flat = await loop.run_in_executor(pool, spans, text)
    except BrokenProcessPool:
        # The helper died (killed for memory, say): a new one takes this scan and the next.
        _helper.discard(pool)
        flat = await loop.run_in_executor(_helper.pool(), spans, text)
    return [Finding(flat[i], flat[i + 1], KINDS[flat[i + 2]]) for i in range(0, len(flat), 3)]


def spans(text: str) -> array[int]:
    """``scan(text)`` as flat (start, end, index in KINDS) triples: cheap to send back."""
    flat = array("q")
    for finding in scan(text):
        flat.extend((finding.start, finding.end, KINDS.index(finding.kind)))
    return flat


class _Helper:
    """The helper process's pool, started on first use; one per worker process."""

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None

    def pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn: a fork would copy the worker's connections and threads into the helper.
            context = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(
                1, mp_context=context, initializer=os.nice, initargs=(NICENESS,)
            )
        return self._pool

    def discard(self, pool: ProcessPoolExecutor) -> None:
        if self._pool is pool:  # not one another scan has started since
            self._pool = None
        pool.shutdown(wait=False)


_helper = _Helper()
