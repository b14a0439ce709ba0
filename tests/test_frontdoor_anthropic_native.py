"""An Anthropic caller served by an Anthropic deployment gets what the provider sent: thinking
with its signature (and sends it back with a tool call), blocks in their order and unmerged,
usage with its cache split, the request id the SDK reads; tool results hold images, and
their ``is_error`` reaches an OpenAI deployment too. The official anthropic SDK against the
front door, a real worker and the mock provider."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anthropic
import pytest
from anthropic.types import MessageParam, ToolParam

from mockprovider import MockConfig
from mockprovider.config import Behavior
from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from tests.frontdoor_support import Door, open_door

CLAUDE = "claude-3-5-haiku-latest"
"""The upstream model of the catalog's claude-haiku (an Anthropic deployment)."""
SIGNATURE = "mock-signature"
WEATHER: ToolParam = {
    "name": "get_weather",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}
QUESTION: list[MessageParam] = [{"role": "user", "content": "Weather in Oslo?"}]
THINKING: dict[str, Any] = {
    "model": "claude-haiku",
    "max_tokens": 2048,
    "thinking": {"type": "enabled", "budget_tokens": 1024},
    "tools": [WEATHER],
}
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"


def client(door: Door) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=door.url, api_key=door.keys["alpha"], max_retries=0)


@pytest.fixture
async def door(settings: Settings) -> AsyncIterator[Door]:
    async with open_door(settings) as opened:
        yield opened


def sent(door: Door) -> list[dict[str, Any]]:
    """The messages of the last request the provider received."""
    messages: list[dict[str, Any]] = door.gateway.mock.requests[-1].messages
    return messages


def answered(use_id: str, **result: Any) -> MessageParam:
    return {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": use_id, **result}],
    }


async def test_thinking_keeps_its_signature_and_goes_back_with_the_tool_call(door: Door) -> None:
    async with client(door) as sdk:
        # When a thinking model calls a tool, whole and streamed
        whole = await sdk.messages.create(messages=QUESTION, **THINKING)
        async with sdk.messages.stream(messages=QUESTION, **THINKING) as stream:
            deltas = [e.delta.type async for e in stream if e.type == "content_block_delta"]
            streamed = await stream.get_final_message()
        [use] = [block for block in whole.content if block.type == "tool_use"]

        # and the caller sends the turn back, thinking first, with the tool's result
        after = await sdk.messages.create(
            messages=[*QUESTION, whole.to_param(), answered(use.id, content="18 C")], **THINKING
        )
        thinking_sent = sent(door)[1]["content"]
        # and once more with redacted thinking in its place
        redacted: MessageParam = {
            "role": "assistant",
            "content": [{"type": "redacted_thinking", "data": "opaque"}, use.to_dict()],  # type: ignore[list-item]
        }
        again = await sdk.messages.create(
            messages=[*QUESTION, redacted, answered(use.id, content="18 C")], **THINKING
        )
        redacted_sent = sent(door)[1]["content"]

    # Expect the signature, whole and streamed (as a signature_delta), and the provider to
    # get the thinking back with the call, as Anthropic requires
    for message in (whole, streamed):
        assert [block.type for block in message.content] == ["thinking", "tool_use"]
        assert message.content[0].type == "thinking"
        assert message.content[0].signature == SIGNATURE
    assert "signature_delta" in deltas
    assert thinking_sent[0] == {
        "type": "thinking",
        "thinking": "mock thinking about: Weather in Oslo?",
        "signature": SIGNATURE,
    }
    assert redacted_sent[0] == {"type": "redacted_thinking", "data": "opaque"}
    for answer in (after, again):
        assert answer.content[-1].type == "text"
        assert answer.content[-1].text == "mock reply to: 18 C"


async def test_the_sdk_reads_the_request_id_of_answers_and_errors(door: Door) -> None:
    async with client(door) as sdk:
        # When a message is answered, and another refused
        raw = await sdk.messages.with_raw_response.create(
            model="claude-haiku", max_tokens=20, messages=QUESTION
        )
        message = await raw.parse()
        with pytest.raises(anthropic.NotFoundError) as refused:
            await sdk.messages.create(model="no-such-model", max_tokens=20, messages=QUESTION)

    # Expect Anthropic's request-id header beside x-request-id, where the SDK finds it
    assert message._request_id == raw.headers["x-request-id"] == raw.headers["x-queuegate-job-id"]
    assert refused.value.request_id
    assert refused.value.request_id == refused.value.response.headers["x-request-id"]


@pytest.mark.parametrize(
    ("layout", "tools", "kinds"),
    [("split", [], ["text", "text"]), ("tool_first", [WEATHER], ["tool_use", "text"])],
)
async def test_blocks_come_back_in_their_order_and_unmerged(
    settings: Settings, layout: str, tools: list[ToolParam], kinds: list[str]
) -> None:
    # Given an Anthropic deployment that answers in two blocks
    mock = MockConfig(models={CLAUDE: Behavior(layout=layout)})  # type: ignore[arg-type]
    request: dict[str, Any] = {"model": "claude-haiku", "max_tokens": 50, "tools": tools}
    async with open_door(settings, mock_config=mock) as door, client(door) as sdk:
        # When a message is asked whole and streamed
        whole = await sdk.messages.create(messages=QUESTION, **request)
        async with sdk.messages.stream(messages=QUESTION, **request) as stream:
            streamed = await stream.get_final_message()

    # Expect the provider's blocks, each as it sent it
    for message in (whole, streamed):
        assert [block.type for block in message.content] == kinds
    texts = [[b.text for b in m.content if b.type == "text"] for m in (whole, streamed)]
    assert texts[0] == texts[1]
    if layout == "split":
        assert texts[0] == ["mock ", "reply to: Weather in Oslo?"]
    else:
        assert texts[0] == ["mock text after the tool call"]


async def test_usage_keeps_its_cache_split_and_message_start_its_counts(door: Door) -> None:
    # Given a long system prompt cached for an hour
    system: list[Any] = [
        {
            "type": "text",
            "text": "Rules. " * 800,
            "cache_control": {"type": "ephemeral", "ttl": "1h"},
        }
    ]
    request: dict[str, Any] = {"model": "claude-haiku", "max_tokens": 20, "system": system}
    async with client(door) as sdk:
        # When it is written to the cache, then read from it streamed
        written = await sdk.messages.create(messages=QUESTION, **request)
        async with sdk.messages.stream(messages=QUESTION, **request) as stream:
            started = [e.message.usage async for e in stream if e.type == "message_start"]
            read = await stream.get_final_message()

    # Expect the one-hour write in usage.cache_creation, and message_start's counts the
    # provider's, not zeros
    usage = written.usage
    assert usage.cache_creation_input_tokens and usage.cache_creation is not None
    assert usage.cache_creation.ephemeral_1h_input_tokens == usage.cache_creation_input_tokens
    assert usage.cache_creation.ephemeral_5m_input_tokens == 0
    [start] = started
    assert start.input_tokens == usage.input_tokens > 0
    assert start.cache_read_input_tokens == usage.cache_creation_input_tokens
    assert read.usage.cache_read_input_tokens == usage.cache_creation_input_tokens


async def test_a_tool_result_with_an_image_reaches_anthropic_and_is_refused_for_openai(
    door: Door,
) -> None:
    asked = [
        *QUESTION,
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}],
        },
    ]
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}
    result = answered("toolu_1", content=[{"type": "text", "text": "the map:"}, image])
    async with client(door) as sdk:
        # When a tool's result holds an image, for an Anthropic deployment
        answer = await sdk.messages.create(
            model="claude-haiku", max_tokens=50, tools=[WEATHER], messages=[*asked, result]
        )
        delivered = sent(door)[-1]["content"][0]
        # and for a deployment speaking OpenAI's format, which has no image tool results
        with pytest.raises(anthropic.BadRequestError) as refused:
            await sdk.messages.create(
                model="local-llama", max_tokens=50, tools=[WEATHER], messages=[*asked, result]
            )

    # Expect Anthropic to get the blocks as they were, OpenAI's refusal to say why
    assert answer.content[0].type == "text"
    assert delivered["content"] == [{"type": "text", "text": "the map:"}, image]
    assert "tool result that is not text" in refused.value.message


@pytest.mark.parametrize("model", ["claude-haiku", "gpt-4o-mini"])
async def test_a_failed_tool_result_says_so_to_either_provider(door: Door, model: str) -> None:
    asked = [
        *QUESTION,
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}],
        },
    ]
    failed = answered("toolu_1", content="no such city", is_error=True)
    async with client(door) as sdk:
        # When a tool's result is marked as an error
        await sdk.messages.create(
            model=model, max_tokens=50, tools=[WEATHER], messages=[*asked, failed]
        )

    # Expect Anthropic to get the flag, OpenAI the result marked as an error
    if model == "claude-haiku":
        assert sent(door)[-1]["content"][0]["is_error"] is True
    else:
        assert sent(door)[-1] == {
            "role": "tool",
            "tool_call_id": "toolu_1",
            "content": "Error: no such city",
        }


async def test_an_openai_caller_gets_none_of_the_anthropic_body(door: Door) -> None:
    async with door.client() as sdk:
        # When an OpenAI caller is answered by the Anthropic deployment, whole and streamed
        whole = await sdk.chat.completions.create(
            model="claude-haiku", messages=[{"role": "user", "content": "Hi"}]
        )
        chunks = [
            chunk.model_dump(exclude_none=True)
            async for chunk in await sdk.chat.completions.create(
                model="claude-haiku", messages=[{"role": "user", "content": "Hi"}], stream=True
            )
        ]

    # Expect OpenAI's shapes only: no provider body, no chunk for an event with no content
    assert "anthropic_body" not in (whole.model_extra or {})
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks if chunk["choices"]]
    assert all("anthropic_events" not in delta for delta in deltas)
    assert "".join(delta.get("content", "") for delta in deltas) == "mock reply to: Hi"
    assert all(delta for delta in deltas[:-1])


async def test_a_cached_answer_streams_the_blocks_it_was_given(settings: Settings) -> None:
    # Given a team whose answers are cached, and a thinking answer to a tool question
    request: dict[str, Any] = {"messages": QUESTION, **THINKING}
    teams = {"alpha": TeamConfig(cache=True)}
    async with open_door(settings, teams) as door, client(door) as sdk:
        first = await sdk.messages.create(**request)
        # When the same request is streamed, answered from the cache
        async with sdk.messages.stream(**request) as stream:
            started = [e.message.usage async for e in stream if e.type == "message_start"]
            cached = await stream.get_final_message()
        calls = door.gateway.mock.stats.calls

    # Expect the provider's blocks, signature included, and its usage from message_start on:
    # the tokens it was billed, none (before: the cached call's)
    assert calls == 1
    assert [b.to_dict() for b in cached.content] == [b.to_dict() for b in first.content]
    assert cached.content[0].type == "thinking" and cached.content[0].signature == SIGNATURE
    assert first.usage.input_tokens > 0
    assert started[0].input_tokens == cached.usage.input_tokens == 0
    assert cached.usage.output_tokens == 0
    assert cached.usage.output_tokens_details is not None
    assert cached.usage.output_tokens_details.thinking_tokens == 0


async def test_a_strict_tool_is_served_its_strictness_reaching_the_provider(door: Door) -> None:
    # Given a tool as the anthropic SDK's ToolParam documents it: strict, with example inputs
    strict: ToolParam = {**WEATHER, "strict": True}
    examples: ToolParam = {**strict, "input_examples": [{"city": "Oslo"}]}
    async with client(door) as sdk:
        # When an Anthropic caller sends it to a model Anthropic serves, Expect the tool sent
        # as it was
        assert await sdk.messages.create(
            model="claude-haiku", max_tokens=50, tools=[examples], messages=QUESTION
        )
        sent_tools = door.gateway.mock.requests[-1].body
        assert sent_tools is not None
        assert sent_tools["tools"] == [examples]
        # ... and to one OpenAI serves, its function strict (OpenAI's has no examples)
        assert await sdk.messages.create(
            model="gpt-4o-mini", max_tokens=50, tools=[strict], messages=QUESTION
        )
    received = door.gateway.mock.requests[-1].body
    assert received is not None
    assert received["tools"][0]["function"]["strict"] is True
