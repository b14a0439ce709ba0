"""A streamed job as server-sent events: ``sse_events`` drives any API's ``StreamWriter``;
``ChunkWriter`` writes OpenAI's, which the ``openai`` SDK reads::

    data: {"object": "chat.completion.chunk", "choices": [{"delta": {"role": "assistant", ...}}]}
    data: {... one chunk per delta the worker relays, as it relays it ...}
    data: {... "choices": [{"delta": {}, "finish_reason": "stop"}]}
    data: {... "choices": [], "usage": {...}}          (with stream_options.include_usage)
    data: [DONE]

A job that fails after its first chunk ends with ``data: {"error": {...}}`` (the SDK raises
it) and no ``[DONE]``; one that fails before is answered as a plain error by the route.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

import orjson

from producer.streams import ChatStream
from queuegate.api_errors import openai_error
from queuegate.errors import ResultTimeout
from queuegate.messages import ChatResult, StreamChunk

DONE = b"data: [DONE]\n\n"


def event(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


class StreamWriter(Protocol):
    """One API's events of one streamed job."""

    def delta(self, chunk: StreamChunk) -> bytes:
        """The events of a relayed chunk (the first also opens the stream)."""
        ...

    def end(self, result: ChatResult) -> bytes:
        """The closing events of a finished job, or of its error."""
        ...

    def error(self, code: str, message: str) -> bytes:
        """The event that ends a stream the front door itself gives up on."""
        ...


class ChunkWriter:
    """The ``chat.completion.chunk`` events of one job."""

    def __init__(self, job_id: str, model: str, *, include_usage: bool) -> None:
        self._id = f"chatcmpl-{job_id}"
        self._model = model
        self._created = int(time.time())
        self._first = True
        self._include_usage = include_usage

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return event(
            {
                "id": self._id,
                "object": "chat.completion.chunk",
                "created": self._created,
                "model": self._model,
                "choices": choices,
                **extra,
            }
        )

    def delta(self, chunk: StreamChunk) -> bytes:
        delta = dict(chunk.delta)
        if self._first:
            delta = {"role": "assistant", **delta}
            self._first = False
        return self._chunk([{"index": 0, "delta": delta, "finish_reason": None}])

    def end(self, result: ChatResult) -> bytes:
        """The closing events of a finished job: finish reason, usage, ``[DONE]``; or its
        error."""
        if result.status != "ok" or result.response is None:
            assert result.error is not None
            return self.error(result.error.code, result.error.message)
        response = result.response
        self._model = str(response.get("model") or self._model)
        choice = (response.get("choices") or [{}])[0]
        out = b""
        if self._first:  # nothing was relayed (a cached answer): the whole message at once
            message = choice.get("message") or {}
            delta = {k: v for k, v in message.items() if k in ("role", "content", "tool_calls")}
            out += self.delta(StreamChunk(job_id="", seq=0, delta=delta))
        finish = choice.get("finish_reason") or "stop"
        out += self._chunk([{"index": 0, "delta": {}, "finish_reason": finish}])
        if self._include_usage:
            out += self._chunk([], usage=response.get("usage"))
        return out + DONE

    def error(self, code: str, message: str) -> bytes:
        return event(openai_error(code, message))


async def sse_events(
    stream: ChatStream, first: StreamChunk | None, writer: StreamWriter
) -> AsyncIterator[bytes]:
    """The events of ``stream``, whose first chunk (``first``) was already taken."""
    if first is not None:
        yield writer.delta(first)
    try:
        async for chunk in stream:
            yield writer.delta(chunk)
    except ResultTimeout:
        message = f"the stream stopped: job {stream.job_id} sent nothing more in time"
        yield writer.error("deadline_exceeded", message)
        return
    assert stream.result is not None
    yield writer.end(stream.result)


__all__ = ["ChunkWriter", "StreamWriter", "sse_events"]
