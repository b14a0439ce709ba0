"""A streamed job as server-sent events: ``sse_events`` drives any API's ``StreamWriter``;
``ChunkWriter`` writes OpenAI's, which the ``openai`` SDK reads::

    data: {"object": "chat.completion.chunk", "choices": [{"delta": {"role": "assistant"}}]}
    data: {... one chunk per delta the worker relays, as it relays it ...}
    data: {... "choices": [{"delta": {}, "finish_reason": "stop"}]}
    data: {... "choices": [], "usage": {...}}          (with stream_options.include_usage)
    data: [DONE]

A relayed chunk with no event of its own (the provider's finish reason or usage, which come
with the end) is the comment line ``:``, which the SDKs skip (``ARRIVED``).

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
from queuegate.errors import ResultTimeout, StreamBroken, StreamInterrupted
from queuegate.messages import ChatResult, StreamChunk
from queuegate.provider_formats import CHUNK_FIELDS, STOP_SEQUENCE, as_int, openai_id
from queuegate.stored_stream import ANSWER, choice_deltas

DONE = b"data: [DONE]\n\n"
ARRIVED = b":\n\n"
"""A comment the SDKs skip, written for a chunk with no event of its caller's API (the
provider's finish or usage, say): its caller's read timeout starts again, as it would
straight from the provider, so only a stalled provider lets it fire."""


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


class ServedModel:
    """The ``model`` a stream reports, the same in all its events and as a plain answer's:
    the one the provider says answered (the router's adapters put it in the answer and on
    each chunk), as the first chunk names it, else (nothing was relayed: a cached answer)
    the final answer; the alias asked for only until one does (an error before any)."""

    def __init__(self, asked: str) -> None:
        self.name = asked
        self._known = False

    def note(self, model: Any) -> None:
        if not self._known and isinstance(model, str) and model:
            self.name, self._known = model, True

    def note_result(self, result: ChatResult) -> None:
        self.note((result.response or {}).get("model"))


class ChunkWriter:
    """The ``chat.completion.chunk`` events of one job: each choice's deltas under its own
    ``index`` (each opened by a chunk of its role alone), with its logprobs, and the provider's
    ``system_fingerprint`` and ``service_tier`` on every chunk once it sent them."""

    def __init__(self, job_id: str, model: str, *, include_usage: bool) -> None:
        self._id = openai_id(job_id)
        self._model = ServedModel(model)
        self._created = int(time.time())
        self._opened: set[int] = set()
        """The choices whose first delta (with the role) was written."""
        self._include_usage = include_usage
        self._sent: dict[str, Any] = {}
        """The provider's own chunk fields, as it last sent them."""

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return event(
            {
                "id": self._id,
                "object": "chat.completion.chunk",
                "created": self._created,
                "model": self._model.name,
                **self._sent,
                "choices": choices,
                **extra,
            }
        )

    def delta(self, chunk: StreamChunk) -> bytes:
        self._model.note(chunk.model)
        self._note(chunk.model_dump(include=set(CHUNK_FIELDS)))
        # An Anthropic deployment's own events are for Anthropic callers: a chunk of nothing
        # else (a block's start or stop, a cached answer's) is no chunk at all.
        if not chunk.delta and chunk.logprobs is None:
            return b""
        opening = b""
        if chunk.index not in self._opened:
            # Each choice opens with its role alone, as OpenAI's does (its answer's text empty,
            # so a tool call's content stays null), and no logprobs: the openai SDK's stream
            # helper counts those of a choice's first chunk twice unless it is the stream's
            # first chunk (so every choice's but one, with n > 1).
            role = {"role": "assistant"} | {field: "" for field in ANSWER if field in chunk.delta}
            opening = self._chunk([{"index": chunk.index, "delta": role, "finish_reason": None}])
            self._opened.add(chunk.index)
        choice = {"index": chunk.index, "delta": chunk.delta, "finish_reason": None}
        if chunk.logprobs is not None:
            choice["logprobs"] = chunk.logprobs
        return opening + self._chunk([choice])

    def _note(self, fields: dict[str, Any]) -> None:
        self._sent |= {k: v for k, v in fields.items() if k in CHUNK_FIELDS and v is not None}

    def end(self, result: ChatResult) -> bytes:
        """The closing events of a finished job: each choice's finish reason, usage,
        ``[DONE]``; or its error."""
        if result.status != "ok" or result.response is None:
            assert result.error is not None
            return self.error(result.error.code, result.error.message, result.error.param)
        response = result.response
        self._model.note_result(result)
        self._note(response)
        out = b""
        for choice in response.get("choices") or [{}]:
            index = as_int(choice.get("index"))
            if index not in self._opened:  # nothing was relayed (a stored outcome): replayed
                for d in choice_deltas(choice):
                    out += self.delta(
                        StreamChunk(
                            job_id="", seq=0, delta=d.delta, index=d.index, logprobs=d.logprobs
                        )
                    )
            finish = {"finish_reason": choice.get("finish_reason") or "stop"}
            if STOP_SEQUENCE in choice:
                finish[STOP_SEQUENCE] = choice[STOP_SEQUENCE]
            out += self._chunk([{"index": index, "delta": {}, **finish}])
        if self._include_usage:
            out += self._chunk([], usage=response.get("usage"))
        return out + DONE

    def error(self, code: str, message: str, param: str | None = None) -> bytes:
        return event(openai_error(code, message, param))


async def sse_events(
    stream: ChatStream, first: StreamChunk | None, writer: StreamWriter
) -> AsyncIterator[bytes]:
    """The events of ``stream``, whose first chunk (``first``) was already taken."""
    if first is not None:
        yield writer.delta(first) or ARRIVED
    try:
        async for chunk in stream:
            yield writer.delta(chunk) or ARRIVED
    except ResultTimeout:
        message = f"the stream stopped: job {stream.job_id} sent nothing more in time"
        yield writer.error("deadline_exceeded", message)
        return
    except StreamBroken as exc:
        # As a provider failing mid-stream ends it (``StreamInterrupted``): the caller holds
        # part of an answer that no later call continues.
        yield writer.error(StreamInterrupted.code, str(exc))
        return
    assert stream.result is not None
    yield writer.end(stream.result)


__all__ = ["ChunkWriter", "ServedModel", "StreamWriter", "sse_events"]
