"""A provider (or a proxy before it) that echoes the key inside a successful answer: in its
id, its model, its system fingerprint or its text, whole or streamed, written as it is or
with JSON ``\\u`` escapes. The key reaches neither the answer, nor its stream, nor its span,
nor the result stored in Redis. Over real HTTP against a small server in the test that
echoes whatever key it is called with."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web

from mockprovider.catalog import mock_deployment
from queuegate.keys import Keys
from queuegate.messages import ChatJob
from queuegate.provider_formats import anthropic_message
from queuegate.settings import Settings
from router import Catalog, open_router
from router.providers import Piece
from tests.support import running_gateway, serving
from tests.test_tracing import in_memory

KEY = "sk-SENTINEL-echoed/0123456789abcdef"
"""With a ``/``, as AWS-style secrets have, which JSON may write ``\\/``."""
MOCK_KEY = "sk-test-mock"  # the key running_gateway gives the worker


def _openai(key: str, stream: bool) -> list[dict[str, Any]]:
    head = {
        "id": f"chatcmpl-{key}",
        "created": 1,
        "model": f"echo-{key}",
        "system_fingerprint": f"fp_{key}",
    }
    if not stream:
        message = {"role": "assistant", "content": f"your key is {key}"}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        usage = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
        return [{**head, "object": "chat.completion", "choices": [choice], "usage": usage}]
    chunk = {**head, "object": "chat.completion.chunk"}
    return [
        {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "your "}}]},
        {**chunk, "choices": [{"index": 0, "delta": {"content": f"key is {key}"}}]},
        {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {**chunk, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5}},
    ]


def _anthropic(key: str, stream: bool) -> list[dict[str, Any]]:
    message = {"id": f"msg_{key}", "type": "message", "role": "assistant", "model": f"echo-{key}"}
    if not stream:
        return [
            message
            | {
                "content": [{"type": "text", "text": f"your key is {key}"}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {"input_tokens": 3, "output_tokens": 5},
            }
        ]
    start = message | {"content": [], "stop_reason": None, "usage": {"input_tokens": 3}}
    return [
        {"type": "message_start", "message": start},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": key}},
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn"},
            "usage": {"output_tokens": 5},
        },
        {"type": "message_stop"},
    ]


ESCAPES = ["literal", "one-escaped", "all-escaped", "slash-escaped"]
"""How the key is written in the answer's JSON: as it is, its fourth character as a ``\\u``
escape (``sk-\\u0053ENTINEL...``), every character so, or its ``/`` as ``\\/``."""


def _json(said: dict[str, Any], key: str, escaped: str) -> str:
    """``said`` as JSON, with the key written as ``escaped`` says."""
    text = json.dumps(said)
    if escaped == "literal":
        return text
    if escaped == "slash-escaped":
        return text.replace(key, key.replace("/", "\\/"))
    chosen = range(3, 4) if escaped == "one-escaped" else range(len(key))
    written = "".join(f"\\u{ord(c):04x}" if i in chosen else c for i, c in enumerate(key))
    return text.replace(key, written)


Said = Callable[[str, bool, bool], list[dict[str, Any]]]
"""What a provider says, as the key it was called with, whether it streams and whether it
speaks Anthropic's wire make it: the answer, or each event of its stream."""


def _echoing(key: str, stream: bool, anthropic: bool) -> list[dict[str, Any]]:
    """The answer of a provider that echoes the key everywhere it can."""
    return (_anthropic if anthropic else _openai)(key, stream)


async def _answer(request: web.Request, escaped: str, said_of: Said) -> web.StreamResponse:
    body = await request.json()
    anthropic = request.path == "/v1/messages"
    if anthropic:
        key = request.headers["x-api-key"]
    else:
        key = request.headers["authorization"].removeprefix("Bearer ")
    stream = body.get("stream") is True
    said = said_of(key, stream, anthropic)
    if not stream:
        return web.json_response(text=_json(said[0], key, escaped))
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    for event in said:
        name = f"event: {event['type']}\n" if anthropic else ""
        await response.write(f"{name}data: {_json(event, key, escaped)}\n\n".encode())
    if not anthropic:
        await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def _split(key: str, stream: bool, anthropic: bool) -> list[dict[str, Any]]:
    """As ``_echoing``, a stream's text cut inside the key, across two events."""
    said = _echoing(key, stream, anthropic)
    if not stream:
        return said
    at = 2 if anthropic else 1  # the event whose text is the key
    first, second = copy.deepcopy(said[at]), copy.deepcopy(said[at])
    if anthropic:
        first["delta"]["text"], second["delta"]["text"] = key[:8], key[8:]
    else:
        first["choices"][0]["delta"]["content"] = f"key is {key[:8]}"
        second["choices"][0]["delta"]["content"] = key[8:]
    return [*said[:at], first, second, *said[at + 1 :]]


WRITINGS = [
    "in-arguments",
    "nested-in-arguments",
    "twice-nested-in-arguments",
    "backslash-escaped",
    "slash-escaped",
]
"""How tool arguments (JSON text) write the key: their string holds it all in ``\\u``
escapes, or that JSON text is itself inside one or two more levels of JSON strings, or their
string holds the key's escapes as text, each one's backslash written as an escape
(``\\u005cu0073``): decoded twice, the key; or it holds the key with its ``/`` escaped,
nested once."""


def _arguments(key: str, writing: str) -> str:
    """Tool arguments writing the key as ``writing`` says (``WRITINGS``)."""
    if writing == "slash-escaped":
        return json.dumps({"j": json.dumps({"k": key}).replace("/", "\\/")})
    escape = "\\u005cu{:04x}" if writing == "backslash-escaped" else "\\u{:04x}"
    text = json.dumps({"k": key}).replace(key, "".join(escape.format(ord(c)) for c in key))
    for _ in range(("nested" in writing) + ("twice" in writing)):
        text = json.dumps({"j": text})
    return text


def _tool_calling(key: str, stream: bool, anthropic: bool, writing: str) -> list[dict[str, Any]]:
    """An answer calling a tool with the key written in its arguments (``_arguments``), and
    nowhere else."""
    return _calling(_arguments(key, writing), stream, anthropic)


def _calling(arguments: str, stream: bool, anthropic: bool) -> list[dict[str, Any]]:
    """An answer calling a tool with ``arguments``: an Anthropic whole answer's input holds
    them as a string."""
    if anthropic:
        message = {"id": "msg_1", "type": "message", "role": "assistant", "model": "echo"}
        block = {"type": "tool_use", "id": "toolu_1", "name": "lookup"}
        if not stream:
            return [
                message
                | {
                    "content": [block | {"input": {"t": arguments}}],
                    "stop_reason": "tool_use",
                    "usage": {"input_tokens": 3, "output_tokens": 5},
                }
            ]
        start = message | {"content": [], "stop_reason": None, "usage": {"input_tokens": 3}}
        delta = {"type": "input_json_delta", "partial_json": arguments}
        return [
            {"type": "message_start", "message": start},
            {"type": "content_block_start", "index": 0, "content_block": block | {"input": {}}},
            {"type": "content_block_delta", "index": 0, "delta": delta},
            {"type": "content_block_stop", "index": 0},
            {
                "type": "message_delta",
                "delta": {"stop_reason": "tool_use"},
                "usage": {"output_tokens": 5},
            },
            {"type": "message_stop"},
        ]
    head = {"id": "chatcmpl-1", "created": 1, "model": "echo"}
    call = {"id": "call_1", "type": "function", "function": {"name": "lookup"}}
    if not stream:
        message = {"role": "assistant", "content": None, "tool_calls": [call]}
        call["function"]["arguments"] = arguments
        choice = {"index": 0, "message": message, "finish_reason": "tool_calls"}
        usage = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
        return [{**head, "object": "chat.completion", "choices": [choice], "usage": usage}]
    chunk = {**head, "object": "chat.completion.chunk"}
    opening = {"role": "assistant", "tool_calls": [{"index": 0, **call}]}
    piece = {"tool_calls": [{"index": 0, "function": {"arguments": arguments}}]}
    return [
        {**chunk, "choices": [{"index": 0, "delta": opening}]},
        {**chunk, "choices": [{"index": 0, "delta": piece}]},
        {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        {**chunk, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5}},
    ]


def _read(value: Any) -> Iterator[str]:
    """Every string of ``value``, and of the JSON text any of them is, however deep: what a
    caller (or anyone reading a trace or a stored result) decoding what it got may read."""
    if isinstance(value, str):
        yield value
        try:
            inner = json.loads(value)
        except ValueError:
            return
        if inner != value:
            yield from _read(inner)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _read(item)
    elif isinstance(value, dict):
        for name, item in value.items():
            yield from _read(name)
            yield from _read(item)


@contextlib.asynccontextmanager
async def echoing_provider(escaped: str = "literal", said: Said = _echoing) -> AsyncIterator[str]:
    """The URL of a provider answering both wires, saying what ``said`` makes of the caller's
    key, the key written as ``escaped`` says (``ESCAPES``)."""
    app = web.Application()
    answer = functools.partial(_answer, escaped=escaped, said_of=said)
    app.router.add_post("/v1/chat/completions", answer)
    app.router.add_post("/v1/messages", answer)
    async with serving(app) as url:
        yield url


def chat(model: str, *, stream: bool) -> ChatJob:
    return ChatJob.model_validate(
        {
            "job_id": f"job-{time.monotonic_ns()}",
            "team": "alpha",
            "model": model,
            "messages": [{"role": "user", "content": "Hello there"}],
            "stream": stream,
        }
    )


@pytest.mark.parametrize("escaped", ESCAPES)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_a_key_echoed_in_a_successful_answer_reaches_neither_the_answer_nor_its_span(
    settings: Settings, provider: str, stream: bool, escaped: str
) -> None:
    # Given a provider that echoes the key in the id, the model and the text of its answers,
    # written as it is or with JSON escapes
    deltas: list[tuple[Piece, str, str]] = []

    async def relay(piece: Piece, model: str, alias: str) -> None:
        deltas.append((piece, model, alias))

    async with echoing_provider(escaped) as url:
        entry = mock_deployment("d", "m", url, provider=provider)
        catalog = Catalog.model_validate({"models": {"m": {"deployments": [entry]}}})
        # When a job is served from it, traced
        with in_memory() as exported:
            async with open_router(catalog, {"QUEUEGATE_MOCK_KEY": KEY}, settings) as router:
                routed = await router.complete(chat("m", stream=stream), on_delta=relay)
            spans = exported.get_finished_spans()

    # Expect the key redacted where it was echoed: the answer, each delta, the span
    response = routed.response
    assert "[redacted]" in response["id"] and "[redacted]" in response["model"]
    assert response["choices"][0]["message"]["content"].endswith("[redacted]")
    attributes = [dict(span.attributes or {}) for span in spans]
    [answered] = [a for a in attributes if "gen_ai.response.id" in a]
    assert "[redacted]" in str(answered["gen_ai.response.id"])
    assert stream == bool(deltas)
    said = repr(response) + repr(deltas) + repr(attributes)
    assert KEY not in said and "SENTINEL" not in said


@pytest.mark.parametrize("writing", WRITINGS)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_a_key_written_in_escapes_inside_tool_arguments_is_redacted_where_they_decode(
    settings: Settings, provider: str, stream: bool, writing: str
) -> None:
    # Given a provider calling a tool with the key in its arguments, JSON text whose string
    # writes it in \u escapes, as WRITINGS says: one level of decoding shows the escapes, or
    # escapes of them, not the key
    deltas: list[Piece] = []

    async def relay(piece: Piece, model: str, alias: str) -> None:
        deltas.append(piece)

    said = functools.partial(_tool_calling, writing=writing)
    async with echoing_provider(said=said) as url:
        entry = mock_deployment("d", "m", url, provider=provider)
        catalog = Catalog.model_validate({"models": {"m": {"deployments": [entry]}}})
        # When a job is served from it, traced with its content
        with in_memory(content=True) as exported:
            async with open_router(catalog, {"QUEUEGATE_MOCK_KEY": KEY}, settings) as router:
                routed = await router.complete(chat("m", stream=stream), on_delta=relay)
            spans = exported.get_finished_spans()

    # Expect the tool called with arguments still JSON, the key redacted in them, and no text
    # of the answer, its deltas or its spans holding it however deeply it is decoded
    [call] = routed.response["choices"][0]["message"]["tool_calls"]
    arguments = json.loads(call["function"]["arguments"])
    assert any("[redacted]" in text for text in _read(arguments))
    assert stream == bool(deltas)
    attributes = [dict(span.attributes or {}) for span in spans]
    relayed = [dataclasses.asdict(piece) for piece in deltas]
    assert [text for text in _read([routed.response, relayed, attributes]) if KEY in text] == []


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_a_key_cut_across_two_stream_events_is_relayed_in_its_pieces_and_not_kept(
    settings: Settings, provider: str
) -> None:
    # Given a provider streaming its text with the key cut across two events
    deltas: list[Piece] = []

    async def relay(piece: Piece, model: str, alias: str) -> None:
        deltas.append(piece)

    async with echoing_provider(said=_split) as url:
        entry = mock_deployment("d", "m", url, provider=provider)
        catalog = Catalog.model_validate({"models": {"m": {"deployments": [entry]}}})
        # When a streamed job is served from it, traced with its content
        with in_memory(content=True) as exported:
            async with open_router(catalog, {"QUEUEGATE_MOCK_KEY": KEY}, settings) as router:
                routed = await router.complete(chat("m", stream=True), on_delta=relay)
            spans = exported.get_finished_spans()

    # Expect its two pieces relayed as they came (no event held it whole), and the answer,
    # which is kept, and its spans with the key redacted
    assert KEY in "".join(piece.delta.get("content") or "" for piece in deltas)
    assert routed.response["choices"][0]["message"]["content"].endswith("[redacted]")
    attributes = [dict(span.attributes or {}) for span in spans]
    assert [text for text in _read([routed.response, attributes]) if KEY in text] == []


BLOCKS = ["text", "thinking", "text-around-a-tool-call"]
"""Which content blocks of an Anthropic whole answer the key is cut across: two text
blocks, two thinking blocks, or two text blocks with a tool call between them."""


def _blocks(key: str, stream: bool, anthropic: bool, cut: str) -> list[dict[str, Any]]:
    """As ``_echoing``, an Anthropic whole answer's key cut across two content blocks, as
    ``cut`` says (``BLOCKS``), which the gateway joins into one text of its own answer."""
    said = _echoing(key, stream, anthropic)
    if stream or not anthropic:
        return said
    kind = "thinking" if cut == "thinking" else "text"
    first, second = ({"type": kind, kind: piece} for piece in (key[:8], key[8:]))
    if kind == "thinking":
        first["signature"] = second["signature"] = "sig"
    between = [{"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {}}]
    blocks = [first, *between, second] if "tool" in cut else [first, second]
    return [said[0] | {"content": blocks}]


@pytest.mark.parametrize("cut", BLOCKS)
async def test_a_key_cut_across_two_content_blocks_of_a_whole_answer_is_not_in_its_text(
    settings: Settings, cut: str
) -> None:
    # Given an Anthropic provider whose whole answer cuts the key across two content blocks
    async with echoing_provider(said=functools.partial(_blocks, cut=cut)) as url:
        entry = mock_deployment("d", "m", url, provider="anthropic")
        catalog = Catalog.model_validate({"models": {"m": {"deployments": [entry]}}})
        # When a job is served from it, traced with its content
        with in_memory(content=True) as exported:
            async with open_router(catalog, {"QUEUEGATE_MOCK_KEY": KEY}, settings) as router:
                routed = await router.complete(chat("m", stream=False))
            spans = exported.get_finished_spans()

    # Expect the text the gateway joined of the two with the key redacted, in the answer and
    # its spans (each block, in the native body beside it, holds only a piece of it)
    message = routed.response["choices"][0]["message"]
    joined = message["reasoning_content" if cut == "thinking" else "content"]
    assert joined == "[redacted]"
    attributes = [dict(span.attributes or {}) for span in spans]
    assert [text for text in _read([routed.response, attributes]) if KEY in text] == []
    # ... and in the message an Anthropic caller is answered, stored and cached with
    # (before: the provider's blocks as sent, each holding a piece of the key)
    said = anthropic_message(routed.response, "msg_1")["content"]
    pieces = "".join(block.get("text") or block.get("thinking") or "" for block in said)
    assert KEY not in pieces


PAIR = "\\ud83d\\ude00"
"""An emoji as JSON text writes it: a surrogate pair's two escapes, as text."""


def _beside_a_pair(key: str, stream: bool, anthropic: bool, where: str) -> list[dict[str, Any]]:
    """An OpenAI whole answer with the key written as escapes of escapes (``\\u005cu0073``,
    only decoding loosely shows it) and an emoji as the escapes of its surrogate pair, both as
    text: in the tool call's arguments (JSON text) or in the content (no JSON text)."""
    said = _tool_calling(key, stream, anthropic, "backslash-escaped")
    message = said[0]["choices"][0]["message"]
    hidden = "".join(f"\\u005cu{ord(c):04x}" for c in key)
    if where == "content":
        message["content"] = f"{hidden} {PAIR}"
    else:
        message["tool_calls"][0]["function"]["arguments"] = f'{{"k":"{hidden}","q":"{PAIR}"}}'
    return said


@pytest.mark.parametrize("where", ["arguments", "content"])
async def test_a_key_redacted_beside_a_surrogate_pair_leaves_the_answer_writable(
    settings: Settings, where: str
) -> None:
    # Given a provider answering with the key hidden behind escapes of escapes, and an emoji
    # written as its surrogate pair's escapes, as text
    said = functools.partial(_beside_a_pair, where=where)
    async with echoing_provider(said=said) as url:
        entry = mock_deployment("d", "m", url, provider="openai")
        catalog = Catalog.model_validate({"models": {"m": {"deployments": [entry]}}})
        # When a job is served from it
        async with open_router(catalog, {"QUEUEGATE_MOCK_KEY": KEY}, settings) as router:
            routed = await router.complete(chat("m", stream=False))

    # Expect the key redacted, and the answer writable as UTF-8 (no half of the pair decoded
    # alone), the emoji as it was
    message = routed.response["choices"][0]["message"]
    json.dumps(routed.response, ensure_ascii=False).encode()
    if where == "content":
        assert message["content"] == f"[redacted] {PAIR}"
    else:
        arguments = json.loads(message["tool_calls"][0]["function"]["arguments"])
        assert arguments == {"k": "[redacted]", "q": "\U0001f600"}
    assert [text for text in _read(routed.response) if KEY in text] == []


SIBLINGS = {"c2": "\\u0041", "m": "\\\\u0041", "e": "\U0001f600", "n": [1.10, 10**20]}
"""Arguments beside the key whose strings write escapes as text (``\\u0041``, ``\\\\u0041``),
and what decoding loosely, or writing again, may change: an emoji, numbers."""


def _with_siblings(key: str, stream: bool, anthropic: bool, nested: bool) -> list[dict[str, Any]]:
    """An answer calling a tool whose arguments hold the key written all in ``\\u`` escapes
    beside ``SIBLINGS``, or hold such JSON text as a string (``nested``)."""
    written = json.dumps({"k": "KEY", **SIBLINGS}).replace(
        "KEY", "".join(f"\\u{ord(c):04x}" for c in key)
    )
    return _calling(json.dumps({"j": written}) if nested else written, stream, anthropic)


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_tool_arguments_with_the_key_redacted_mean_the_same_otherwise(
    settings: Settings, provider: str, stream: bool, nested: bool
) -> None:
    # Given a provider calling a tool with the key in escapes beside other arguments that
    # write escapes as text
    deltas: list[Piece] = []

    async def relay(piece: Piece, model: str, alias: str) -> None:
        deltas.append(piece)

    said = functools.partial(_with_siblings, nested=nested)
    async with echoing_provider(said=said) as url:
        entry = mock_deployment("d", "m", url, provider=provider)
        catalog = Catalog.model_validate({"models": {"m": {"deployments": [entry]}}})
        # When a job is served from it
        async with open_router(catalog, {"QUEUEGATE_MOCK_KEY": KEY}, settings) as router:
            routed = await router.complete(chat("m", stream=stream), on_delta=relay)

    # Expect the key redacted, and every other argument as it was sent, in the answer and in
    # what was relayed of it
    assert stream == bool(deltas)
    [call] = routed.response["choices"][0]["message"]["tool_calls"]
    relayed = "".join(
        called["function"].get("arguments") or ""
        for piece in deltas
        for called in piece.delta.get("tool_calls") or []
    )
    for written in [call["function"]["arguments"], *([relayed] if stream else [])]:
        arguments = json.loads(written)
        if provider == "anthropic" and not stream:  # its input, {"t": the arguments}
            arguments = json.loads(arguments["t"])
        if nested:
            arguments = json.loads(arguments["j"])
        assert arguments == {"k": "[redacted]", **SIBLINGS}


@pytest.mark.parametrize(
    ("escaped", "said"),
    [("literal", _echoing), ("all-escaped", _echoing), ("literal", _split)],
    ids=["literal", "all-escaped", "cut-across-events"],
)
async def test_a_key_echoed_in_a_successful_answer_is_not_in_the_stored_result(
    settings: Settings, redis_client: aioredis.Redis, tmp_path: Path, escaped: str, said: Said
) -> None:
    # Given a gateway whose deployments (one per wire) echo the key in their answers, written
    # as it is or with every character a JSON escape, or cut across two events of a stream
    async with echoing_provider(escaped, said) as url:
        catalog = tmp_path / "catalog.yaml"
        entries = {
            alias: {"deployments": [mock_deployment(alias, alias, url, provider=alias)]}
            for alias in ("openai", "anthropic")
        }
        catalog.write_text(json.dumps({"models": entries}))  # YAML reads JSON
        async with (
            running_gateway(settings, catalog=catalog) as gw,
            gw.client("alpha") as client,
        ):
            # When jobs are answered by a provider echoing the key, whole and streamed
            results = [
                await client.chat(alias, [{"role": "user", "content": "Hi"}]) for alias in entries
            ]
            chunks = []
            for alias in entries:
                stream = client.stream(alias, [{"role": "user", "content": "Hi"}], timeout=10)
                chunks += [chunk async for chunk in stream]
                assert stream.result is not None
                results.append(stream.result)
            stored = [
                await redis_client.get(Keys(settings.redis_prefix).result("alpha", r.job_id))
                for r in results
            ]

    # Expect each answered, with the key redacted from what the caller got and Redis keeps
    assert [r.status for r in results] == ["ok"] * 4
    assert all(r.content is not None and r.content.endswith("[redacted]") for r in results)
    assert chunks and all(value is not None for value in stored)
    said = repr([r.model_dump_json() for r in results]) + repr(chunks) + repr(stored)
    assert MOCK_KEY not in said and "[redacted]" in said
