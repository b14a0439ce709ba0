"""A reader of what arrives (a batch's results, a stream's chunks) stops when it is cancelled,
even as an item arrives at that moment: the front door's stop cancels its batch runners and
its requests, and one reading on would hold the stop until the next item (a minute, for a
team of an rpm of 1). No service is needed: the race is in the event loop alone."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from producer.batch.collect import _take
from producer.streams import ChatStream
from queuegate.messages import StreamChunk
from queuegate.runtime import until_set

TURNS = 6
"""Event-loop turns between an item's arrival and the cancel, each tried: asyncio.wait_for
dropped the cancel at the turn its inner wait ended and before the waiter resumed."""
STOPPED_WITHIN = 2.0


async def _stops_however_the_cancel_falls(
    reading: Callable[[], Awaitable[None]], arrive: Callable[[], None]
) -> None:
    for turns in range(TURNS):
        # Given a reader waiting for the next item (its wait far longer than the test)
        reader = asyncio.create_task(reading())
        await asyncio.sleep(0.01)

        # When an item arrives and, `turns` turns of the loop later, the reader is cancelled
        arrive()
        for _ in range(turns):
            await asyncio.sleep(0)
        reader.cancel()

        # Expect it to end cancelled at once, not to read on
        done, _ = await asyncio.wait([reader], timeout=STOPPED_WITHIN)
        assert reader in done, f"still reading {turns} turns after the item came"
        assert reader.cancelled()


async def test_a_batch_collect_stops_when_cancelled_as_a_result_arrives() -> None:
    inbox: asyncio.Queue[Any] = asyncio.Queue()

    async def collecting() -> None:
        while True:  # as collect reads results until the batch ends
            await _take(inbox, 60.0)

    await _stops_however_the_cancel_falls(collecting, lambda: inbox.put_nowait(object()))


async def test_a_stream_read_stops_when_cancelled_as_a_chunk_arrives() -> None:
    seq = 0

    async def started() -> None:
        return None

    stream = ChatStream("job-1", started, timeout=60.0)

    async def streaming() -> None:
        async for _ in stream:
            pass

    def chunk() -> None:
        nonlocal seq
        stream.put(StreamChunk(job_id="job-1", seq=seq, delta={"content": "hi"}))
        seq += 1

    await _stops_however_the_cancel_falls(streaming, chunk)


async def test_a_wait_for_an_event_stops_when_cancelled_as_the_event_is_set() -> None:
    # The waits of the worker's loops (a budget's settle, a registry read, the next lease
    # renewal) are until_set's: one waiting on would hold the worker's stop for its budget.
    settled = asyncio.Event()

    async def waiting_for_settles() -> None:
        while True:  # as a job held by others' reservations waits for each settle
            settled.clear()
            await until_set(60.0, settled)

    await _stops_however_the_cancel_falls(waiting_for_settles, settled.set)
