"""Streamed answers, pure: the providers' documented event streams into canonical deltas."""

from __future__ import annotations

import json
from typing import Any

import pytest

from router.providers import AnthropicAdapter, OpenAIAdapter, ProviderError, ServerEvent
from router.transport import EventParser, LineSplitter

CLAUDE = "claude-3-5-sonnet-20241022"


def anthropic_events(*events: dict[str, Any]) -> list[ServerEvent]:
    return [ServerEvent(str(e["type"]), json.dumps(e)) for e in events]


def openai_events(*chunks: dict[str, Any] | str) -> list[ServerEvent]:
    return [ServerEvent(None, c if isinstance(c, str) else json.dumps(c)) for c in chunks]


# Anthropic's "Basic streaming request" example (docs: Messages, Streaming Messages).
ANTHROPIC_TEXT = anthropic_events(
    {
        "type": "message_start",
        "message": {
            "id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY",
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": CLAUDE,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 25, "output_tokens": 1},
        },
    },
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "ping"},
    {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": "Hello"},
    },
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "!"}},
    {"type": "content_block_stop", "index": 0},
    {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"output_tokens": 15},
    },
    {"type": "message_stop"},
)

# Anthropic's "Streaming request with tool use" example, shortened: text, then a tool_use
# block whose input arrives as partial JSON.
ANTHROPIC_TOOL = anthropic_events(
    {
        "type": "message_start",
        "message": {
            "id": "msg_014p7gG3wDgGV9EUtLvnow3U",
            "type": "message",
            "role": "assistant",
            "model": CLAUDE,
            "content": [],
            "usage": {"input_tokens": 472, "output_tokens": 2},
        },
    },
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": "Okay, let's check the weather"},
    },
    {"type": "content_block_stop", "index": 0},
    {
        "type": "content_block_start",
        "index": 1,
        "content_block": {
            "type": "tool_use",
            "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
            "name": "get_weather",
            "input": {},
        },
    },
    {
        "type": "content_block_delta",
        "index": 1,
        "delta": {"type": "input_json_delta", "partial_json": ""},
    },
    {
        "type": "content_block_delta",
        "index": 1,
        "delta": {"type": "input_json_delta", "partial_json": '{"location":'},
    },
    {
        "type": "content_block_delta",
        "index": 1,
        "delta": {"type": "input_json_delta", "partial_json": ' "San Francisco, CA"}'},
    },
    {"type": "content_block_stop", "index": 1},
    {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {"output_tokens": 89},
    },
    {"type": "message_stop"},
)


def _openai_chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-123",
        "object": "chat.completion.chunk",
        "created": 1694268190,
        "model": "gpt-4o-mini",
        "system_fingerprint": "fp_44709d6fcb",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


# OpenAI's streaming example (API reference: The chat completion chunk object), with
# stream_options.include_usage, so a last chunk with empty choices carries the usage.
OPENAI_TEXT = openai_events(
    _openai_chunk({"role": "assistant", "content": ""}),
    _openai_chunk({"content": "Hello"}),
    _openai_chunk({"content": "!"}),
    _openai_chunk({}, "stop"),
    {
        **_openai_chunk({}),
        "choices": [],
        "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
    },
    "[DONE]",
)


def feed(parser: Any, events: list[ServerEvent]) -> list[dict[str, Any]]:
    return [piece.delta for event in events for piece in parser.feed(event)]


def canonical(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The deltas with content: without those of pieces carrying Anthropic's events alone."""
    return [delta for delta in deltas if delta]


def test_anthropic_text_stream_becomes_content_deltas_and_a_completion() -> None:
    parser = AnthropicAdapter().stream_parser(CLAUDE, None)

    deltas = canonical(feed(parser, ANTHROPIC_TEXT))
    completion = parser.completion()

    assert deltas == [{"content": "Hello"}, {"content": "!"}]
    choice = completion.response["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "Hello!"}
    assert choice["finish_reason"] == "stop"
    assert completion.response["id"] == "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY"
    assert (completion.usage.input_tokens, completion.usage.output_tokens) == (25, 15)


def test_anthropic_tool_use_stream_becomes_openai_tool_call_deltas() -> None:
    parser = AnthropicAdapter().stream_parser(CLAUDE, None)

    deltas = canonical(feed(parser, ANTHROPIC_TOOL))
    completion = parser.completion()

    assert deltas[0] == {"content": "Okay, let's check the weather"}
    assert deltas[1] == {
        "tool_calls": [
            {
                "index": 0,
                "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
                "type": "function",
                "function": {"name": "get_weather", "arguments": ""},
            }
        ]
    }
    pieces = [d["tool_calls"][0]["function"]["arguments"] for d in deltas[1:]]
    assert json.loads("".join(pieces)) == {"location": "San Francisco, CA"}
    choice = completion.response["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    [call] = choice["message"]["tool_calls"]
    assert json.loads(call["function"]["arguments"]) == {"location": "San Francisco, CA"}
    assert completion.usage.output_tokens == 89


@pytest.mark.parametrize("lax", ["NaN", "1e400", '"\\ud800"'])
def test_a_streamed_tool_input_json_only_to_a_lax_reader_is_a_bad_response(lax: str) -> None:
    # As a non-streamed body with it is (transport.post reads it strictly): no answer holds it
    said, lax_said = (json.dumps(piece)[1:-1] for piece in (' "San Francisco, CA"}', f" {lax}}}"))
    events = [ServerEvent(e.name, e.data.replace(said, lax_said)) for e in ANTHROPIC_TOOL]
    parser = AnthropicAdapter().stream_parser(CLAUDE, None)
    feed(parser, events)

    with pytest.raises(ProviderError) as caught:
        parser.completion()

    assert caught.value.error_class == "bad_response"


def test_openai_stream_passes_its_deltas_through_and_reads_the_usage_chunk() -> None:
    parser = OpenAIAdapter().stream_parser("gpt-4o-mini", None)

    deltas = feed(parser, OPENAI_TEXT)
    completion = parser.completion()

    assert deltas == [{"content": "Hello"}, {"content": "!"}]
    assert completion.response["choices"][0]["message"] == {
        "role": "assistant",
        "content": "Hello!",
        "refusal": None,
    }
    assert completion.response["id"] == "chatcmpl-123"
    assert (completion.usage.input_tokens, completion.usage.output_tokens) == (9, 2)


def test_openai_stream_keeps_each_choice_its_logprobs_and_a_refusal_apart() -> None:
    def choice(index: int, delta: dict[str, Any], **fields: Any) -> dict[str, Any]:
        chunk = _openai_chunk(delta) | {"service_tier": "default"}
        return chunk | {"choices": [chunk["choices"][0] | {"index": index, **fields}]}

    hi = {"token": "Hi", "logprob": -0.5, "bytes": [72, 105], "top_logprobs": []}
    parser = OpenAIAdapter().stream_parser("gpt-4o-mini", None, choices=2)
    # Given two choices interleaved: the first answers (with logprobs), the second refuses
    pieces = [
        piece
        for event in openai_events(
            choice(0, {"role": "assistant", "content": ""}, logprobs={"content": []}),
            choice(1, {"role": "assistant", "refusal": ""}),
            choice(0, {"content": "Hi"}, logprobs={"content": [hi], "refusal": None}),
            choice(1, {"refusal": "No."}),
            choice(1, {}, finish_reason="stop"),
            choice(0, {}, finish_reason="stop"),
            "[DONE]",
        )
        for piece in parser.feed(event)
    ]
    first, second = parser.completion().response["choices"]

    # Expect each piece under its choice, and each choice whole, in order
    assert [(p.index, p.delta, p.logprobs) for p in pieces] == [
        (0, {"content": "Hi"}, {"content": [hi], "refusal": None}),
        (1, {"refusal": "No."}, None),
    ]
    assert {p.chunk["system_fingerprint"] for p in pieces} == {"fp_44709d6fcb"}
    assert first["message"] == {"role": "assistant", "content": "Hi", "refusal": None}
    assert first["logprobs"] == {"content": [hi], "refusal": None}
    assert second["message"] == {"role": "assistant", "content": None, "refusal": "No."}
    assert (first["index"], second["index"], second["logprobs"]) == (0, 1, None)


def test_openai_streamed_tool_call_pieces_are_joined() -> None:
    call = {"index": 0, "id": "call_abc", "type": "function"}
    parser = OpenAIAdapter().stream_parser("gpt-4o-mini", None)
    feed(
        parser,
        openai_events(
            _openai_chunk({"role": "assistant", "content": None}),
            _openai_chunk({"tool_calls": [call | {"function": {"name": "f", "arguments": ""}}]}),
            _openai_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]}),
            _openai_chunk({"tool_calls": [{"index": 0, "function": {"arguments": " 1}"}}]}),
            _openai_chunk({}, "tool_calls"),
            "[DONE]",
        ),
    )

    message = parser.completion().response["choices"][0]["message"]

    assert message["content"] is None
    assert message["tool_calls"] == [
        {"id": "call_abc", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    ]


@pytest.mark.parametrize(
    ("adapter", "event", "error_class"),
    [
        (
            AnthropicAdapter(),
            ServerEvent(
                "error",
                '{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}',
            ),
            "overloaded",
        ),
        (OpenAIAdapter(), ServerEvent(None, '{"error": {"message": "boom"}}'), "server_error"),
        (OpenAIAdapter(), ServerEvent(None, "not json"), "bad_response"),
    ],
)
def test_errors_inside_a_stream_are_classified(
    adapter: Any, event: ServerEvent, error_class: str
) -> None:
    with pytest.raises(ProviderError) as caught:
        adapter.stream_parser("m", None).feed(event)

    assert caught.value.error_class == error_class


@pytest.mark.parametrize(
    ("adapter", "events"),
    [(AnthropicAdapter(), ANTHROPIC_TEXT[:-2]), (OpenAIAdapter(), OPENAI_TEXT[:3])],
)
def test_a_stream_that_ends_early_is_a_bad_response(
    adapter: Any, events: list[ServerEvent]
) -> None:
    parser = adapter.stream_parser("m", None)
    feed(parser, events)

    with pytest.raises(ProviderError) as caught:
        parser.completion()

    assert caught.value.error_class == "bad_response"


def test_server_sent_event_lines_are_parsed_as_the_spec_says() -> None:
    parser = EventParser()
    lines = [
        ": a comment",
        "event: message_start",
        "data: {",
        'data: "a": 1}',
        "",
        "",
        "data:[DONE]",
        "",
    ]

    events = [event for line in lines if (event := parser.feed(line)) is not None]

    assert events == [
        ServerEvent("message_start", '{\n"a": 1}'),
        ServerEvent(None, "[DONE]"),
    ]


def test_lines_end_at_crlf_lf_or_cr_even_split_between_chunks() -> None:
    splitter = LineSplitter()
    chunks = [b"data: a\r", b"\ndata: b\rdata: \xc3", b"\xa9\n\n", b"data: c\r"]

    lines = [line for chunk in chunks for line in splitter.feed(chunk)]

    assert lines == ["data: a", "data: b", "data: é", ""]
    assert splitter.end() == ["data: c"]


def test_anthropic_counts_a_message_delta_leaves_null_keep_message_starts() -> None:
    # Given a message_delta whose usage leaves its input and cache counts null (the SDK types
    # them so): before, they erased message_start's, and the job was billed by estimate
    nulls = {"input_tokens": None, "cache_creation_input_tokens": None}
    events = [
        e if e.name != "message_delta" else ServerEvent(e.name, _with_usage(e, nulls))
        for e in ANTHROPIC_TEXT
    ]
    parser = AnthropicAdapter().stream_parser(CLAUDE, None)
    feed(parser, events)

    usage = parser.completion().usage
    assert usage is not None and not usage.estimated
    assert (usage.input_tokens, usage.output_tokens) == (25, 15)


def test_an_anthropic_stream_without_its_output_count_is_counted_from_its_text() -> None:
    # Given a stream that ends without a message_delta: message_start's output count is a
    # placeholder (1), which the whole answer was billed at
    events = [e for e in ANTHROPIC_TEXT if e.name != "message_delta"]
    parser = AnthropicAdapter().stream_parser(CLAUDE, None)
    feed(parser, events)

    completion = parser.completion()
    usage = completion.usage
    assert usage is not None and usage.estimated
    assert (usage.input_tokens, usage.output_tokens) == (25, 2)  # "Hello!": 6 characters / 4
    assert completion.response["usage"]["completion_tokens"] == 2


def test_a_broken_streams_cjk_text_is_counted_by_its_bytes() -> None:
    # Given an Anthropic stream that breaks after 3,000 CJK characters of text, no output
    # count sent yet (the providers bill about a token a character)
    start = next(e for e in ANTHROPIC_TEXT if e.name == "message_start")
    block = {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    text = {"type": "text_delta", "text": "\u6f22\u5b57\u3067\u3059" * 750}
    delta = {"type": "content_block_delta", "index": 0, "delta": text}
    parser = AnthropicAdapter().stream_parser(CLAUDE, None)
    feed(parser, [start, *anthropic_events(block, delta)])

    # Expect its output counted at three quarters of a token a character (before: a quarter)
    assert parser.received(0, None).output_tokens == 2_250


def test_a_stream_event_nested_past_the_parsers_depth_is_a_bad_response() -> None:
    # Before, its RecursionError failed the job as the worker's own fault, nothing billed
    deep = '{"type": "message_delta", "usage": ' + "[" * 100_000 + "]" * 100_000 + "}"
    parser = AnthropicAdapter().stream_parser(CLAUDE, None)
    feed(parser, ANTHROPIC_TEXT[:5])

    with pytest.raises(ProviderError) as caught:
        parser.feed(ServerEvent("message_delta", deep))
    assert caught.value.error_class == "bad_response"


def _with_usage(event: ServerEvent, usage: dict[str, Any]) -> str:
    data = json.loads(event.data)
    data["usage"] = {**data["usage"], **usage}
    return json.dumps(data)


def test_a_stream_event_nested_past_a_jobs_depth_is_a_bad_response() -> None:
    # Parsed whole (300 levels), but relayed as it came it failed the worker writing its
    # chunk, and the stream's call was billed nothing
    deep = '{"type": "message_delta", "usage": ' + "[" * 300 + "]" * 300 + "}"
    parser = AnthropicAdapter().stream_parser(CLAUDE, None)
    feed(parser, ANTHROPIC_TEXT[:5])

    with pytest.raises(ProviderError) as caught:
        parser.feed(ServerEvent("message_delta", deep))
    assert caught.value.error_class == "bad_response"
    assert "nests deeper than 100 levels" in str(caught.value)
