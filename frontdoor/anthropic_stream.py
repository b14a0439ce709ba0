"""A streamed job's StreamChunks as the Messages API's server-sent events.

The worker relays canonical deltas (OpenAI ``chat.completion.chunk`` deltas: ``content``,
``reasoning_content``, ``tool_calls`` pieces), whichever provider serves the model. They
become Anthropic's documented event flow::

    message_start, ping,
    (content_block_start, content_block_delta..., content_block_stop) per block,
    message_delta (stop_reason, cumulative usage), message_stop

with ``text_delta``, ``thinking_delta`` and ``input_json_delta`` deltas, or an ``error``
event (and nothing after it) when the job fails after the stream has begun, or the model's
answer has no Messages API form (``message_of``): a tool call's input that begins as no JSON
object does, or holds a lone surrogate escape (``InputText``), ends the stream at that delta,
one that is no strict JSON object once whole (truncated JSON, ``NaN``) in place of
``message_stop``. The stop reason is known only from the final result, and
``message_delta`` carries the usage (its counts are cumulative: Anthropic's SDK takes them
as the totals). ``message_start`` names the model the provider says answers, as a
non-streamed answer does (``frontdoor.sse.ServedModel``).

An Anthropic deployment's own events ride on the chunks (``StreamChunk.anthropic_events``):
they are sent as they came, so each block keeps its index, its signature (``signature_delta``) and
its place, and ``message_start`` the usage the provider gave there. Other providers'
deltas are translated (``message_start`` then carries zero counts).
"""

from __future__ import annotations

from string import hexdigits
from typing import Any, Literal

import orjson

from frontdoor.errors import ApiError
from frontdoor.sse import ServedModel
from queuegate.api_errors import anthropic_error
from queuegate.messages import ChatResult, StreamChunk
from queuegate.provider_formats import (
    CALLED_WITH,
    NotAnObject,
    anthropic_id,
    anthropic_message,
    as_int,
    custom_call,
    function_call_id,
)

Event = dict[str, Any]
BlockKind = Literal["text", "thinking", "tool_use"]
_FUNCTION_CALL = -1
"""The position of a legacy ``function_call`` among the tool calls (theirs are from 0)."""


def message_of(response: dict[str, Any], job_id: str) -> Event:
    """The Messages API message answering job ``job_id`` with ``response``.

    ApiError ``provider_error`` when the model answered what a message has no form for (a
    tool called with input that is not a JSON object: ``NotAnObject``), naming it: the job
    was served and billed, so the error is not retried (a retry would call the provider
    again) and points at the answer, which ``GET /v1/jobs/<id>`` gives in OpenAI's format
    (its ``arguments`` may be any text)."""
    try:
        return anthropic_message(response, anthropic_id(job_id))
    except NotAnObject as exc:
        raise _unanswerable(exc, job_id) from None


def _unanswerable(exc: NotAnObject, job_id: str) -> ApiError:
    return ApiError(
        "provider_error",
        f"{exc}; job {job_id} was served (and billed): GET /v1/jobs/{job_id} reads its "
        "answer in OpenAI's format",
        job_id=job_id,
    )


def encode(events: list[Event]) -> bytes:
    """Events as SSE: each one's type as the event name, the event itself as the data."""
    return b"".join(
        b"event: " + str(e["type"]).encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n"
        for e in events
    )


class MessageEvents:
    """The events of one streamed Messages API answer (a ``frontdoor.sse.StreamWriter``)::

    writer = MessageEvents(job.job_id, job.model)
    async for data in sse_events(stream, first, writer): ...
    """

    def __init__(self, job_id: str, model: str) -> None:
        self._job_id = job_id
        self._id = anthropic_id(job_id)
        self._model = ServedModel(model)
        self._started = False
        self._blocks = 0
        """Blocks started so far: the next block's index."""
        self._open: tuple[int, BlockKind] | None = None
        self._calls: dict[int, int] = {}
        """The block index of each tool call, by its position (OpenAI's ``index``)."""
        self._tools: dict[int, str] = {}
        """The name of each tool call's block, by index (``_checked``)."""
        self._inputs: dict[int, InputText] = {}
        """What those blocks' input deltas said so far."""
        self._ended = False
        """Whether an error event ended the answer: nothing is sent after it."""
        self._usage = {
            "input_tokens": 0,
            "output_tokens": 0,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        }
        """``message_start``'s usage: the provider's, when it sent its own."""

    def delta(self, chunk: StreamChunk) -> bytes:
        if self._ended:
            return b""
        self._model.note(chunk.model)
        events: list[Event] = []
        try:
            if chunk.anthropic_events is not None:
                self._native(chunk.anthropic_events, events)
            else:
                events += self._opening()
                events += self.delta_events(chunk.delta)
        except NotAnObject as exc:
            # A tool's input that begins with what no object does: the answer has no
            # Messages API form, and ends before the SDK reads a block it cannot hold.
            error = _unanswerable(exc, self._job_id)
            return encode(events) + self.error(error.code, error.message)
        return encode(events)

    def end(self, result: ChatResult) -> bytes:
        if self._ended:
            return b""
        self._model.note_result(result)
        if result.status != "ok" or result.response is None:
            assert result.error is not None
            return self.error(result.error.code, result.error.message)
        try:
            message = message_of(result.response, self._job_id)
        except ApiError as exc:
            # After the model's own deltas, its call's input among them: the answer ends
            # with the error instead of message_stop.
            return self.error(exc.code, exc.message)
        if not self._started:
            # Nothing was streamed (a cached answer): message_start can tell the usage.
            self._usage = self._usage | message["usage"]
        return encode(self._opening() + self.end_events(message))

    def error(self, code: str, message: str) -> bytes:
        self._ended = True
        return encode([*self._opening(), anthropic_error(code, message)])

    def _opening(self) -> list[Event]:
        if self._started:
            return []
        self._started = True
        message: Event = {
            "id": self._id,
            "type": "message",
            "role": "assistant",
            "model": self._model.name,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": self._usage,
        }
        return [{"type": "message_start", "message": message}, {"type": "ping"}]

    def _native(self, events: list[Event], out: list[Event]) -> None:
        """An Anthropic deployment's events, as it sent them, onto ``out``; its
        ``message_start`` with this stream's id and model."""
        for event in events:
            kind = event.get("type")
            if kind == "message_start":
                usage = (event.get("message") or {}).get("usage")
                if isinstance(usage, dict):
                    self._usage = self._usage | usage
            out.extend(self._opening())
            if kind == "content_block_start":
                self._blocks += 1
                block = event.get("content_block") or {}
                if block.get("type") == "tool_use":
                    if not isinstance(block.get("input", {}), dict):
                        raise NotAnObject(block.get("name"), block["input"])
                    self._tools[as_int(event.get("index"))] = str(block.get("name"))
                out.append(_signed(event))
            elif kind == "content_block_delta":
                delta = event.get("delta") or {}
                if delta.get("type") == "input_json_delta":
                    self._checked(as_int(event.get("index")), delta.get("partial_json"))
                out.append(event)
            elif kind != "message_start":
                out.append(event)

    def _checked(self, index: int, piece: Any) -> None:
        """Raise NotAnObject when the input of tool call block ``index`` so far, ``piece``
        its latest, is what no JSON object begins as (``InputText.refused``): whatever
        follows, the block's input is not one (a later error, truncated JSON, is found in
        the whole answer)."""
        if index not in self._tools or not isinstance(piece, str):
            return
        text = self._inputs.setdefault(index, InputText())
        if text.refused(piece):
            raise NotAnObject(self._tools[index], text.shown)

    def delta_events(self, delta: dict[str, Any]) -> list[Event]:
        """The events of one canonical delta (often one ``content_block_delta``)."""
        events: list[Event] = []
        thinking = delta.get("reasoning_content")
        if isinstance(thinking, str) and thinking:
            index = self._into("thinking", events)
            events.append(_delta(index, {"type": "thinking_delta", "thinking": thinking}))
        text = delta.get("content")
        if isinstance(text, str) and text:
            index = self._into("text", events)
            events.append(_delta(index, {"type": "text_delta", "text": text}))
        for position, call in enumerate(delta.get("tool_calls") or []):
            if isinstance(call, dict):
                events.extend(self._tool_call(position, call))
        legacy = delta.get("function_call")
        if isinstance(legacy, dict):
            call = {"id": function_call_id(self._id), "type": "function", "function": legacy}
            events.extend(self._tool_call(_FUNCTION_CALL, call))
        return events

    def end_events(self, message: Event) -> list[Event]:
        """The closing events of the answer ``message``: ``message_delta`` and
        ``message_stop`` (its content first, when nothing was streamed: a stored outcome)."""
        events: list[Event] = []
        if self._blocks == 0:
            for block in message["content"]:
                events.extend(self._whole(block))
        events.extend(self._close())
        stop = {"stop_reason": message["stop_reason"], "stop_sequence": message["stop_sequence"]}
        events.append({"type": "message_delta", "delta": stop, "usage": message["usage"]})
        events.append({"type": "message_stop"})
        return events

    def _into(self, kind: BlockKind, events: list[Event]) -> int:
        """The index of the open block of ``kind``, starting one (and closing the open one of
        another kind) when needed."""
        if self._open is not None and self._open[1] == kind:
            return self._open[0]
        start: Event = {"type": kind, kind: ""}
        if kind == "thinking":
            start["signature"] = ""  # the SDK's ThinkingBlock requires one
        return self._start(start, events)

    def _start(self, block: Event, events: list[Event]) -> int:
        events.extend(self._close())
        index = self._blocks
        self._blocks += 1
        self._open = (index, block["type"])
        events.append({"type": "content_block_start", "index": index, "content_block": block})
        return index

    def _close(self) -> list[Event]:
        if self._open is None:
            return []
        index, self._open = self._open[0], None
        return [{"type": "content_block_stop", "index": index}]

    def _tool_call(self, position: int, call: dict[str, Any]) -> list[Event]:
        # A delta without ``index`` (a provider that leaves it out): its position.
        number = as_int(call.get("index")) if "index" in call else position
        function = call.get("function") or {}
        events: list[Event] = []
        index = self._calls.get(number)
        if index is None:
            if call.get("type") == "custom":
                raise custom_call(call)  # before a tool_use block the SDK could not fill
            block: Event = {
                "type": "tool_use",
                "id": call.get("id") or "",
                "name": function.get("name") or "",
                "input": {},
            }
            index = self._calls[number] = self._start(block, events)
            self._tools[index] = block["name"]
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            self._checked(index, arguments)
            # A piece of an earlier call after a later one began (no provider is known to do
            # this) still goes to its own block: Anthropic's SDK accumulates by index.
            events.append(_delta(index, {"type": "input_json_delta", "partial_json": arguments}))
        return events

    def _whole(self, block: Event) -> list[Event]:
        """A block of the final message, in a block of its own, sent in one delta (what
        has no delta, such as redacted_thinking, whole in its start)."""
        events: list[Event] = []
        kind = block.get("type")
        if kind == "tool_use":
            index = self._start(block | {"input": {}}, events)
            piece = orjson.dumps(block.get("input") or {}).decode()
            events.append(_delta(index, {"type": "input_json_delta", "partial_json": piece}))
        elif kind == "text":
            index = self._start(block | {"text": ""}, events)
            events.append(_delta(index, {"type": "text_delta", "text": block.get("text", "")}))
        elif kind == "thinking":
            index = self._start(block | {"thinking": "", "signature": ""}, events)
            events.append(
                _delta(index, {"type": "thinking_delta", "thinking": block.get("thinking", "")})
            )
            if block.get("signature"):
                seal = {"type": "signature_delta", "signature": block["signature"]}
                events.append(_delta(index, seal))
        else:
            self._start(block, events)
        return events


class InputText:
    """A streamed tool input, read piece by piece as far as telling whether it can still
    begin a strict JSON object; each piece is read once (an input may run to megabytes)."""

    def __init__(self) -> None:
        self.shown = ""
        """Its first characters, as many as ``NotAnObject`` repeats, and one more (so that
        it says it cut them)."""
        self._begun = False
        """Whether a character other than a blank came."""
        self._tail = ""
        """What is still to be read: an escape whose rest is to come."""
        self._high = False
        """Whether the escape read last is a high surrogate, whose low half must follow."""

    def refused(self, piece: str) -> bool:
        """Read ``piece``; whether the input is now no object's beginning: it begins with
        something else than ``{``, or it holds a lone surrogate escape. Anthropic's SDK
        parses each delta's input so far and raises on that escape (``\\ud800`` not
        followed by its low half) as it comes, before the answer's end could say why."""
        if len(self.shown) <= CALLED_WITH:
            self.shown = (self.shown + piece)[: CALLED_WITH + 1]
        if not self._begun:
            begun = piece.lstrip()  # the pieces before it were blanks
            self._begun = bool(begun)
            if begun and not begun.startswith("{"):
                return True
        self._tail += piece
        return self._lone_surrogate()

    def _lone_surrogate(self) -> bool:
        text, at = self._tail, 0
        self._tail = ""
        while (slash := text.find("\\", at)) != -1:
            if self._high and slash != at:
                return True
            if len(text) < slash + 2 or (text[slash + 1] == "u" and len(text) < slash + 6):
                self._tail = text[slash:]  # the escape's rest is still to come
                return False
            if text[slash + 1] != "u":
                if self._high:
                    return True
                at = slash + 2
                continue
            digits = text[slash + 2 : slash + 6]
            if not all(digit in hexdigits for digit in digits):
                return True  # no JSON escape at all
            code = int(digits, 16)
            if (0xDC00 <= code <= 0xDFFF) != self._high:
                return True
            self._high = 0xD800 <= code <= 0xDBFF
            at = slash + 6
        return self._high and len(text) > at


def _signed(start: Event) -> Event:
    """A content_block_start whose thinking block has a signature: Anthropic's documented
    example starts one without it, its SDK's ThinkingBlock requires one (the
    signature_delta fills it in)."""
    block = start.get("content_block") or {}
    if block.get("type") == "thinking" and "signature" not in block:
        return start | {"content_block": block | {"signature": ""}}
    return start


def _delta(index: int, delta: Event) -> Event:
    return {"type": "content_block_delta", "index": index, "delta": delta}
