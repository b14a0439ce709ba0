"""The providers' wire formats, as the mock speaks them.

``OPENAI`` answers ``POST /v1/chat/completions`` and ``ANTHROPIC`` answers ``POST /v1/messages``;
``VLLM_SERVER`` answers ``POST /vllm/v1/chat/completions`` as vLLM's OpenAI-compatible server.
Each reads a request into a `Reply` (what the mock model says) and renders it as a JSON body,
as server-sent events, or renders an error, in the provider's documented shape.

Replies are deterministic, so tests can predict them: the text is ``"mock reply to: "`` and the
first 60 characters of the last user text (or tool result), cut at a stop sequence and at
``max_tokens`` words (a word counts as a token); prompt tokens are the characters of all message
text / 4, rounded up. When the request offers tools and the user spoke last, the reply calls the
first tool (or the one ``tool_choice`` names, or the first it allows) with ``{}`` as
arguments (a custom tool with no text). The same conversation
gets the same reply and usage from both providers.

Requests are checked strictly (``mockprovider.validation``). Usage reports what the request
asks for: Anthropic's prompt cache (a prefix marked with ``cache_control`` and at least
``CACHE_MIN_TOKENS`` long is written the first time, read afterwards), OpenAI's automatic
one (the same messages before the last, at least ``CACHE_MIN_TOKENS``, are read the second
time), Anthropic's thinking (a thinking block, ``"mock thinking about: "`` and the quoted
text) and OpenAI's reasoning (``REASONING_TOKENS`` of the effort, no text).

OpenAI answers carry what its API sends beside the text: ``n`` choices (the same reply in
each, every one billed), the ``logprobs`` of each token when asked (``LOGPROB`` each, with
``top_logprobs`` alternatives), ``system_fingerprint``, the ``service_tier`` that served, and
a refusal in ``refusal`` (content null) when the model's behaviour says it refuses.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

from mockprovider.validation import (
    ANTHROPIC_THINKING_ON,
    OPENAI_API,
    SIGNATURE,
    VLLM,
    InvalidRequest,
    check_anthropic,
    check_openai,
)

VLLM_PREFIX = "/vllm"
"""Where the mock is a vLLM server: an ``openai_compatible`` deployment's ``api_base`` is the
mock's URL and this (``MockProvider.vllm_url``)."""
REPLY_PREFIX = "mock reply to: "
QUOTED_CHARS = 60
WORDS_PER_CHUNK = 3
"""Streamed replies arrive in deltas of this many words."""

Finish = Literal["end", "stop_sequence", "length", "tool_use"]
ToolType = Literal["function", "custom"]
TOOL_INPUT: dict[ToolType, tuple[str, str]] = {
    "function": ("arguments", "{}"),
    "custom": ("input", ""),
}
"""The field of an OpenAI tool call holding what the mock calls a tool with, and what it is:
a function with no arguments, a custom tool with no text."""
CACHE_MIN_TOKENS = 1024
"""The shortest prefix either provider caches (shorter ones are sent uncached, no error)."""
THINKING_PREFIX = "mock thinking about: "
REASONING_TOKENS = {
    "minimal": 16,
    "low": 64,
    "medium": 256,
    "high": 1024,
    "xhigh": 2048,
    "max": 4096,
}
"""OpenAI reasoning tokens billed per effort (counted in ``completion_tokens``)."""
SYSTEM_FINGERPRINT = "fp_mock0001"
LOGPROB = -0.25
"""The log probability of every token of an OpenAI answer asked for ``logprobs``."""
SERVED_TIERS = frozenset({"flex", "scale", "priority"})
"""OpenAI tiers that serve as asked; ``auto`` and ``default`` are served by ``default``."""
TEXT_AFTER_TOOL = "mock text after the tool call"


class PromptCache:
    """The prompt prefixes one mock has seen, by digest: a prefix is written once, read after."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def hit(self, prefix: object) -> bool:
        """Whether ``prefix`` was cached before; it is cached from now on."""
        digest = hashlib.sha256(orjson.dumps(prefix, option=orjson.OPT_SORT_KEYS)).digest()
        if digest in self._seen:
            return True
        self._seen.add(digest)
        return False


@dataclass(frozen=True, slots=True)
class Reply:
    """What the mock model says to one request, before it takes a provider's shape."""

    text: str
    finish: Finish
    stop_sequence: str | None
    tool: str | None
    """The name of the tool called; set exactly when ``finish`` is ``tool_use``."""
    input_tokens: int
    """Every prompt token, cached ones included."""
    output_tokens: int
    """Every generated token, reasoning included."""
    cached_tokens: int = 0
    """Prompt tokens read from the cache."""
    cache_write_tokens: int = 0
    cache_ttl: str = "5m"
    reasoning: str = ""
    """Thinking text (Anthropic); empty when the request asked for none."""
    reasoning_shown: bool = True
    """Whether the thinking block carries its text: ``display: omitted`` leaves it out, the
    signature (and the tokens billed) kept."""
    reasoning_tokens: int = 0
    refusal: str | None = None
    """The model refuses (``Behavior.refusal``): OpenAI's ``refusal`` instead of the text."""
    layout: Literal["plain", "split", "tool_first"] = "plain"
    """How an Anthropic answer lays out its blocks (``mockprovider.config.Behavior.layout``)."""
    tool_type: ToolType = "function"
    """What the tool called is (OpenAI's): a function, or a custom tool taking free text."""
    tool_input: str | None = None
    """What the tool is called with, as raw text, in place of ``TOOL_INPUT``'s
    (``mockprovider.config.Behavior.tool_input``)."""
    usage: dict[str, Any] | None = None
    """The usage reported in place of the reply's counts (``Behavior.usage``)."""

    def called_with(self) -> tuple[str, str]:
        """The field of an OpenAI tool call holding its input, and the input."""
        field, value = TOOL_INPUT[self.tool_type]
        return field, value if self.tool_input is None else self.tool_input


def _messages(body: dict[str, Any]) -> list[Any]:
    model, messages = body.get("model"), body.get("messages")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model: a non-empty string is required")
    if not (isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)):
        raise InvalidRequest("messages: a non-empty list of objects is required")
    return messages


def _texts(content: object) -> Iterator[str]:
    """The text in message content: a string, or the text of its parts (tool results included)."""
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for part in content:
            if not isinstance(part, dict):
                continue
            if isinstance(part.get("text"), str):
                yield part["text"]
            elif part.get("type") == "tool_result":
                yield from _texts(part.get("content"))


def _estimate_tokens(*contents: object) -> int:
    chars = sum(len(text) for content in contents for text in _texts(content))
    return -(-chars // 4)


def _last_text(messages: list[dict[str, Any]], roles: tuple[str, ...]) -> str:
    for message in reversed(messages):
        if message.get("role") in roles:
            return " ".join(_texts(message.get("content")))
    return ""


def _positive_int(body: dict[str, Any], field: str) -> int | None:
    value = body.get(field)
    if value is None or (type(value) is int and value >= 1):
        return value
    raise InvalidRequest(f"{field}: must be a positive integer")


def _string_list(value: object, field: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    raise InvalidRequest(f"{field}: must be a string or a list of strings")


def _tools(body: dict[str, Any]) -> list[Any]:
    tools = body.get("tools") or []
    if not isinstance(tools, list):
        raise InvalidRequest("tools: must be a list")
    return tools


def _tool_name(tool: object) -> str:
    name = tool.get("name") if isinstance(tool, dict) else None
    if not isinstance(name, str) or not name:
        raise InvalidRequest("tools: every tool needs a name")
    return name


def _compose(user_text: str, max_tokens: int | None, stops: list[str], input_tokens: int) -> Reply:
    text = REPLY_PREFIX + user_text[:QUOTED_CHARS]
    cut, matched = len(text), None
    for stop in stops:
        at = text.find(stop) if stop else -1
        if 0 <= at < cut:
            cut, matched = at, stop
    words = text[:cut].split()
    finish: Finish = "stop_sequence" if matched else "end"
    if max_tokens is not None and len(words) > max_tokens:
        words, finish, matched = words[:max_tokens], "length", None
    return Reply(" ".join(words), finish, matched, None, input_tokens, len(words))


def _reasoned(reply: Reply, thought: int, limit: int | None) -> Reply:
    """``reply`` after ``thought`` reasoning tokens, all within ``limit`` (the request's
    max_tokens), as the providers count it: reasoning first, then the answer cut to what is
    left, ending ``length`` when it was cut."""
    if limit is not None:
        thought = min(thought, limit)
        room = limit - thought
        if reply.output_tokens > room:
            text = " ".join(reply.text.split()[:room])
            reply = replace(reply, text=text, finish="length", stop_sequence=None, tool=None)
            reply = replace(reply, output_tokens=room)
    return replace(reply, reasoning_tokens=thought, output_tokens=reply.output_tokens + thought)


def _tool_reply(name: str, input_tokens: int, kind: ToolType = "function") -> Reply:
    # Output tokens of a call follow the same characters / 4 rule as prompts: its name and
    # input ("{}" for Anthropic's tools and OpenAI's functions).
    chars = len(name) + len(TOOL_INPUT[kind][1])
    return Reply("", "tool_use", None, name, input_tokens, -(-chars // 4), tool_type=kind)


def _openai_tool(tools: list[Any], choice: object) -> tuple[str, ToolType]:
    """The name and type of the OpenAI tool the mock calls: the one ``tool_choice`` names, the
    first ``allowed_tools`` allows, else the first offered. Tools, named choices and the
    allowed ones alike hold their name under their type: ``{"type": "custom", "custom":
    {"name": ...}}``."""
    tool: object = tools[0]
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        allowed = choice.get("allowed_tools")
        listed = allowed.get("tools") if isinstance(allowed, dict) else None
        tool = listed[0] if isinstance(listed, list) and listed else None
    elif isinstance(choice, dict):
        tool = choice
    if not isinstance(tool, dict) or tool.get("type") not in TOOL_INPUT:
        raise InvalidRequest("tools: every tool needs a type, 'function' or 'custom'")
    kind: ToolType = tool["type"]
    return _tool_name(tool.get(kind)), kind


def _pieces(text: str) -> list[str]:
    """The text in deltas of a few words that concatenate back to exactly ``text``."""
    words = text.split(" ") if text else []
    return [
        " ".join(words[i : i + WORDS_PER_CHUNK]) + (" " if i + WORDS_PER_CHUNK < len(words) else "")
        for i in range(0, len(words), WORDS_PER_CHUNK)
    ]


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


class Wire(ABC):
    """One provider's API: how to read a request and how to shape answers and errors."""

    path: str

    @abstractmethod
    def reply(self, body: dict[str, Any], cache: PromptCache) -> Reply:
        """Validate the request and say what the model replies, reading and filling the
        prompt ``cache``; raises `InvalidRequest`."""

    @abstractmethod
    def completion(self, body: dict[str, Any], reply: Reply) -> dict[str, Any]:
        """The non-streamed response body."""

    @abstractmethod
    def events(self, body: dict[str, Any], reply: Reply) -> Iterator[bytes]:
        """The streamed response, one server-sent event at a time."""

    @abstractmethod
    def error(self, status: int, message: str) -> dict[str, Any]:
        """The error body the provider sends with ``status``."""

    @abstractmethod
    def error_event(self, error: dict[str, Any]) -> bytes:
        """The server-sent event of an ``error`` object reported mid-stream."""

    @abstractmethod
    def quota_headers(self, limit: int, remaining: int, reset: float) -> list[tuple[str, str]]:
        """The provider's request-limit headers: its limit, the requests left, and the seconds
        until the limit is back to its initial state (full)."""


def _data(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


OPENAI_FINISH = {
    "end": "stop",
    "stop_sequence": "stop",
    "length": "length",
    "tool_use": "tool_calls",
}
OPENAI_ERRORS = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
}
"""OpenAI's ``error.type`` and ``error.code`` by status; other 5xx are ``server_error``."""


def _choices(body: dict[str, Any]) -> int:
    n = _positive_int(body, "n")
    return n if n is not None else 1


def _said(reply: Reply) -> tuple[str, str]:
    """The message field the reply's words go in, and the words: a refusal or the text."""
    return ("content", reply.text) if reply.refusal is None else ("refusal", reply.refusal)


def _logprobs(body: dict[str, Any], field: str, text: str) -> dict[str, Any]:
    """OpenAI's ``logprobs`` of ``text`` under ``field`` (``content`` or ``refusal``), a word
    and the spaces after it a token, each with the request's ``top_logprobs`` alternatives
    (the token itself first)."""
    alternatives = body.get("top_logprobs") or 0

    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    def token_entry(token: str) -> dict[str, Any]:
        others = [entry(f"alt{rank}", LOGPROB - rank) for rank in range(1, alternatives)]
        top = [entry(token, LOGPROB), *others] if alternatives else []
        return entry(token, LOGPROB) | {"top_logprobs": top}

    tokens = [token_entry(token) for token in re.findall(r"\S+\s*|\s+", text)]
    return {"content": None, "refusal": None} | {field: tokens}


class OpenAIWire(Wire):
    path = "/v1/chat/completions"
    server = OPENAI_API

    def reply(self, body: dict[str, Any], cache: PromptCache) -> Reply:
        reply = self._reply(body)
        check_openai(body, self.server)
        messages = body["messages"]
        prefix = _estimate_tokens(*(m.get("content") for m in messages[:-1]))
        if prefix >= CACHE_MIN_TOKENS and cache.hit(messages[:-1]):
            reply = replace(reply, cached_tokens=prefix)
        effort = body.get("reasoning_effort")
        if effort in REASONING_TOKENS:
            limit = _positive_int(body, "max_completion_tokens") or _positive_int(
                body, "max_tokens"
            )
            reply = _reasoned(reply, REASONING_TOKENS[effort], limit)
        return reply

    def _reply(self, body: dict[str, Any]) -> Reply:
        messages = _messages(body)
        max_tokens = _positive_int(body, "max_completion_tokens") or _positive_int(
            body, "max_tokens"
        )
        stops = _string_list(body.get("stop"), "stop")
        input_tokens = _estimate_tokens(*(m.get("content") for m in messages))
        tools, choice = _tools(body), body.get("tool_choice")
        if tools and messages[-1].get("role") == "user" and choice != "none":
            name, kind = _openai_tool(tools, choice)
            return _tool_reply(name, input_tokens, kind)
        # Tool results quote like user text, as in Anthropic's format where they are user turns:
        # the same conversation gets the same reply from both providers.
        user_text = _last_text(messages, ("user", "tool"))
        return _compose(user_text, max_tokens, stops, input_tokens)

    def _usage(self, reply: Reply, choices: int) -> dict[str, Any]:
        if reply.usage is not None:
            return reply.usage
        # Every choice is generated, and billed.
        output, reasoning = reply.output_tokens * choices, reply.reasoning_tokens * choices
        return {
            "prompt_tokens": reply.input_tokens,
            "completion_tokens": output,
            "total_tokens": reply.input_tokens + output,
            "prompt_tokens_details": {"cached_tokens": reply.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": reasoning},
        }

    def _head(self, body: dict[str, Any], kind: str) -> dict[str, Any]:
        tier = body.get("service_tier")
        return {
            "id": _new_id("chatcmpl-"),
            "object": kind,
            "created": int(time.time()),
            "model": body["model"],
            "service_tier": tier if tier in SERVED_TIERS else "default",
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }

    def completion(self, body: dict[str, Any], reply: Reply) -> dict[str, Any]:
        field, said = _said(reply)
        message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None}
        message[field] = said
        if reply.tool is not None:
            kind, (field, value) = reply.tool_type, reply.called_with()
            call = {"id": _new_id("call_"), "type": kind, kind: {"name": reply.tool, field: value}}
            message["content"] = None
            message["tool_calls"] = [call]
        logprobs = _logprobs(body, field, said) if body.get("logprobs") is True else None
        choices = [
            {
                "index": index,
                "message": message,
                "logprobs": logprobs,
                "finish_reason": OPENAI_FINISH[reply.finish],
            }
            for index in range(_choices(body))
        ]
        return self._head(body, "chat.completion") | {
            "choices": choices,
            "usage": self._usage(reply, len(choices)),
        }

    def events(self, body: dict[str, Any], reply: Reply) -> Iterator[bytes]:
        base = self._head(body, "chat.completion.chunk")
        options = body.get("stream_options")
        with_usage = isinstance(options, dict) and options.get("include_usage") is True
        field, said = _said(reply)
        with_logprobs = body.get("logprobs") is True

        def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> bytes:
            text = delta.get(field)
            logprobs = _logprobs(body, field, text) if with_logprobs and text else None
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            # With include_usage, OpenAI sends "usage": null on every chunk but the last.
            return _data(base | {"choices": [choice]} | ({"usage": None} if with_usage else {}))

        # The choices' chunks interleave, as OpenAI generates them side by side.
        choices = range(_choices(body))
        for index in choices:
            opening = {"role": "assistant", "content": None, "refusal": None}
            opening[field] = "" if reply.tool is None else None
            yield chunk(index, opening)
        if reply.tool is not None:
            # The chunk schema documents function calls only; a custom call streams the same
            # way under its own type, its input as a function's arguments.
            kind, (field, value) = reply.tool_type, reply.called_with()
            for index in choices:
                start = {"name": reply.tool, field: ""}
                call = {"index": 0, "id": _new_id("call_"), "type": kind, kind: start}
                yield chunk(index, {"tool_calls": [call]})
                if value:
                    yield chunk(index, {"tool_calls": [{"index": 0, kind: {field: value}}]})
        for piece in _pieces(said):
            for index in choices:
                yield chunk(index, {field: piece})
        for index in choices:
            yield chunk(index, {}, OPENAI_FINISH[reply.finish])
        if with_usage:
            yield _data(base | {"choices": [], "usage": self._usage(reply, len(choices))})
        yield b"data: [DONE]\n\n"

    def error(self, status: int, message: str) -> dict[str, Any]:
        kind, code = OPENAI_ERRORS.get(
            status, ("server_error" if status >= 500 else "invalid_request_error", None)
        )
        return {"error": {"message": message, "type": kind, "param": None, "code": code}}

    def error_event(self, error: dict[str, Any]) -> bytes:
        return _data({"error": error})

    def quota_headers(self, limit: int, remaining: int, reset: float) -> list[tuple[str, str]]:
        return [
            ("x-ratelimit-limit-requests", str(limit)),
            ("x-ratelimit-remaining-requests", str(remaining)),
            ("x-ratelimit-reset-requests", _duration(reset)),
        ]


def _duration(seconds: float) -> str:
    """OpenAI's way of writing a reset time: ``20ms``, ``1.5s``, ``6m0s``."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    minutes, rest = divmod(round(seconds, 3), 60)
    return f"{int(minutes)}m{rest:g}s" if minutes else f"{rest:g}s"


def _event(obj: dict[str, Any]) -> bytes:
    return b"event: " + str(obj["type"]).encode() + b"\n" + _data(obj)


ANTHROPIC_STOP = {
    "end": "end_turn",
    "stop_sequence": "stop_sequence",
    "length": "max_tokens",
    "tool_use": "tool_use",
}
ANTHROPIC_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def _block_events(block: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """One block's stream events, without their ``index``: its start (empty), its deltas (a
    thinking block's signature last, in a ``signature_delta``), its stop."""
    kind = block["type"]
    if kind == "thinking":
        yield _started({"type": "thinking", "thinking": "", "signature": ""})
        for piece in _pieces(block["thinking"]):
            yield _delta({"type": "thinking_delta", "thinking": piece})
        yield _delta({"type": "signature_delta", "signature": block["signature"]})
    elif kind == "tool_use":
        yield _started(block | {"input": {}})  # as Anthropic: the input comes in the delta
        yield _delta(
            {"type": "input_json_delta", "partial_json": orjson.dumps(block["input"]).decode()}
        )
    else:
        yield _started({"type": "text", "text": ""})
        for piece in _pieces(block["text"]):
            yield _delta({"type": "text_delta", "text": piece})
    yield {"type": "content_block_stop"}


def _started(block: dict[str, Any]) -> dict[str, Any]:
    return {"type": "content_block_start", "content_block": block}


def _delta(delta: dict[str, Any]) -> dict[str, Any]:
    return {"type": "content_block_delta", "delta": delta}


def _is_user_text(message: dict[str, Any]) -> bool:
    """A user turn that is not only handing back tool results (those are user turns too)."""
    content = message.get("content")
    returns_tool = isinstance(content, list) and any(
        isinstance(part, dict) and part.get("type") == "tool_result" for part in content
    )
    return message.get("role") == "user" and not returns_tool


class AnthropicWire(Wire):
    path = "/v1/messages"

    def reply(self, body: dict[str, Any], cache: PromptCache) -> Reply:
        reply = self._reply(body)
        check_anthropic(body)
        reply = self._cached(body, reply, cache)
        thinking = body.get("thinking")
        # Adaptive thinking leaves it to the model whether to think: the mock always does.
        if isinstance(thinking, dict) and thinking.get("type") in ANTHROPIC_THINKING_ON:
            quoted = _last_text(body["messages"], ("user",))[:QUOTED_CHARS]
            thought = THINKING_PREFIX + quoted
            limit = _positive_int(body, "max_tokens")
            assert limit is not None  # _reply refused the request without it
            reply = replace(
                _reasoned(reply, len(thought.split()), limit),
                reasoning=thought,
                reasoning_shown=thinking.get("display") != "omitted",
            )
        return reply

    def _cached(self, body: dict[str, Any], reply: Reply, cache: PromptCache) -> Reply:
        """Tools, then system, then messages, up to the last block marked ``cache_control``."""
        system = body.get("system")
        items: list[Any] = [*(body.get("tools") or [])]
        items += system if isinstance(system, list) else [{"type": "text", "text": system or ""}]
        for message in body["messages"]:
            content = message.get("content")
            blocks = content if isinstance(content, list) else [{"type": "text", "text": content}]
            items += [{"role": message.get("role")} | block for block in blocks]
        marked = [i for i, item in enumerate(items) if item.get("cache_control") is not None]
        if not marked:
            return reply
        prefix = items[: marked[-1] + 1]
        tokens = _estimate_tokens(prefix)
        if tokens < CACHE_MIN_TOKENS:
            return reply
        if cache.hit(prefix):
            return replace(reply, cached_tokens=tokens)
        ttl = (
            "1h" if any((i.get("cache_control") or {}).get("ttl") == "1h" for i in prefix) else "5m"
        )
        return replace(reply, cache_write_tokens=tokens, cache_ttl=ttl)

    def _reply(self, body: dict[str, Any]) -> Reply:
        messages = _messages(body)
        max_tokens = _positive_int(body, "max_tokens")
        if max_tokens is None:
            raise InvalidRequest("max_tokens: Field required")
        system = body.get("system")
        if system is not None and not isinstance(system, str | list):
            raise InvalidRequest("system: must be a string or a list of text blocks")
        stops = _string_list(body.get("stop_sequences"), "stop_sequences")
        input_tokens = _estimate_tokens(system, *(m.get("content") for m in messages))
        tools, choice = _tools(body), body.get("tool_choice") or {}
        if not isinstance(choice, dict):
            raise InvalidRequest("tool_choice: must be an object")
        if tools and _is_user_text(messages[-1]) and choice.get("type") != "none":
            # {"type": "tool", "name": ...} forces that tool.
            tool = choice if choice.get("type") == "tool" else tools[0]
            return _tool_reply(_tool_name(tool), input_tokens)
        return _compose(_last_text(messages, ("user",)), max_tokens, stops, input_tokens)

    def _usage(self, reply: Reply, output_tokens: int) -> dict[str, Any]:
        if reply.usage is not None:
            return reply.usage
        written = reply.cache_write_tokens
        usage: dict[str, Any] = {
            # Anthropic counts cache reads and writes apart from input_tokens.
            "input_tokens": reply.input_tokens - reply.cached_tokens - written,
            "output_tokens": output_tokens,
            "cache_creation_input_tokens": written,
            "cache_read_input_tokens": reply.cached_tokens,
            "cache_creation": {
                "ephemeral_5m_input_tokens": written if reply.cache_ttl == "5m" else 0,
                "ephemeral_1h_input_tokens": written if reply.cache_ttl == "1h" else 0,
            },
        }
        if reply.reasoning:
            usage["output_tokens_details"] = {"thinking_tokens": reply.reasoning_tokens}
        return usage

    def _blocks(self, reply: Reply) -> list[dict[str, Any]]:
        """The answer's blocks, laid out as ``reply.layout`` says."""
        blocks: list[dict[str, Any]] = []
        if reply.reasoning:
            thought = reply.reasoning if reply.reasoning_shown else ""
            blocks.append({"type": "thinking", "thinking": thought, "signature": SIGNATURE})
        if reply.tool is not None:
            called = {} if reply.tool_input is None else orjson.loads(reply.tool_input)
            blocks.append(
                {"type": "tool_use", "id": _new_id("toolu_"), "name": reply.tool, "input": called}
            )
            if reply.layout == "tool_first":
                blocks.append({"type": "text", "text": TEXT_AFTER_TOOL})
        elif reply.layout == "split" and " " in reply.text:
            first, rest = reply.text.split(" ", 1)
            blocks += [{"type": "text", "text": first + " "}, {"type": "text", "text": rest}]
        else:
            blocks.append({"type": "text", "text": reply.text})
        return blocks

    def completion(self, body: dict[str, Any], reply: Reply) -> dict[str, Any]:
        return {
            "id": _new_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": self._blocks(reply),
            "stop_reason": ANTHROPIC_STOP[reply.finish],
            "stop_sequence": reply.stop_sequence,
            "usage": self._usage(reply, reply.output_tokens),
        }

    def events(self, body: dict[str, Any], reply: Reply) -> Iterator[bytes]:
        message = {
            "id": _new_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            # As documented, message_start carries a placeholder output count;
            # message_delta carries the real one.
            "usage": self._usage(reply, 1),
        }
        yield _event({"type": "message_start", "message": message})
        for index, block in enumerate(self._blocks(reply)):
            for n, event in enumerate(_block_events(block)):
                yield _event({"type": event["type"], "index": index} | event)
                if index == n == 0:  # as Anthropic: a ping after the first block's start
                    yield _event({"type": "ping"})
        stop = {"stop_reason": ANTHROPIC_STOP[reply.finish], "stop_sequence": reply.stop_sequence}
        usage = reply.usage if reply.usage is not None else {"output_tokens": reply.output_tokens}
        yield _event({"type": "message_delta", "delta": stop, "usage": usage})
        yield _event({"type": "message_stop"})

    def error(self, status: int, message: str) -> dict[str, Any]:
        kind = ANTHROPIC_ERRORS.get(
            status, "api_error" if status >= 500 else "invalid_request_error"
        )
        return {"type": "error", "error": {"type": kind, "message": message}}

    def error_event(self, error: dict[str, Any]) -> bytes:
        return _event({"type": "error", "error": error})

    def quota_headers(self, limit: int, remaining: int, reset: float) -> list[tuple[str, str]]:
        # Anthropic names the instant the limit is full again, in RFC 3339.
        full = datetime.fromtimestamp(time.time() + reset, UTC)
        return [
            ("anthropic-ratelimit-requests-limit", str(limit)),
            ("anthropic-ratelimit-requests-remaining", str(remaining)),
            ("anthropic-ratelimit-requests-reset", full.strftime("%Y-%m-%dT%H:%M:%SZ")),
        ]


class VLLMWire(OpenAIWire):
    """vLLM's OpenAI-compatible server: OpenAI's wire, taking what vLLM takes (``VLLM``)."""

    path = VLLM_PREFIX + OpenAIWire.path
    server = VLLM


OPENAI = OpenAIWire()
VLLM_SERVER = VLLMWire()
ANTHROPIC = AnthropicWire()
