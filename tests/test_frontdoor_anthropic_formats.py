"""The Messages API at the front door, pure: request bodies in, Anthropic's events and errors
out, checked with the ``anthropic`` SDK's own types and its stream accumulator."""

from __future__ import annotations

import json
import re
from decimal import Decimal
from typing import Any

import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import ErrorResponse, Message, RawMessageStreamEvent
from pydantic import TypeAdapter

from frontdoor.anthropic_request import messages_job
from frontdoor.anthropic_stream import MessageEvents, message_of
from frontdoor.chat_request import RequestOptions
from frontdoor.errors import ApiError
from queuegate.messages import ChatJob, ChatResult, ErrorInfo, GatewayInfo, StreamChunk
from queuegate.provider_formats import anthropic_message, has_message_form
from queuegate.request_limits import Limits
from router.providers import AnthropicAdapter, OpenAIAdapter, Piece
from router.providers.base import ProviderError
from tests.test_stream_translation import (
    ANTHROPIC_TEXT,
    ANTHROPIC_TOOL,
    OPENAI_TEXT,
    anthropic_events,
    openai_events,
)
from workers.pii.policy import apply, screen_job

EVENT = TypeAdapter(RawMessageStreamEvent)
HI = [{"role": "user", "content": "Hi"}]
OPTIONS = RequestOptions(timeout=60, timeout_named=False, idempotency_key=None, respond_async=False)
LIMITS = Limits(models={"claude-haiku"}, max_messages=256, max_job_bytes=1 << 20)


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "claude-haiku", "max_tokens": 64, "messages": HI} | fields


def read(body: dict[str, Any]) -> ChatJob:
    return messages_job(body, "alpha", OPTIONS, LIMITS)


# --- requests ----------------------------------------------------------------------------------


def test_a_full_request_becomes_the_canonical_one_the_workers_run() -> None:
    # Given a request with a cached system block, a tool round trip and Anthropic's sampling
    job = read(
        body(
            system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
            messages=[
                {"role": "user", "content": "Weather in Paris?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18 C"}
                    ],
                },
            ],
            tools=[{"name": "weather", "input_schema": {"type": "object"}}],
            tool_choice={"type": "any", "disable_parallel_tool_use": True},
            stop_sequences=["END"],
            temperature=0.5,
            top_k=5,
            metadata={"user_id": "u-7"},
            thinking={"type": "enabled", "budget_tokens": 1024},
            stream=True,
        )
        | {"max_tokens": 2048}
    )

    # Expect a job of OpenAI chat messages and params with the same meaning, caching kept
    assert (job.team, job.model, job.stream) == ("alpha", "claude-haiku", True)
    canonical = job.model_dump(exclude_none=True)
    messages, params = canonical["messages"], canonical["params"]
    assert messages[0] == {
        "role": "system",
        "content": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
    }
    assert messages[2]["tool_calls"][0]["function"] == {
        "name": "weather",
        "arguments": "{}",
    }
    assert messages[3] == {"role": "tool", "tool_call_id": "toolu_1", "content": "18 C"}
    assert params == {
        "max_tokens": 2048,
        "temperature": 0.5,
        "stop": ["END"],
        "user": "u-7",
        "tools": [
            {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
        ],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "top_k": 5,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
    }


def test_prompt_caching_marks_reach_an_anthropic_deployment_where_the_client_put_them() -> None:
    # Given a request marking a tool, a text block and a tool result for caching
    mark = {"type": "ephemeral", "ttl": "1h"}
    job = read(
        body(
            tools=[{"name": "f", "input_schema": {"type": "object"}, "cache_control": mark}],
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "Long.", "cache_control": mark}],
                },
                {
                    "role": "assistant",
                    "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}],
                },
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "t1",
                            "content": "ok",
                            "cache_control": mark,
                        }
                    ],
                },
            ],
        )
    )

    # When the worker's Anthropic adapter builds the provider request
    sent = AnthropicAdapter().build_request(job, "claude-3-5-haiku-latest", None).body

    # Expect each mark where the client put it
    assert sent["tools"][0]["cache_control"] == mark
    assert sent["messages"][0]["content"][0]["cache_control"] == mark
    assert sent["messages"][2]["content"][0]["cache_control"] == mark


def test_thinking_sent_back_goes_to_anthropic_as_it_is_and_is_left_out_for_openai() -> None:
    # Given an assistant turn sent back with its thinking, signature and redacted thinking
    thinking = [
        {"type": "thinking", "thinking": "Hm.", "signature": "s1"},
        {"type": "redacted_thinking", "data": "opaque"},
    ]
    job = read(
        body(
            messages=[
                *HI,
                {"role": "assistant", "content": [*thinking, {"type": "text", "text": "Hello."}]},
                {"role": "user", "content": "Again"},
            ]
        )
    )

    # Expect Anthropic to get the blocks as they were, OpenAI the text alone
    anthropic = AnthropicAdapter().build_request(job, "claude", "k").body["messages"]
    assert anthropic[1] == {
        "role": "assistant",
        "content": [*thinking, {"type": "text", "text": "Hello."}],
    }
    openai = OpenAIAdapter().build_request(job, "gpt", "k").body["messages"]
    assert openai[1] == {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]}


def test_document_options_reach_anthropic_and_are_refused_by_openai() -> None:
    # Given a PDF document whose citations are enabled, with a context
    pdf = {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0xLjQ="}
    document = {
        "type": "document",
        "source": pdf,
        "context": "Q3 figures",
        "citations": {"enabled": True},
    }
    job = read(body(messages=[{"role": "user", "content": [document]}]))

    # Expect Anthropic to get the document as it was; OpenAI, whose file parts have no
    # such options, to refuse it (the router then moves on to a deployment that can)
    anthropic = AnthropicAdapter().build_request(job, "claude", "k").body["messages"]
    assert anthropic[0]["content"] == [document]
    with pytest.raises(ProviderError, match="document context and citations"):
        OpenAIAdapter().build_request(job, "gpt", "k")


@pytest.mark.parametrize(
    "thinking",
    [
        {"type": "adaptive"},
        {"type": "adaptive", "display": "omitted"},
        {"type": "enabled", "budget_tokens": 1024, "display": "summarized"},
        {"type": "disabled"},
        {"type": "between_tools"},
    ],
)
def test_every_thinking_anthropic_takes_is_carried_as_sent(thinking: dict[str, Any]) -> None:
    # Given each thinking config of the anthropic SDK's ThinkingConfigParam
    job = read(body(max_tokens=2048, thinking=thinking))

    # Expect the job to carry it unchanged, for the Anthropic adapter to send on
    assert job.params.model_extra is not None
    assert job.params.model_extra["thinking"] == thinking
    sent = AnthropicAdapter().build_request(job, "claude", "k")
    assert sent.body["thinking"] == thinking


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"max_tokens": 0}, "max_tokens: Input should be greater than or equal to 1"),
        ({"messages": []}, "messages: List should have at least 1 item"),
        ({"temperature": 1.5}, "temperature: Input should be less than or equal to 1"),
        ({"top_k": -1}, "top_k: Input should be greater than or equal to 0"),
        ({"n": 2}, "n: Extra inputs are not permitted"),
        ({"container": "c"}, "container: not supported by this gateway"),
        (
            {"thinking": {"type": "adaptive"}, "output_config": {"effort": "minimal"}},
            "output_config.effort: Input should be 'low', 'medium', 'high', 'xhigh' or 'max'",
        ),
        ({"output_config": {"speed": "fast"}}, "output_config.speed: Extra inputs are not"),
        ({"metadata": {"user_id": "u", "team": "x"}}, "metadata.team: Extra inputs are not"),
        ({"stop_sequences": "END"}, "stop_sequences: Input should be a valid list"),
        ({"tool_choice": {"type": "tool"}}, "tool_choice.name: Field required"),
        (
            {"thinking": {"type": "adaptive", "budget_tokens": 1024}},
            "thinking.budget_tokens: Extra inputs are not permitted",
        ),
        ({"thinking": {"type": "adaptive", "display": "full"}}, "thinking.display: Input should"),
        ({"thinking": {"type": "sometimes"}}, "thinking.type: 'sometimes' is not supported"),
        (
            {"thinking": {"type": "enabled", "budget_tokens": 2048}},
            "`max_tokens` must be greater than `thinking.budget_tokens`",
        ),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages.0.role: Input should be"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
            "messages.0.content.0.text: Field required",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "search_result"}]}]},
            "messages.0.content.0.type: 'search_result' is not supported by this gateway; use "
            "one of 'text', 'image', 'document', 'tool_use', 'tool_result'",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
            "messages.0.content.0.source.type: Field required",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}],
                    }
                ]
            },
            "messages.0.content.0: tool_use blocks are not supported here",
        ),
    ],
)
def test_a_bad_request_is_refused_naming_the_field_as_anthropic_does(
    fields: dict[str, Any], reason: str
) -> None:
    with pytest.raises(ApiError) as refused:
        read(body(**fields))

    assert (refused.value.code, refused.value.status) == ("invalid_request", 400)
    assert re.match(re.escape(reason), refused.value.message), refused.value.message


def test_a_model_the_catalog_does_not_serve_is_not_found() -> None:
    with pytest.raises(ApiError) as refused:
        read(body(model="claude-9"))

    assert (refused.value.code, refused.value.status) == ("unknown_model", 404)


# --- streams -----------------------------------------------------------------------------------


def ok(response: dict[str, Any]) -> ChatResult:
    return ChatResult(
        job_id="j1",
        team="alpha",
        status="ok",
        response=response,
        gateway=GatewayInfo(model_requested="claude-haiku", cost_usd=Decimal(0)),
    )


def replay(events: list[dict[str, Any]]) -> Message:
    """What Anthropic's SDK makes of the events: each one must be a valid event of its
    types, and the accumulated message a valid Message."""
    snapshot: Any = None
    buffers: dict[int, bytes] = {}
    for event in events:
        if event["type"] == "ping":
            continue  # the SDK's stream reader drops pings before parsing, as here
        typed = EVENT.validate_python(event)
        snapshot = accumulate_event(event=typed, current_snapshot=snapshot, json_bufs=buffers)
    return Message.model_validate(snapshot.model_dump())


def relay(parser: Any, upstream: list[Any]) -> tuple[list[Piece], ChatResult]:
    """The pieces a worker relays for a provider's stream, and its final result."""
    pieces = [piece for event in upstream for piece in parser.feed(event)]
    return pieces, ok(parser.completion().response)


def translate(pieces: list[Piece], result: ChatResult) -> list[dict[str, Any]]:
    """The events the front door sends for the pieces and result, as a client reads them."""
    writer = MessageEvents("j1", "claude-haiku")
    chunks = [
        StreamChunk(job_id="j1", seq=i, delta=p.delta, anthropic_events=p.anthropic_events)
        for i, p in enumerate(pieces)
    ]
    return decode(b"".join(map(writer.delta, chunks)) + writer.end(result))


def decode(data: bytes) -> list[dict[str, Any]]:
    """Server-sent events whose name is the type of their data, as Anthropic sends them."""
    events = []
    for block in data.decode().split("\n\n")[:-1]:
        name, payload = block.split("\n")
        event = json.loads(payload.removeprefix("data: "))
        assert name == f"event: {event['type']}"
        events.append(event)
    return events


def test_a_streamed_anthropic_answer_reaches_the_sdk_as_anthropic_sent_it() -> None:
    # Given Anthropic's documented text stream, relayed by a worker as canonical deltas
    pieces, result = relay(AnthropicAdapter().stream_parser("claude", None), ANTHROPIC_TEXT)

    # When the front door turns them back into events
    events = translate(pieces, result)

    # Expect Anthropic's event flow, and the SDK's final message to be Anthropic's
    assert [e["type"] for e in events] == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    message = replay(events)
    assert message.content[0].type == "text"
    assert message.content[0].text == "Hello!"
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (25, 15)
    assert (message.id, message.model) == ("msg_j1", "claude-haiku")


def test_a_streamed_tool_call_arrives_as_input_json_deltas() -> None:
    pieces, result = relay(AnthropicAdapter().stream_parser("claude", None), ANTHROPIC_TOOL)

    events = translate(pieces, result)

    json_pieces = [
        e["delta"]["partial_json"]
        for e in events
        if e["type"] == "content_block_delta" and e["delta"]["type"] == "input_json_delta"
    ]
    assert json.loads("".join(json_pieces)) == {"location": "San Francisco, CA"}
    message = replay(events)
    assert [block.type for block in message.content] == ["text", "tool_use"]
    tool = message.content[1]
    assert tool.type == "tool_use"
    assert (tool.id, tool.name) == ("toolu_01T1x1fJ34qAmk2tNTrN7Up6", "get_weather")
    assert tool.input == {"location": "San Francisco, CA"}
    assert message.stop_reason == "tool_use"
    # the same content the answer has when it is not streamed
    assert (
        message.content
        == Message.model_validate(anthropic_message(result.response or {}, "msg_1")).content
    )


def test_thinking_streams_as_its_own_block_before_the_text() -> None:
    # Given Anthropic's thinking stream: a thinking block (sealed by a signature), then text
    upstream = anthropic_events(
        {"type": "message_start", "message": {"id": "msg_2", "model": "claude", "usage": {}}},
        {
            "type": "content_block_start",
            "index": 0,
            "content_block": {"type": "thinking", "thinking": ""},
        },
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "thinking_delta", "thinking": "Two plus two"},
        },
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "signature_delta", "signature": "s"},
        },
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "4"}},
        {"type": "content_block_stop", "index": 1},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn"},
            "usage": {"input_tokens": 12, "output_tokens": 30},
        },
        {"type": "message_stop"},
    )
    pieces, result = relay(AnthropicAdapter().stream_parser("claude", None), upstream)

    message = replay(translate(pieces, result))

    assert [block.type for block in message.content] == ["thinking", "text"]
    assert message.content[0].type == "thinking"
    assert message.content[0].thinking == "Two plus two"
    assert message.content[1].type == "text"
    assert message.content[1].text == "4"


def test_an_anthropic_stream_reaches_the_sdk_block_for_block() -> None:
    # Given Anthropic's stream of signed thinking, redacted thinking, a tool call, two texts
    usage = {"input_tokens": 100, "output_tokens": 1, "cache_read_input_tokens": 1600}
    start = {"id": "msg_3", "type": "message", "role": "assistant", "model": "claude"}
    blocks: list[tuple[dict[str, Any], list[dict[str, Any]]]] = [
        (
            {"type": "thinking", "thinking": "", "signature": ""},
            [
                {"type": "thinking_delta", "thinking": "Hm."},
                {"type": "signature_delta", "signature": "SIG"},
            ],
        ),
        ({"type": "redacted_thinking", "data": "opaque"}, []),
        (
            {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {}},
            [{"type": "input_json_delta", "partial_json": '{"city": "Oslo"}'}],
        ),
        ({"type": "text", "text": ""}, [{"type": "text_delta", "text": "First. "}]),
        ({"type": "text", "text": ""}, [{"type": "text_delta", "text": "Second."}]),
    ]
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": start | {"content": [], "usage": usage}}
    ]
    for index, (block, deltas) in enumerate(blocks):
        events.append({"type": "content_block_start", "index": index, "content_block": block})
        events += [{"type": "content_block_delta", "index": index, "delta": d} for d in deltas]
        events.append({"type": "content_block_stop", "index": index})
    events += [
        {
            "type": "message_delta",
            "delta": {"stop_reason": "tool_use"},
            "usage": {"output_tokens": 9},
        },
        {"type": "message_stop"},
    ]
    pieces, result = relay(
        AnthropicAdapter().stream_parser("claude", None), anthropic_events(*events)
    )

    # When the front door streams it to an Anthropic caller
    sent = translate(pieces, result)
    message = replay(sent)

    # Expect each block as sent, in its order, and message_start's counts the provider's
    assert [block.model_dump(exclude_none=True) for block in message.content] == [
        {"type": "thinking", "thinking": "Hm.", "signature": "SIG"},
        {"type": "redacted_thinking", "data": "opaque"},
        {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Oslo"}},
        {"type": "text", "text": "First. "},
        {"type": "text", "text": "Second."},
    ]
    assert sent[0]["message"]["usage"] | usage == sent[0]["message"]["usage"]
    assert message.usage.output_tokens == 9 and message.usage.cache_read_input_tokens == 1600


def test_an_openai_stream_reaches_the_sdk_as_an_anthropic_one() -> None:
    pieces, result = relay(OpenAIAdapter().stream_parser("gpt-4o-mini", None), OPENAI_TEXT)

    message = replay(translate(pieces, result))

    assert message.content[0].type == "text"
    assert message.content[0].text == "Hello!"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (9, 2)


def test_parallel_openai_tool_calls_become_one_tool_use_block_each() -> None:
    # Given two tool calls streamed OpenAI's way: an id and name first, then argument pieces
    first = {"index": 0, "id": "call_a", "type": "function"}
    second = {"index": 1, "id": "call_b", "type": "function"}
    deltas = [
        {"content": "Both."},
        {"tool_calls": [first | {"function": {"name": "f", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"a": 1}'}}]},
        {"tool_calls": [second | {"function": {"name": "g", "arguments": '{"b"'}}]},
        {"tool_calls": [{"index": 1, "function": {"arguments": ": 2}"}}]},
    ]
    calls = [
        {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}},
        {"id": "call_b", "type": "function", "function": {"name": "g", "arguments": '{"b": 2}'}},
    ]
    result = ok(_completion({"content": "Both.", "tool_calls": calls}, "tool_calls"))

    message = replay(translate([Piece(delta) for delta in deltas], result))

    assert [(b.type, getattr(b, "input", None)) for b in message.content] == [
        ("text", None),
        ("tool_use", {"a": 1}),
        ("tool_use", {"b": 2}),
    ]


def test_an_answer_with_nothing_streamed_is_sent_whole_at_the_end() -> None:
    # Given a job answered from its stored outcome: no chunk, only the final result
    result = ok(
        _completion(
            {
                "content": "Cached.",
                "reasoning_content": "Hm.",
                "tool_calls": [
                    {
                        "id": "t1",
                        "type": "function",
                        "function": {"name": "f", "arguments": '{"x": [1]}'},
                    }
                ],
            },
            "tool_calls",
        )
    )

    message = replay(translate([], result))

    assert message.model_dump(exclude_none=True)["content"] == [
        {"type": "thinking", "thinking": "Hm.", "signature": ""},
        {"type": "text", "text": "Cached."},
        {"type": "tool_use", "id": "t1", "name": "f", "input": {"x": [1]}},
    ]


def test_a_failure_after_the_stream_began_ends_it_with_an_error_event() -> None:
    failed = ChatResult(
        job_id="j1",
        team="alpha",
        status="error",
        error=ErrorInfo(code="provider_error", message="the provider hung up"),
        gateway=GatewayInfo(model_requested="claude-haiku"),
    )

    events = translate([Piece({"content": "Hel"})], failed)

    error = events[-1]
    assert ErrorResponse.model_validate(error).error.type == "api_error"
    assert error["error"]["message"] == "provider_error: the provider hung up"
    assert events[-2]["type"] == "content_block_delta"  # no message_stop: the answer is cut


def test_a_stream_the_front_door_gives_up_on_ends_with_an_error_event() -> None:
    writer = MessageEvents("j1", "claude-haiku")
    writer.delta(StreamChunk(job_id="j1", seq=0, delta={"content": "Hel"}))

    [event] = decode(writer.error("deadline_exceeded", "nothing more in time"))

    assert ErrorResponse.model_validate(event).error.type == "timeout_error"


# --- answers --------------------------------------------------------------------------------------


def test_a_canonical_answer_keeps_its_thinking_and_cache_writes_as_a_message() -> None:
    response = _completion({"content": "4", "reasoning_content": "2+2"}, "stop") | {
        "usage": {
            "prompt_tokens": 100,
            "completion_tokens": 9,
            "prompt_tokens_details": {"cached_tokens": 30, "cache_write_tokens": 50},
        }
    }

    message = Message.model_validate(anthropic_message(response, "msg_1"))

    assert [block.type for block in message.content] == ["thinking", "text"]
    usage = message.usage
    assert (usage.input_tokens, usage.cache_read_input_tokens) == (20, 30)
    assert (usage.cache_creation_input_tokens, usage.output_tokens) == (50, 9)


def _completion(message: dict[str, Any], finish: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-9",
        "object": "chat.completion",
        "model": "gpt-4o-mini",
        "choices": [
            {"index": 0, "message": {"role": "assistant"} | message, "finish_reason": finish}
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3},
    }


async def test_a_text_documents_text_is_screened_for_pii_as_any_text_is() -> None:
    # Given a plain text document holding an email address
    document = {
        "type": "document",
        "source": {"type": "text", "media_type": "text/plain", "data": "Mail bob@example.com"},
        "title": "contacts",
    }
    job = read(body(messages=[{"role": "user", "content": [document]}]))

    # When a redact policy screens what the job sends out, expect the address found and
    # replaced in the document Anthropic gets (a base64 data: URL would have hidden it)
    redacted = apply(job, "redact", await screen_job(job))
    sent = AnthropicAdapter().build_request(redacted, "claude", "k").body["messages"]
    assert sent[0]["content"][0]["source"]["data"] == "Mail [EMAIL]"


CUSTOM_CALL = {"id": "call_c", "type": "custom", "custom": {"name": "exec", "input": "ls -la"}}
"""An OpenAI custom tool's call: its input is free text, which no tool_use block holds."""


def test_a_custom_tool_call_has_no_message_form_and_is_refused_naming_it() -> None:
    # Given an OpenAI answer calling a custom tool
    response = _completion({"content": None, "tool_calls": [CUSTOM_CALL]}, "tool_calls")

    # When it is answered to a Messages API caller, expect it refused, naming the tool and
    # what it was called with (never a tool_use of name null and input {})
    with pytest.raises(ApiError) as refused:
        message_of(response, "j1")
    assert refused.value.code == "provider_error"
    assert "custom tool 'exec'" in refused.value.message and "'ls -la'" in refused.value.message
    assert not has_message_form(response)


def test_a_streamed_custom_tool_call_ends_the_stream_with_an_error_naming_it() -> None:
    # Given an OpenAI stream calling a custom tool
    called = CUSTOM_CALL | {"index": 0, "custom": {"name": "exec", "input": ""}}
    upstream = openai_events(
        _chunk({"role": "assistant", "content": None, "tool_calls": [called]}),
        _chunk({"tool_calls": [{"index": 0, "custom": {"input": "ls -la"}}]}),
        _chunk({}, "tool_calls"),
        "[DONE]",
    )
    pieces, result = relay(OpenAIAdapter().stream_parser("gpt-4o-mini", None), upstream)

    # When the front door streams it to a Messages API caller
    events = translate(pieces, result)

    # Expect an error event naming the tool in place of any tool_use block
    error = ErrorResponse.model_validate(events[-1]).error
    assert error.type == "api_error" and "custom tool 'exec'" in error.message
    assert all(e["type"] != "content_block_start" for e in events)


def _chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return {"id": "c", "object": "chat.completion.chunk", "model": "m", "choices": [choice]}


FUNCTION_CALL = {"name": "f", "arguments": '{"a": 1}'}
"""OpenAI's legacy answer to ``functions``: one call, under ``message.function_call``."""


def test_a_legacy_function_call_becomes_a_tool_use_block() -> None:
    # Given an OpenAI answer calling a function the legacy way
    response = _completion({"content": None, "function_call": FUNCTION_CALL}, "function_call")

    # When it is answered to a Messages API caller
    message = Message.model_validate(anthropic_message(response, "msg_j1"))

    # Expect the call as a tool_use block of an id of the answer's own, and its stop
    assert message.model_dump(exclude_none=True)["content"] == [
        {"type": "tool_use", "id": "toolu_j1", "name": "f", "input": {"a": 1}}
    ]
    assert message.stop_reason == "tool_use"
    unreadable = {"content": None, "function_call": FUNCTION_CALL | {"arguments": "[1]"}}
    assert has_message_form(response) and not has_message_form(_completion(unreadable, "stop"))


def test_a_streamed_legacy_function_call_is_relayed_and_becomes_a_tool_use_block() -> None:
    # Given an OpenAI stream calling a function the legacy way
    upstream = openai_events(
        _chunk({"role": "assistant", "content": None, "function_call": {"name": "f"}}),
        _chunk({"function_call": {"arguments": '{"a": '}}),
        _chunk({"function_call": {"arguments": "1}"}}),
        _chunk({}, "function_call"),
        "[DONE]",
    )

    # When a worker relays it
    pieces, result = relay(OpenAIAdapter().stream_parser("gpt-4o-mini", None), upstream)

    # Expect its pieces relayed to an OpenAI caller, and the call in its whole answer
    assert [p.delta["function_call"] for p in pieces] == [
        {"name": "f"},
        {"arguments": '{"a": '},
        {"arguments": "1}"},
    ]
    assert result.response is not None
    assert result.response["choices"][0]["message"]["function_call"] == FUNCTION_CALL

    # When the front door streams it to a Messages API caller, expect a tool_use block
    message = replay(translate(pieces, result))
    [block] = message.content
    assert block.type == "tool_use"
    assert (block.id, block.name, block.input) == ("toolu_j1", "f", {"a": 1})
    assert message.stop_reason == "tool_use"
