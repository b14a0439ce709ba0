"""Streamed replies: a job's StreamChunks as an async iterator, ended by its ChatResult."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Self

from queuegate.errors import GaveUp, ResultTimeout
from queuegate.messages import ChatResult, StreamChunk


class ChatStream:
    """The deltas of one streamed job, in order, as they arrive::

        stream = client.stream("gpt-4o-mini", messages, max_tokens=200)
        async for chunk in stream:
            print(chunk.delta.get("content", ""), end="")
        print(stream.result.gateway.cost_usd)  # the final ChatResult, usage included

    The job is published when iteration starts. Iteration ends with the result, which is
    ``ok`` with the whole response, or ``error`` (a failure after the first chunk ends the
    stream with ``provider_error``; one before it falls back like any other call). Once the
    first is out, a chunk comes for every event the provider sends, some with an empty delta
    (its finish reason, usage), but the one that ends its stream: the result comes right
    after that. ``timeout`` is the longest wait for the first chunk (queueing included) and
    then for each next, not for the whole stream; past it, ResultTimeout, while the job runs
    on (its ``deadline`` bounds it). A stream opened after its
    job's chunks began (a second reader of a job already streaming) yields none: it missed
    the start, and its result holds the whole answer.
    """

    def __init__(
        self,
        job_id: str,
        start: Callable[[], Awaitable[object]],
        timeout: float | None,
        *,
        view: Callable[[ChatResult], ChatResult] | None = None,
    ):
        self.job_id = job_id
        self.result: ChatResult | None = None
        """The final result, once the iteration has ended (as ``view`` gives it, if one)."""
        self._view = view
        self._start: Callable[[], Awaitable[object]] | None = start
        self._timeout = timeout
        self._items: asyncio.Queue[StreamChunk | ChatResult | Exception] = asyncio.Queue()
        self._next_seq = 0
        self._joined_late = False

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> StreamChunk:
        if self._start is not None:
            start, self._start = self._start, None
            await start()
        while self.result is None:
            try:
                # Not asyncio.wait_for, which in Python 3.11 drops a cancel that comes with a
                # chunk: a request cancelled at its front door's stop would stream on.
                async with asyncio.timeout(self._timeout):
                    item = await self._items.get()
            except TimeoutError as exc:
                raise ResultTimeout(
                    f"no chunk of job {self.job_id} within {self._timeout} s; "
                    "check the workers (queuegate status)"
                ) from exc
            if isinstance(item, Exception):
                raise item
            if isinstance(item, ChatResult):
                self.result = item if self._view is None else self._view(item)
            elif self._next_seq == 0 and item.seq > 0:
                self._joined_late = True  # its result alone ends it
            elif item.seq >= self._next_seq and not self._joined_late:
                # (lower: a redelivered job streaming again)
                self._next_seq = item.seq + 1
                return item
        raise StopAsyncIteration

    def put(self, item: StreamChunk | ChatResult | Exception) -> None:
        """Its next item; an exception, raised to its reader in its turn."""
        self._items.put_nowait(item)


class StreamBook:
    """The open streams of a client, by job id: each chunk and the result go to every stream
    of the job (several requests may read one job, retries under one idempotency key)."""

    def __init__(self) -> None:
        self._streams: dict[str, list[ChatStream]] = {}

    def open(self, stream: ChatStream) -> None:
        self._streams.setdefault(stream.job_id, []).append(stream)

    def chunk(self, chunk: StreamChunk) -> None:
        for stream in self._streams.get(chunk.job_id, ()):
            stream.put(chunk)

    def close(self, job_id: str) -> None:
        """Drop the streams of a job nobody reads any more."""
        self._streams.pop(job_id, None)

    def give_up(self) -> None:
        """End each open stream's wait for its next chunk with ``GaveUp`` (Inbox.give_up)."""
        for job_id, streams in self._streams.items():
            for stream in streams:
                stream.put(GaveUp(job_id))

    def finish(self, result: ChatResult) -> bool:
        """Hand the result to the job's streams, if it has any; False otherwise."""
        streams = self._streams.pop(result.job_id, None)
        if not streams:
            return False
        for stream in streams:
            stream.put(result)
        return True
