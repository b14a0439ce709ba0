"""OpenAI chat completions, also spoken by OpenAI-compatible servers (vLLM, llama.cpp, Ollama).

The canonical job already is this wire format, so the request passes through unchanged apart
from the upstream model name, and the response is the canonical one. Streams ask for
``stream_options.include_usage``, so the last chunk carries the token usage.

For OpenAI itself (``strict``) the request holds only what its API documents: Anthropic's
``cache_control`` hints are left out (OpenAI caches prompts by itself), Anthropic's
``thinking`` becomes ``reasoning_effort``, and any other parameter OpenAI does not have is
refused, or dropped and noted under the job's ``drop`` policy (``Fidelity``). OpenAI-compatible
servers get every parameter as it is: each server has extras of its own.

Neither has Anthropic's message extras: thinking blocks sent back are left out (as Anthropic
itself leaves out the thinking of earlier turns), a tool result marked ``is_error`` is sent
with ``TOOL_ERROR`` before its content, and a tool result holding an image is refused
(OpenAI's tool messages take text only).
"""

from __future__ import annotations

import time
from typing import Any, Literal

from queuegate.messages import ChatJob, ChatMessage
from queuegate.openai_params import too_many_stops
from queuegate.provider_formats import (
    ANTHROPIC_EXAMPLES,
    CHUNK_FIELDS,
    DOCUMENT,
    OPENAI_CHAT_PARAMS,
    THINKING_PARTS,
    as_int,
    detail_count,
    token_count,
)
from router.providers.base import (
    Completion,
    Fidelity,
    Piece,
    ProviderError,
    ServerEvent,
    UpstreamRequest,
    Usage,
    estimate_tokens,
    estimated_usage,
    json_data,
    list_of,
    object_of,
    request,
    stream_error,
    text_of,
    text_size,
    texts_of,
    whole_of,
)

PATH = "/v1/chat/completions"

_NOT_PASSED = frozenset({"model", "messages", "stream", "stream_options"})
"""Owned by the adapter: the deployment names the model, the router decides on streaming."""

TOOL_ERROR = "Error: "
"""What a tool message marked ``is_error`` starts with: OpenAI has no such mark, and a model
reads this one as Anthropic's reads the flag."""

EFFORT_OF_BUDGET = ((2048, "low"), (8192, "medium"))
"""Anthropic ``thinking.budget_tokens`` up to each bound as OpenAI's ``reasoning_effort``;
above the last, ``high`` (the inverse of the Anthropic adapter's ``THINKING_BUDGETS``)."""


class OpenAIAdapter:
    """Requests for ``/v1/chat/completions``; the key, when there is one, is a Bearer token.

    ``strict`` (OpenAI itself): only parameters OpenAI documents are sent.
    """

    def __init__(self, *, strict: bool = True) -> None:
        self._strict = strict

    def build_request(
        self,
        job: ChatJob,
        model: str,
        api_key: str | None,
        *,
        stream: bool = False,
        drop: bool = False,
    ) -> UpstreamRequest:
        fidelity = Fidelity("openai", drop)
        params = job.params.model_dump(exclude_none=True)
        body: dict[str, Any] = {k: v for k, v in params.items() if k not in _NOT_PASSED}
        body["model"] = model
        body["messages"] = [_message(m, strict=self._strict) for m in job.messages]
        if self._strict:
            _only_openai(body, fidelity)
            too_many = too_many_stops(body.get("stop"))
            if too_many is not None:
                # A job for a model Anthropic serves may carry more (its stop_sequences are a
                # job's stop), and reach OpenAI as a fallback: OpenAI answers them with a 400.
                fidelity.unsupported("stop", too_many)
                del body["stop"]
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # OpenAI's max_completion_tokens bounds reasoning and answer together, each choice.
        limit = job.params.output_limit
        return request(PATH, body, headers, fidelity, limit and limit * job.params.choices)

    def parse_response(self, body: Any, model: str, *, choices: int = 1) -> Completion:
        if not isinstance(body, dict) or not isinstance(body.get("choices"), list):
            raise ProviderError("bad_response", "no choices in the chat.completion body")
        if not body["choices"]:
            raise ProviderError("bad_response", "empty choices in the chat.completion body")
        # Relayed as it came: every field of it is checked, as a stream's chunk is.
        _check_head(body, "the answer")
        for entry in body["choices"]:
            choice = object_of(entry, "a choice")
            _choice_index(choice.get("index"), choices)
            _check_choice(choice, "a choice")
            _check_message(choice.get("message"))
        # OpenAI-compatible servers may leave it out: counted from the text then.
        return Completion(response=body, usage=_usage(body.get("usage")))

    def stream_parser(self, model: str, secret: str | None, *, choices: int = 1) -> OpenAIStream:
        return OpenAIStream(self, model, secret, choices)


def _message(message: ChatMessage, *, strict: bool) -> dict[str, Any]:
    out = message.model_dump(exclude_none=True)
    if isinstance(out.get("content"), list):
        parts = [_part(p) for p in out["content"] if p.get("type") not in THINKING_PARTS]
        out["content"] = parts or None  # null content is the tool calls' alone
    if message.role == "tool":
        out = _tool_message(out)
    if strict:
        out.pop("cache_control", None)
        # An earlier answer sent back as history carries the gateway's own reasoning_content,
        # which OpenAI's messages do not have.
        out.pop("reasoning_content", None)
        if isinstance(out.get("content"), list):
            out["content"] = [_uncached(part) for part in out["content"]]
    return out


def _part(part: dict[str, Any]) -> dict[str, Any]:
    """A content part without what an Anthropic document kept beside it (``DOCUMENT``):
    its title is left out (a PDF's is its filename already); its context and citations,
    which OpenAI's parts have no place for, are refused."""
    if DOCUMENT not in part:
        return part
    if any(key in part[DOCUMENT] for key in ("context", "citations")):
        raise ProviderError("unsupported", "document context and citations (Anthropic's)")
    return {key: value for key, value in part.items() if key != DOCUMENT}


def _tool_message(out: dict[str, Any]) -> dict[str, Any]:
    """A tool message as OpenAI takes it: text only, ``is_error`` as ``TOOL_ERROR``."""
    content = out.get("content")
    if isinstance(content, list) and any(p.get("type") != "text" for p in content):
        raise ProviderError("unsupported", "a tool result that is not text (OpenAI takes text)")
    if out.pop("is_error", None) is True:
        if isinstance(content, list):
            out["content"] = [{"type": "text", "text": TOOL_ERROR}, *content]
        else:
            out["content"] = TOOL_ERROR + (content or "")
    return out


def _uncached(block: Any) -> Any:
    """Without Anthropic's ``cache_control`` marker, which OpenAI would refuse."""
    if isinstance(block, dict) and "cache_control" in block:
        return {k: v for k, v in block.items() if k != "cache_control"}
    return block


def _only_openai(body: dict[str, Any], fidelity: Fidelity) -> None:
    """Anthropic's own parameters mapped where OpenAI has them; the rest refused or dropped."""
    thinking = body.pop("thinking", None)
    # A budget becomes an effort. Adaptive thinking leaves how much to think to the model, as
    # a request without reasoning_effort does; disabled and between_tools (thinking off) ask
    # for nothing; display has no place (OpenAI's answers never carry the reasoning text).
    if isinstance(thinking, dict) and thinking.get("type") == "enabled":
        if "reasoning_effort" in body:
            fidelity.unsupported("thinking", "set together with reasoning_effort")
        else:
            body["reasoning_effort"] = _effort(as_int(thinking.get("budget_tokens")))
    if "tools" in body:
        body["tools"] = [_openai_tool(tool, fidelity) for tool in body["tools"]]
    for key in [key for key in body if key not in OPENAI_CHAT_PARAMS]:
        fidelity.unsupported(key)
        del body[key]


def _openai_tool(tool: Any, fidelity: Fidelity) -> Any:
    """A tool without what Anthropic's has and OpenAI's function has not: its cache marker,
    and its example inputs (refused or dropped)."""
    function = tool.get("function") if isinstance(tool, dict) else None
    if isinstance(function, dict) and ANTHROPIC_EXAMPLES in function:
        fidelity.unsupported(f"tools.function.{ANTHROPIC_EXAMPLES}")
        function = {k: v for k, v in function.items() if k != ANTHROPIC_EXAMPLES}
        tool = {**tool, "function": function}
    return _uncached(tool)


def _effort(budget: int) -> str:
    return next((effort for bound, effort in EFFORT_OF_BUDGET if budget <= bound), "high")


def _check_head(body: dict[str, Any], what: str) -> None:
    """Raises ProviderError("bad_response") for an answer's or a chunk's own field of the
    wrong type: OpenAI documents each a string (the fingerprint and the tier nullable) but
    ``created``, a whole number of seconds."""
    texts_of(body, _HEAD_TEXTS, what)
    whole_of(body.get("created"), f"{what}'s created")
    # Azure's, the content filter's verdict on the prompt (a chunk of no choices brings it)
    list_of(body.get("prompt_filter_results"), f"{what}'s prompt_filter_results")


def _check_choice(choice: dict[str, Any], what: str) -> dict[str, Any]:
    """A choice's (or a chunk's) logprobs, {} when null; raises ProviderError("bad_response")
    for its own field of the wrong type, each relayed as it came: its finish_reason, its
    logprobs (an object whose token lists are lists), Azure's content filter's verdict."""
    text_of(choice.get("finish_reason"), f"{what}'s finish_reason")
    object_of(choice.get("content_filter_results"), f"{what}'s content_filter_results")
    logprobs = object_of(choice.get("logprobs"), f"{what}'s logprobs")
    for field in ("content", "refusal"):
        list_of(logprobs.get(field), f"{what}'s logprobs' {field}")
    return logprobs


def _choice_index(value: Any, choices: int) -> int:
    """A choice's ``index``, 0 when absent; raises ProviderError("bad_response") when it is
    no whole number (``whole_of``) or names a choice past the ``choices`` asked for: relayed,
    a caller of one choice was streamed a second."""
    index = whole_of(value, "a choice's index")
    if index >= choices:
        raise ProviderError("bad_response", f"a choice's index is past the {choices} asked for")
    return index


def _check_message(message: Any) -> None:
    """Raises ProviderError("bad_response") for a whole answer's message whose role, text, or
    a tool call's, is no string: relayed, it was a caller's answer of content 42."""
    message = object_of(message, "a choice's message")
    _check_said(message, "a message")
    for entry in list_of(message.get("tool_calls"), "a message's tool_calls"):
        call = object_of(entry, "a tool call")
        texts_of(call, ("id", "type"), "a tool call")
        for kind, field in _CALL_TEXT.items():
            texts_of(object_of(call.get(kind), f"a tool call's {kind}"), ("name", field), kind)


def _check_said(said: dict[str, Any], what: str) -> None:
    """Raises ProviderError("bad_response") for a message's (or a delta's) field of the
    wrong type, relayed as it came: its role and texts, its legacy function_call's, its
    annotations (a list), its audio (an object)."""
    texts_of(said, ("role", *_TEXTS), what)
    # The legacy answer to ``functions``, translated as a tool call for Anthropic callers
    called = object_of(said.get("function_call"), f"{what}'s function_call")
    texts_of(called, ("name", "arguments"), f"{what}'s function_call")
    list_of(said.get("annotations"), f"{what}'s annotations")
    object_of(said.get("audio"), f"{what}'s audio")


def _usage(usage: Any) -> Usage | None:
    """The counts of a usage object; None without a prompt and a completion count to bill by
    (``token_count``), or with a cache count that is no count (``detail_count``); a reasoning
    count that is no count is none, and no detail exceeds its total."""
    if not isinstance(usage, dict):
        return None
    prompt_tokens = token_count(usage.get("prompt_tokens"))
    completion_tokens = token_count(usage.get("completion_tokens"))
    if prompt_tokens is None or completion_tokens is None:
        return None
    prompt = usage.get("prompt_tokens_details")
    prompt = prompt if isinstance(prompt, dict) else {}
    completion = usage.get("completion_tokens_details")
    completion = completion if isinstance(completion, dict) else {}
    read = detail_count(prompt.get("cached_tokens"))
    write = detail_count(prompt.get("cache_write_tokens"))
    if read is None or write is None:
        return None
    cached = min(read, prompt_tokens)
    written = min(write, prompt_tokens - cached)
    return Usage(
        input_tokens=prompt_tokens,
        output_tokens=completion_tokens,
        cached_tokens=cached,
        cache_write_tokens=written,
        reasoning_tokens=min(
            token_count(completion.get("reasoning_tokens")) or 0, completion_tokens
        ),
    )


class _Choice:
    """One choice of a streamed answer, as its deltas arrive."""

    def __init__(self) -> None:
        self.texts: dict[str, list[str]] = {field: [] for field in _TEXTS}
        self.calls: dict[int, dict[str, Any]] = {}
        self.function_call: dict[str, str] | None = None
        """A legacy ``function_call`` (the answer to ``functions``), its pieces joined."""
        self.logprobs: dict[str, list[Any]] = {}
        """Each stream of logprobs (``content``, ``refusal``) joined, as a whole answer has."""
        self.finish: str | None = None

    def add_call(self, part: dict[str, Any]) -> int:
        """The tool call ``part`` adds to; the ``text_size`` of the arguments (or input) it
        brings. A custom tool's call comes under its own type, as a whole answer has it."""
        index = whole_of(part.get("index"), "a streamed tool call's index")
        if index not in self.calls:
            custom = text_of(part.get("type"), "a streamed tool call's type") == "custom"
            kind = "custom" if custom else "function"
            self.calls[index] = {"type": kind, kind: {_CALL_TEXT[kind]: ""}}
        call = self.calls[index]
        if call_id := text_of(part.get("id"), "a streamed tool call's id"):
            call["id"] = call_id
        kind = call["type"]
        said = object_of(part.get(kind), f"a streamed tool call's {kind}")
        if name := text_of(said.get("name"), "a streamed tool call's name"):
            call[kind]["name"] = name
        text = text_of(said.get(_CALL_TEXT[kind]), f"a streamed tool call's {_CALL_TEXT[kind]}")
        call[kind][_CALL_TEXT[kind]] += text
        return text_size(text)

    def add_function_call(self, said: dict[str, Any]) -> int:
        """The legacy function call ``said`` (checked: ``_check_said``) adds to; the
        ``text_size`` of the arguments it brings."""
        call = self.function_call = self.function_call or {"name": "", "arguments": ""}
        call["name"] = said.get("name") or call["name"]
        call["arguments"] += said.get("arguments") or ""
        return text_size(said.get("arguments") or "")

    def add_logprobs(self, logprobs: dict[str, Any]) -> None:
        for field, entries in logprobs.items():
            if isinstance(entries, list):
                self.logprobs.setdefault(field, []).extend(entries)

    def choice(self, index: int) -> dict[str, Any]:
        content, reasoning, refusal = ("".join(self.texts[field]) for field in _TEXTS)
        # As OpenAI's whole answer: content None when the answer is only tool calls or a
        # refusal, refusal None unless it is one.
        called = self.calls or self.function_call
        message: dict[str, Any] = {
            "role": "assistant",
            "content": content if content or not (called or refusal) else None,
            "refusal": refusal or None,
        }
        if self.function_call:
            message["function_call"] = self.function_call
        if reasoning:
            message["reasoning_content"] = reasoning
        if self.calls:
            message["tool_calls"] = [self.calls[i] for i in sorted(self.calls)]
        logprobs = None
        if self.logprobs:
            logprobs = {field: self.logprobs.get(field) for field in ("content", "refusal")}
        return {
            "index": index,
            "message": message,
            "logprobs": logprobs,
            "finish_reason": self.finish,
        }


_TEXTS = ("content", "reasoning_content", "refusal")
"""The text fields of a delta, joined into the message's own."""
_RELAYED = (*_TEXTS, "tool_calls", "function_call")
"""The fields of a delta that make it a piece to relay, when one is not empty."""
_HEAD_TEXTS = ("id", "object", "model", *CHUNK_FIELDS)
"""The text fields of a whole answer and of a chunk, beside their choices."""
_CALL_TEXT = {"function": "arguments", "custom": "input"}
"""What a tool call of each type is called with, streamed in pieces."""


class OpenAIStream:
    """``chat.completion.chunk`` events until ``[DONE]``; the deltas are already canonical
    (``reasoning_content``, which OpenAI-compatible reasoning servers stream, included). Each
    choice (``n`` > 1) is relayed under its own ``index`` and answered whole."""

    def __init__(
        self, adapter: OpenAIAdapter, model: str, secret: str | None, choices: int
    ) -> None:
        self._adapter = adapter
        self._secret = secret
        self._asked = choices
        """The choices (``n``) the job asked for: a chunk of another is a bad response."""
        self._head: dict[str, Any] = {"model": model}
        self._received = 0
        """``text_size`` of content, reasoning, refusal and tool arguments received so far."""
        self._choices: dict[int, _Choice] = {}
        self._usage: Any = None
        self._done = False

    @property
    def model(self) -> str:
        return str(self._head["model"])

    @property
    def ended(self) -> bool:
        return self._done

    def feed(self, event: ServerEvent) -> list[Piece]:
        if event.data.strip() == "[DONE]":
            self._done = True
            return []
        chunk = json_data(event, self._secret)
        if "error" in chunk:
            raise stream_error(chunk["error"], self._secret)
        _check_head(chunk, "a chunk")
        for field in ("id", "created", "model", *CHUNK_FIELDS):
            if chunk.get(field) is not None:
                self._head[field] = chunk[field]
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        sent = {field: self._head[field] for field in CHUNK_FIELDS if field in self._head}
        pieces = []
        # Every value taken from the chunk is checked here, where it is taken: one of another
        # type (content 42, arguments 5) failed the worker inside this parser, its call, which
        # the provider bills, recorded nowhere. A bad response instead: billed as a stream
        # broken after its first event, counted toward the breaker.
        for entry in list_of(chunk.get("choices"), "a chunk's choices"):
            choice = object_of(entry, "a chunk's choice")
            index = _choice_index(choice.get("index"), self._asked)
            given = _check_choice(choice, "a chunk's choice")
            delta = object_of(choice.get("delta"), "a chunk's delta")
            _check_said(delta, "a chunk's delta")
            state = self._choices.setdefault(index, _Choice())
            state.finish = choice.get("finish_reason") or state.finish
            for field in _TEXTS:
                if text := delta.get(field):
                    state.texts[field].append(text)
                    self._received += text_size(text)
            for call in list_of(delta.get("tool_calls"), "a chunk's tool_calls"):
                self._received += state.add_call(object_of(call, "a streamed tool call"))
            if delta.get("function_call"):
                self._received += state.add_function_call(delta["function_call"])
            # An opening chunk may carry empty lists: nothing to relay yet.
            logprobs = given if any(given.values()) else None
            if logprobs is not None:
                state.add_logprobs(logprobs)
            if logprobs is not None or any(map(delta.get, _RELAYED)):
                pieces.append(Piece(delta, index, logprobs, sent))
        return pieces

    def completion(self) -> Completion:
        if not self._choices or any(c.finish is None for c in self._choices.values()):
            raise ProviderError("bad_response", "the stream ended before its finish_reason")
        body = {
            "object": "chat.completion",
            "created": int(time.time()),
            **self._head,
            "choices": [self._choices[i].choice(i) for i in sorted(self._choices)],
        }
        if self._usage is not None:
            body["usage"] = self._usage
        return self._adapter.parse_response(body, self._head["model"], choices=self._asked)

    def received(self, prompt_size: int, ttl: Literal["5m", "1h"] | None) -> Usage:
        """OpenAI sends the usage only in the last chunk: a broken stream is estimated."""
        usage = _usage(self._usage)
        if usage is not None:
            return usage
        return estimated_usage(estimate_tokens(prompt_size), estimate_tokens(self._received), ttl)
