"""Streamed replies: a job's StreamChunks as an async iterator, ended by its ChatResult."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Self

from queuegate.errors import GaveUp, ResultTimeout, StreamBroken
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

    A stream's chunks are of one call. Should the worker streaming it be lost mid-stream
    and the job be called again, that call's chunks or its answer name another stream
    (``StreamChunk.stream``), or none (a call that did not stream: a copy of the job sent
    unstreamed), and the stream ends there with StreamBroken, after the chunks of the
    first: joined, they would be an answer no model gave, unlike the job's answer (the
    later call's). That answer is ``result`` when it is what broke the stream, and else
    comes to ``GatewayClient.wait``.
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
        self._stream: str | None = None
        """The stream its chunks are of, named by the first (None: none named yet)."""
        self._answer: ChatResult | None = None
        """The job's answer, when it is another stream's and so broke this one."""
        self.broken = False
        """Whether another stream's chunk or answer came (StreamBroken): nothing more of the
        job comes through it."""

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> StreamChunk:
        if self.broken and self._items.empty():
            raise StopAsyncIteration
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
            if isinstance(item, StreamBroken) and self._answer is not None:
                self.result = self._viewed(self._answer)
            if isinstance(item, Exception):
                raise item
            if isinstance(item, ChatResult):
                self.result = self._viewed(item)
            elif self._next_seq == 0 and item.seq > 0:
                self._joined_late = True  # its result alone ends it
            elif item.seq >= self._next_seq and not self._joined_late:
                # (lower: a redelivered job streaming again)
                self._next_seq = item.seq + 1
                return item
        raise StopAsyncIteration

    def _viewed(self, result: ChatResult) -> ChatResult:
        return result if self._view is None else self._view(result)

    def put(self, item: StreamChunk | ChatResult | Exception) -> None:
        """Its next item; an exception, raised to its reader in its turn. A chunk or result
        of another stream than its chunks' breaks it (StreamBroken, in their turn)."""
        if self.broken:
            return
        named = item.gateway.stream if isinstance(item, ChatResult) else None
        if isinstance(item, StreamChunk):
            named = item.stream
            if self._stream is None and item.seq == 0:
                self._stream = named  # a reader that joined late reads none, and pins none
        # Pinned, anything naming another stream, or none, is of another delivery: a
        # takeover that did not stream names none (a copy of the job sent unstreamed).
        if self._stream is not None and named != self._stream:
            self.broken = True
            if isinstance(item, ChatResult):
                self._answer = item
            item = StreamBroken(self.job_id)
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
        """Hand the result to the job's streams, if it has any; False otherwise, and when
        every one was broken before it came (StreamBroken), whose readers wait for it
        apart (``GatewayClient.wait``)."""
        streams = self._streams.pop(result.job_id, None)
        if not streams:
            return False
        taken = False
        for stream in streams:
            taken |= not stream.broken
            stream.put(result)
        return taken
