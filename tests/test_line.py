"""The line a worker's jobs wait in for the same buckets or ledgers (workers.admission.line)."""

from __future__ import annotations

import asyncio

import pytest

from workers.admission.line import Line


async def test_a_wait_cancelled_as_the_line_is_released_ends_cancelled_and_frees_the_line() -> None:
    # Given a held line and a job waiting in it
    line = Line()
    await line.acquire()
    waiting = asyncio.create_task(line.acquire())
    await asyncio.sleep(0)
    assert line.locked()

    # When its wait is cancelled (a drain's stop) and the holder releases before it resumes
    waiting.cancel()
    line.release()

    # Expect the wait to end cancelled, not in a ValueError no one retrieves, and the line free
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert not line.locked()
    await asyncio.wait_for(line.acquire(), timeout=1)
    assert line.locked()


async def test_a_wait_cancelled_in_line_leaves_it_to_the_next() -> None:
    # Given a held line and two jobs waiting in it
    line = Line()
    await line.acquire()
    first = asyncio.create_task(line.acquire())
    second = asyncio.create_task(line.acquire())
    await asyncio.sleep(0)

    # When the first's wait is cancelled, then the holder releases
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    line.release()

    # Expect the second to hold the line
    await asyncio.wait_for(second, timeout=1)
    assert line.locked()
