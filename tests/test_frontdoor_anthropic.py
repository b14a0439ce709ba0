"""Anthropic's Messages API at the front door, end to end: the official anthropic SDK against a
real uvicorn server, in front of a real worker, accounting and the mock provider, whichever
provider (Anthropic or OpenAI format) serves the model."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import anthropic
import pytest
import redis.asyncio as aioredis
from anthropic.types import Message, MessageParam, ToolParam

from mockprovider import MockConfig
from mockprovider.config import Behavior
from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from tests.frontdoor_support import Door, open_door
from tests.support import lose_redis_data

HELLO: list[MessageParam] = [{"role": "user", "content": "Hello there"}]
STORY: list[MessageParam] = [{"role": "user", "content": "Tell me a long story about the sea"}]
WEATHER: ToolParam = {
    "name": "get_weather",
    "description": "The weather at a place",
    "input_schema": {"type": "object", "properties": {"location": {"type": "string"}}},
}
MODELS = ["claude-haiku", "gpt-4o-mini"]
"""One alias served by an Anthropic-format deployment, one by an OpenAI-format one."""


def client(door: Door, team: str = "alpha", **kwargs: Any) -> anthropic.AsyncAnthropic:
    kwargs.setdefault("api_key", door.keys.get(team))
    return anthropic.AsyncAnthropic(base_url=door.url, max_retries=0, **kwargs)


def sync_client(door: Door, team: str = "alpha") -> anthropic.Anthropic:
    """For a worker thread only: the server runs on the test's own event loop."""
    return anthropic.Anthropic(base_url=door.url, api_key=door.keys[team], max_retries=0)


@pytest.fixture
async def door(settings: Settings) -> AsyncIterator[Door]:
    async with open_door(settings) as opened:
        yield opened


FAILING = MockConfig(
    models={
        "flaky-gpt": Behavior(error_rate=1.0, error_status=500),
        "llama-3.1-8b": Behavior(error_rate=1.0, error_status=500),
    }
)
"""flaky-gpt (whose catalog fallback is claude-haiku) and local-llama (which has none) answer
500 to everything."""
UPSTREAM = {
    "local-llama": "llama-3.1-8b",
    "flaky-gpt": "flaky-gpt",
    "claude-haiku": "claude-3-5-haiku-latest",
    "gpt-4o-mini": "gpt-4o-mini",
}
"""The model each alias of the bundled catalog asks its provider for."""


@pytest.mark.parametrize("model", MODELS)
async def test_a_message_goes_through_the_team_queue_and_back(door: Door, model: str) -> None:
    # When team alpha creates a message with the async SDK
    async with client(door) as sdk:
        raw = await sdk.messages.with_raw_response.create(
            model=model, max_tokens=50, messages=HELLO
        )
    message = await raw.parse()

    # Expect Anthropic's Message, whichever provider served it, with the gateway's headers
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "text"
    assert message.content[0].text == "mock reply to: Hello there"
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    job_id = raw.headers["x-queuegate-job-id"]
    assert raw.headers["x-request-id"] == job_id and message.id == f"msg_{job_id}"
    assert raw.headers["x-queuegate-model-used"] == model
    assert float(raw.headers["x-queuegate-cost-usd"]) > 0
    [row] = await door.gateway.usage_rows(1)
    assert (row["job_id"], row["team"]) == (job_id, "alpha")
    assert row["provider"] == ("anthropic" if model.startswith("claude") else "openai")


async def test_the_sync_sdk_is_served_too(door: Door) -> None:
    def call() -> Message:
        with sync_client(door, "beta") as sdk:
            return sdk.messages.create(
                model="claude-haiku",
                max_tokens=50,
                system="Be brief.",
                messages=HELLO,
                metadata={"user_id": "u-42"},
            )

    message = await asyncio.to_thread(call)

    assert message.content[0].type == "text" and message.content[0].text
    [row] = await door.gateway.usage_rows(1)
    assert row["team"] == "beta"


@pytest.mark.parametrize("model", MODELS)
async def test_a_stream_arrives_as_the_sdk_reads_it_and_adds_up_to_the_whole_answer(
    door: Door, model: str
) -> None:
    async with client(door) as sdk:
        # When the same request is streamed and asked whole
        async with sdk.messages.stream(model=model, max_tokens=200, messages=STORY) as stream:
            pieces = [text async for text in stream.text_stream]
            final = await stream.get_final_message()
        whole = await sdk.messages.create(model=model, max_tokens=200, messages=STORY)

    # Expect the text in several pieces, the final message the same as the whole answer
    assert len(pieces) > 3
    assert final.content[0].type == "text" and whole.content[0].type == "text"
    assert "".join(pieces) == final.content[0].text == whole.content[0].text
    assert final.stop_reason == whole.stop_reason == "end_turn"
    assert final.usage.output_tokens == whole.usage.output_tokens > 0
    assert final.usage.input_tokens == whole.usage.input_tokens > 0
    assert final.id.startswith("msg_")


async def test_a_sync_stream_is_read_to_its_final_message(door: Door) -> None:
    def call() -> tuple[str, Message]:
        with (
            sync_client(door) as sdk,
            sdk.messages.stream(model="gpt-4o-mini", max_tokens=100, messages=STORY) as stream,
        ):
            return "".join(stream.text_stream), stream.get_final_message()

    text, final = await asyncio.to_thread(call)

    assert final.content[0].type == "text" and text == final.content[0].text
    assert final.usage.output_tokens > 0


@pytest.mark.parametrize("model", MODELS)
async def test_a_tool_use_round_trip(door: Door, model: str) -> None:
    question: list[MessageParam] = [{"role": "user", "content": "What is the weather in Oslo?"}]
    async with client(door) as sdk:
        # When the model asks for a tool, streamed
        async with sdk.messages.stream(
            model=model, max_tokens=100, messages=question, tools=[WEATHER]
        ) as stream:
            asked = await stream.get_final_message()
        [use] = [block for block in asked.content if block.type == "tool_use"]

        # and its result goes back as the SDK's own message params
        answer = await sdk.messages.create(
            model=model,
            max_tokens=100,
            tools=[WEATHER],
            messages=[
                *question,
                asked.to_param(),
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18 C"}],
                },
            ],
        )

    # Expect a tool_use block the SDK parsed, then an answer to the tool's result
    assert asked.stop_reason == "tool_use"
    assert (use.name, use.input) == ("get_weather", {})
    assert use.id
    assert answer.stop_reason == "end_turn"
    assert answer.content[0].type == "text"
    assert answer.content[0].text == "mock reply to: 18 C"


async def test_thinking_comes_back_as_a_thinking_block_streamed_or_not(door: Door) -> None:
    request: dict[str, Any] = {
        "model": "claude-haiku",
        "max_tokens": 2048,
        "messages": HELLO,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
    }
    async with client(door) as sdk:
        whole = await sdk.messages.create(**request)
        async with sdk.messages.stream(**request) as stream:
            thoughts = [e.thinking async for e in stream if e.type == "thinking"]
            final = await stream.get_final_message()

        # and the answer, its thinking included, goes back as the next turn's history
        again: list[MessageParam] = [
            *HELLO,
            whole.to_param(),
            {"role": "user", "content": "And then?"},
        ]
        follow_up = await sdk.messages.create(**request | {"messages": again})

    for message in (whole, final):
        assert [block.type for block in message.content] == ["thinking", "text"]
        assert message.content[0].type == "thinking"
        assert message.content[0].thinking == "mock thinking about: Hello there"
    assert "".join(thoughts) == "mock thinking about: Hello there"
    assert follow_up.content[-1].type == "text"
    assert follow_up.content[-1].text == "mock reply to: And then?"


async def test_adaptive_thinking_reaches_anthropic_as_sent_and_openai_as_its_default_effort(
    door: Door,
) -> None:
    adaptive = {"type": "adaptive", "display": "summarized"}
    async with client(door) as sdk:
        # When a caller lets the model decide how much to think, of a Claude model
        claude = await sdk.messages.create(
            model="claude-haiku", max_tokens=2048, messages=HELLO, thinking=adaptive
        )
        sent_to_anthropic = door.gateway.mock.requests[-1].body
        # and streamed, its thinking's text omitted
        async with sdk.messages.stream(
            model="claude-haiku",
            max_tokens=2048,
            messages=HELLO,
            thinking={"type": "adaptive", "display": "omitted"},
        ) as stream:
            omitted = await stream.get_final_message()
        # and of a model an OpenAI-format deployment serves
        gpt = await sdk.messages.create(
            model="gpt-4o-mini", max_tokens=2048, messages=HELLO, thinking={"type": "adaptive"}
        )
        sent_to_openai = door.gateway.mock.requests[-1].body
        # and with a temperature, which Anthropic's rules for thinking forbid
        with pytest.raises(anthropic.BadRequestError) as hot:
            await sdk.messages.create(
                model="claude-haiku",
                max_tokens=2048,
                messages=HELLO,
                thinking=adaptive,
                extra_body={"temperature": 0.2},  # the SDK's types leave sampling out
            )

    # Expect Anthropic to get the thinking as sent, and its thinking back
    assert sent_to_anthropic is not None and sent_to_anthropic["thinking"] == adaptive
    assert [block.type for block in claude.content] == ["thinking", "text"]
    thought = omitted.content[0]
    assert thought.type == "thinking"
    assert (thought.thinking, thought.signature) == ("", "mock-signature")
    assert omitted.content[1].type == "text"
    # OpenAI no effort: its model decides as adaptive asks
    assert sent_to_openai is not None
    assert not {"thinking", "reasoning_effort"} & sent_to_openai.keys()
    assert gpt.content[0].type == "text"
    assert gpt.content[0].text == "mock reply to: Hello there"
    assert "temperature" in hot.value.message


async def test_a_bad_key_is_an_authentication_error(door: Door) -> None:
    async with client(door, api_key="qg-not-a-key") as sdk:
        with pytest.raises(anthropic.AuthenticationError) as refused:
            await sdk.messages.create(model="claude-haiku", max_tokens=10, messages=HELLO)

    assert refused.value.status_code == 401
    assert refused.value.body == {
        "type": "error",
        "error": {
            "type": "authentication_error",
            "message": "unauthorized: the API key is unknown or revoked, or its team is "
            "disabled: ask an operator for a new one",
        },
    }


async def test_an_unknown_model_is_not_found_before_any_stream(door: Door) -> None:
    async with client(door) as sdk:
        with pytest.raises(anthropic.NotFoundError) as whole:
            await sdk.messages.create(model="claude-9", max_tokens=10, messages=HELLO)
        with pytest.raises(anthropic.NotFoundError) as streamed:
            async with sdk.messages.stream(model="claude-9", max_tokens=10, messages=HELLO):
                pass

    for refused in (whole, streamed):
        assert refused.value.status_code == 404
        assert isinstance(refused.value.body, dict)
        assert refused.value.body["error"]["type"] == "not_found_error"
    assert door.gateway.mock.stats.calls == 0


async def test_an_invalid_request_is_refused_naming_the_field(door: Door) -> None:
    async with client(door) as sdk:
        with pytest.raises(anthropic.BadRequestError) as refused:
            await sdk.messages.create(
                model="claude-haiku",
                max_tokens=10,
                messages=HELLO,
                extra_body={"temperature": 1.5},
            )

    assert refused.value.status_code == 400
    assert isinstance(refused.value.body, dict)
    assert refused.value.body["error"] == {
        "type": "invalid_request_error",
        "message": "invalid_request: temperature: Input should be less than or equal to 1",
    }
    assert door.gateway.mock.stats.calls == 0


async def test_limits_and_budgets_are_the_sdks_typed_errors(settings: Settings) -> None:
    # Given team alpha allowed one request a minute, and team beta no budget at all
    teams = {"alpha": TeamConfig(rpm=1), "beta": TeamConfig(budget_usd=Decimal(0))}
    async with open_door(settings, teams) as door, client(door) as alpha:
        await alpha.messages.create(model="claude-haiku", max_tokens=10, messages=HELLO)

        # When alpha asks again, willing to wait 2 seconds, and beta asks at all
        with pytest.raises(anthropic.RateLimitError) as limited:
            await alpha.messages.create(
                model="claude-haiku",
                max_tokens=10,
                messages=HELLO,
                extra_headers={"x-queuegate-timeout": "2"},
            )
        async with client(door, "beta") as beta:
            with pytest.raises(anthropic.APIStatusError) as broke:
                await beta.messages.create(model="claude-haiku", max_tokens=10, messages=HELLO)

    # Expect a 429 with the wait it needed, and a 402 billing error
    assert limited.value.status_code == 429
    assert int(limited.value.response.headers["retry-after"]) > 50
    assert isinstance(limited.value.body, dict)
    assert limited.value.body["error"]["type"] == "rate_limit_error"
    assert broke.value.status_code == 402
    assert isinstance(broke.value.body, dict)
    assert broke.value.body["error"]["type"] == "billing_error"
    assert door.gateway.mock.stats.calls == 1


async def test_a_provider_failure_mid_stream_ends_it_with_an_error_the_sdk_raises(
    settings: Settings,
) -> None:
    # Given an Anthropic deployment whose streams break after their first text delta
    broken = Behavior(
        stream_cut_after=4, stream_error={"type": "overloaded_error", "message": "Overloaded"}
    )
    mock = MockConfig(models={"claude-3-5-haiku-latest": broken})
    async with open_door(settings, mock_config=mock) as door, client(door) as sdk:
        # When the SDK reads a stream from it
        received: list[str] = []
        with pytest.raises(anthropic.APIStatusError) as failed:
            async with sdk.messages.stream(
                model="claude-haiku", max_tokens=200, messages=STORY
            ) as stream:
                async for text in stream.text_stream:
                    received.append(text)

    # Expect the text that came, then the error in Anthropic's shape, naming our code
    assert received
    assert isinstance(failed.value.body, dict)
    assert failed.value.body["error"]["type"] == "api_error"
    assert failed.value.body["error"]["message"].startswith("provider_error: ")


async def test_a_timeout_and_a_conflict_are_the_error_types_anthropic_documents(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given a model whose provider takes 2 s, and a message answered under an Idempotency-Key
    slow = MockConfig(models={"gpt-4o-mini": Behavior(latency_ms=2000)})
    async with open_door(settings, mock_config=slow) as door, client(door) as sdk:
        again = {"Idempotency-Key": "order-7"}
        await sdk.messages.create(
            model="claude-haiku", max_tokens=10, messages=HELLO, extra_headers=again
        )
        await door.gateway.usage_rows(1)
        # When a caller waits 1 s for the slow model
        with pytest.raises(anthropic.GatewayTimeoutError) as late:
            await sdk.messages.create(
                model="gpt-4o-mini",
                max_tokens=10,
                messages=HELLO,
                extra_headers={"x-queuegate-timeout": "1"},
            )
        # and the answered message is sent again after Redis lost the outcome it kept
        await lose_redis_data(redis_client, settings)
        with pytest.raises(anthropic.ConflictError) as answered:
            await sdk.messages.create(
                model="claude-haiku", max_tokens=10, messages=HELLO, extra_headers=again
            )

    # Expect the SDK's own classes, and the types Anthropic gives a 504 and a 409
    assert late.value.status_code == 504 and late.value.type == "timeout_error"
    assert late.value.api_message is not None
    assert late.value.api_message.startswith("deadline_exceeded: ")
    assert answered.value.status_code == 409 and answered.value.type == "conflict_error"
    assert answered.value.api_message is not None
    assert answered.value.api_message.startswith("already_answered: ")
    assert answered.value.response.headers["x-should-retry"] == "false"


PDF_DATA = base64.b64encode(b"%PDF-1.4 a one-page report").decode()
DOCUMENTS: list[MessageParam] = [
    {
        "role": "user",
        "content": [
            {
                "type": "document",
                "source": {"type": "text", "media_type": "text/plain", "data": "The sky is green."},
                "title": "facts",
            },
            {
                "type": "document",
                "source": {"type": "base64", "media_type": "application/pdf", "data": PDF_DATA},
            },
            {"type": "text", "text": "What colour is the sky?"},
        ],
    }
]


@pytest.mark.parametrize("model", MODELS)
async def test_documents_reach_either_provider_as_it_takes_them(door: Door, model: str) -> None:
    # When a plain text and a PDF document are sent to a model of either provider
    async with client(door) as claude:
        message = await claude.messages.create(model=model, max_tokens=50, messages=DOCUMENTS)

    # Expect an answer, and the documents sent on as the provider documents them (the mock
    # refuses any other shape): Anthropic's document blocks, or for OpenAI's chat the text
    # as text and the PDF as a file part
    assert message.content[0].type == "text"
    assert message.content[0].text.endswith("What colour is the sky?")
    [call] = door.gateway.mock.stats.log
    [turn] = [m for m in call.messages if m["role"] == "user"]
    if model == "claude-haiku":
        assert turn["content"][:2] == [
            {
                "type": "document",
                "source": {"type": "text", "media_type": "text/plain", "data": "The sky is green."},
                "title": "facts",
            },
            {
                "type": "document",
                "source": {"type": "base64", "media_type": "application/pdf", "data": PDF_DATA},
            },
        ]
    else:
        assert turn["content"][:2] == [
            {"type": "text", "text": "The sky is green."},
            {"type": "file", "file": {"file_data": f"data:application/pdf;base64,{PDF_DATA}"}},
        ]


async def test_an_openai_file_part_reaches_an_anthropic_model_as_a_document(door: Door) -> None:
    # When an OpenAI-format request sends a PDF as a file part to a model Anthropic serves
    pdf = {"file_data": f"data:application/pdf;base64,{PDF_DATA}", "filename": "report.pdf"}
    async with door.client() as openai_client:
        await openai_client.chat.completions.create(
            model="claude-haiku",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "file", "file": pdf},  # type: ignore[typeddict-item]
                        {"type": "text", "text": "Summarise it"},
                    ],
                }
            ],
        )
    # Expect Anthropic's document block, its filename the title
    [call] = door.gateway.mock.stats.log
    assert call.messages[0]["content"][0] == {
        "type": "document",
        "source": {"type": "base64", "media_type": "application/pdf", "data": PDF_DATA},
        "title": "report.pdf",
    }


async def test_a_document_the_gateway_cannot_carry_is_refused_naming_its_source(
    door: Door,
) -> None:
    # When a document is given by URL
    by_url: MessageParam = {
        "role": "user",
        "content": [
            {"type": "document", "source": {"type": "url", "url": "https://example.com/a.pdf"}}
        ],
    }
    async with client(door) as claude:
        with pytest.raises(anthropic.BadRequestError) as refused:
            await claude.messages.create(model="claude-haiku", max_tokens=50, messages=[by_url])
    # Expect a 400 naming the field and the sources that are carried, nothing called
    message = refused.value.body["error"]["message"]  # type: ignore[index]
    assert message == (
        "invalid_request: messages.0.content.0.source.type: 'url' is not supported by this "
        "gateway; use one of 'base64', 'text'"
    )
    assert door.gateway.mock.stats.calls == 0


@pytest.mark.parametrize(
    ("model", "fallback"),
    [
        ("local-llama", "claude-haiku"),  # the catalog gives it no fallback
        ("flaky-gpt", "gpt-4o-mini"),  # instead of its catalog's claude-haiku
    ],
)
async def test_a_messages_own_fallback_serves_it_when_its_model_fails(
    settings: Settings, model: str, fallback: str
) -> None:
    # Given the model failing every call
    async with open_door(settings, mock_config=FAILING) as door, client(door) as sdk:
        # When a message for it names its own fallback, as an OpenAI request names it
        raw = await sdk.messages.with_raw_response.create(
            model=model, max_tokens=50, messages=HELLO, extra_body={"fallbacks": [fallback]}
        )
        message = await raw.parse()
        [row] = await door.gateway.usage_rows(1)
        called = {call.model for call in door.gateway.mock.requests}

    # Expect the named fallback to answer it, alone after the model
    assert message.content[0].type == "text"
    assert raw.headers["x-queuegate-model-used"] == fallback
    assert row["model_used"] == fallback
    assert called == {UPSTREAM[model], UPSTREAM[fallback]}


async def test_a_messages_fallback_the_catalog_lacks_is_not_found_naming_it(door: Door) -> None:
    async with client(door) as sdk:
        with pytest.raises(anthropic.NotFoundError) as refused:
            await sdk.messages.create(
                model="claude-haiku",
                max_tokens=10,
                messages=HELLO,
                extra_body={"fallbacks": ["claude-haiku", "claude-9"]},
            )

    assert isinstance(refused.value.body, dict)
    assert refused.value.body["error"]["type"] == "not_found_error"
    assert "fallbacks.1: model 'claude-9' is not served here" in refused.value.message
    assert door.gateway.mock.stats.calls == 0


async def test_a_messages_fallbacks_that_are_no_list_are_refused(door: Door) -> None:
    async with client(door) as sdk:
        with pytest.raises(anthropic.BadRequestError) as refused:
            await sdk.messages.create(
                model="claude-haiku",
                max_tokens=10,
                messages=HELLO,
                extra_body={"fallbacks": "gpt-4o-mini"},
            )

    assert isinstance(refused.value.body, dict)
    assert refused.value.body["error"] == {
        "type": "invalid_request_error",
        "message": "invalid_request: fallbacks: Input should be a valid list",
    }
    assert door.gateway.mock.stats.calls == 0
