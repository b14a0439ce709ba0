"""An OpenAI deployment's streamed answer reaches the caller whole: every choice (``n`` > 1)
under its own index with its logprobs, a refusal, and the ``system_fingerprint`` and
``service_tier`` the provider sent; through the front door (the official ``openai`` SDK) and
through the queue (``GatewayClient.stream``), against a real worker and the mock provider.
Its refusal reaches an Anthropic-format caller (the ``anthropic`` SDK) as a refusal too."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from anthropic import AsyncAnthropic
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from mockprovider import Behavior, MockConfig
from mockprovider.wire import SYSTEM_FINGERPRINT
from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from tests.frontdoor_support import Door, open_door
from tests.support import running_gateway

ASK = [{"role": "user", "content": "Tell me a story"}]
TEXT = "mock reply to: Tell me a story"
"""What the mock answers, in every choice."""
REFUSAL = "I can't help with that."
REFUSING = MockConfig(default=Behavior(refusal=REFUSAL))


@pytest.fixture
async def door(settings: Settings) -> AsyncIterator[Door]:
    async with open_door(settings) as opened:
        yield opened


def tokens(chunks: list[ChatCompletionChunk], index: int) -> str:
    """The tokens of choice ``index``'s streamed content logprobs, joined."""
    return "".join(
        token.token
        for chunk in chunks
        for choice in chunk.choices
        if choice.index == index and choice.logprobs is not None
        for token in choice.logprobs.content or []
    )


async def test_a_front_door_stream_carries_every_choice_with_its_logprobs(door: Door) -> None:
    async with door.client() as sdk:
        # When two choices are streamed with the logprobs of their tokens
        stream = await sdk.chat.completions.create(
            model="gpt-4o-mini", messages=ASK, n=2, logprobs=True, stream=True
        )
        chunks = [chunk async for chunk in stream]

    # Expect each choice's deltas under its index, its logprobs beside them, and its finish
    choices = [choice for chunk in chunks for choice in chunk.choices]
    assert {choice.index for choice in choices} == {0, 1}
    for index in (0, 1):
        mine = [choice for choice in choices if choice.index == index]
        assert mine[0].delta.role == "assistant"
        assert "".join(choice.delta.content or "" for choice in mine) == TEXT
        assert tokens(chunks, index) == TEXT
        assert [choice.finish_reason for choice in mine if choice.finish_reason] == ["stop"]


async def test_a_queue_stream_relays_and_assembles_every_choice(settings: Settings) -> None:
    async with running_gateway(settings) as gateway, gateway.client("alpha") as client:
        # When a queue client streams two choices with logprobs
        stream = client.stream("gpt-4o-mini", ASK, n=2, logprobs=True, timeout=10)
        chunks = [chunk async for chunk in stream]

    # Expect each chunk to name its choice and carry its logprobs
    for index in (0, 1):
        mine = [chunk for chunk in chunks if chunk.index == index]
        assert "".join(chunk.delta.get("content") or "" for chunk in mine) == TEXT
        streamed = [t["token"] for c in mine if c.logprobs for t in c.logprobs["content"]]
        assert "".join(streamed) == TEXT
    # and the result to hold every choice whole, as an unstreamed answer would
    assert stream.result is not None and stream.result.response is not None
    whole = ChatCompletion.model_validate(stream.result.response)
    assert [(choice.index, choice.message.content) for choice in whole.choices] == [
        (0, TEXT),
        (1, TEXT),
    ]
    for choice in whole.choices:
        assert choice.logprobs is not None and choice.logprobs.content is not None
        assert "".join(token.token for token in choice.logprobs.content) == TEXT


async def test_a_streamed_refusal_reaches_the_caller_as_a_refusal(settings: Settings) -> None:
    async with open_door(settings, mock_config=REFUSING) as door, door.client() as sdk:
        # When the model refuses a streamed request, at the front door and through the queue
        stream = await sdk.chat.completions.create(model="gpt-4o-mini", messages=ASK, stream=True)
        chunks = [chunk async for chunk in stream]
        async with door.gateway.client("alpha") as client:
            queued = client.stream("gpt-4o-mini", ASK, timeout=10)
            relayed = [chunk async for chunk in queued]

    # Expect the refusal in the deltas, no content, and the result's message.refusal
    deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
    assert "".join(delta.refusal or "" for delta in deltas) == REFUSAL
    assert not any(delta.content for delta in deltas)
    assert "".join(chunk.delta.get("refusal") or "" for chunk in relayed) == REFUSAL
    assert queued.result is not None and queued.result.response is not None
    [choice] = ChatCompletion.model_validate(queued.result.response).choices
    assert (choice.message.content, choice.message.refusal) == (None, REFUSAL)


async def test_a_refusal_answered_from_the_cache_is_streamed_as_a_refusal(
    settings: Settings,
) -> None:
    caching = {"alpha": TeamConfig(cache=True)}
    async with open_door(settings, caching, REFUSING) as door, door.client() as sdk:
        # When a streamed refusal is asked for again, and answered from the response cache
        for _ in range(2):
            stream = await sdk.chat.completions.create(
                model="gpt-4o-mini", messages=ASK, stream=True
            )
            chunks = [chunk async for chunk in stream]
        calls = door.gateway.mock.stats.calls

    # Expect the cached answer streamed as the refusal it is
    assert calls == 1
    deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
    assert "".join(delta.refusal or "" for delta in deltas) == REFUSAL


async def test_stream_chunks_carry_the_fingerprint_and_tier_the_provider_sent(
    door: Door,
) -> None:
    async with door.client() as sdk:
        # When a streamed answer is asked for, with its usage
        stream = await sdk.chat.completions.create(
            model="gpt-4o-mini",
            messages=ASK,
            service_tier="flex",
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]

    # Expect every chunk to carry them, as OpenAI's own do
    assert {(chunk.system_fingerprint, chunk.service_tier) for chunk in chunks} == {
        (SYSTEM_FINGERPRINT, "flex")
    }


async def test_an_anthropic_caller_is_told_an_openai_model_refused(settings: Settings) -> None:
    async with open_door(settings, mock_config=REFUSING) as door:
        sdk = AsyncAnthropic(base_url=door.url, api_key=door.keys["alpha"], max_retries=0)
        async with sdk:
            # When an OpenAI model refuses a Messages API request, whole and streamed
            whole = await sdk.messages.create(model="gpt-4o-mini", max_tokens=50, messages=ASK)
            async with sdk.messages.stream(
                model="gpt-4o-mini", max_tokens=50, messages=ASK
            ) as stream:
                streamed = await stream.get_final_message()

    # Expect Anthropic's stop_reason for it, and what the model said
    for message in (whole, streamed):
        assert message.stop_reason == "refusal"
        assert [(block.type, getattr(block, "text", None)) for block in message.content] == [
            ("text", REFUSAL)
        ]


RUN_SQL = {
    "type": "custom",
    "custom": {
        "name": "run_sql",
        "description": "Runs one SELECT",
        "format": {
            "type": "grammar",
            "grammar": {"syntax": "lark", "definition": 'start: "SELECT " /.+/'},
        },
    },
}
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
}


def allowed(mode: str, *tools: dict[str, Any]) -> dict[str, Any]:
    return {"type": "allowed_tools", "allowed_tools": {"mode": mode, "tools": list(tools)}}


async def test_custom_tools_and_allowed_tools_reach_openai_unchanged_and_come_back(
    door: Door,
) -> None:
    tools: Any = [WEATHER, RUN_SQL]
    forced: Any = {"type": "custom", "custom": {"name": "run_sql"}}
    only_sql: Any = allowed("required", {"type": "custom", "custom": {"name": "run_sql"}})
    only_weather: Any = allowed("auto", {"type": "function", "function": {"name": "get_weather"}})
    async with door.client() as sdk:
        # When a caller forces its custom tool
        whole = await sdk.chat.completions.create(
            model="gpt-4o-mini", messages=ASK, tools=tools, tool_choice=forced
        )
        sent = door.gateway.mock.requests[-1].body
        # and allows only it, streamed, or only a function
        stream = await sdk.chat.completions.create(
            model="gpt-4o-mini", messages=ASK, tools=tools, tool_choice=only_sql, stream=True
        )
        chunks = [chunk async for chunk in stream]
        weather = await sdk.chat.completions.create(
            model="gpt-4o-mini", messages=ASK, tools=tools, tool_choice=only_weather
        )
        allowed_sent = door.gateway.mock.requests[-1].body
        # and sends the custom call back with its result
        [call] = whole.choices[0].message.tool_calls or []
        history: Any = [
            *ASK,
            {"role": "assistant", "tool_calls": [call.to_dict()]},
            {"role": "tool", "tool_call_id": call.id, "content": "3 rows"},
        ]
        answer = await sdk.chat.completions.create(
            model="gpt-4o-mini", messages=history, tools=tools
        )
        sent_back = door.gateway.mock.requests[-1].body

    # Expect OpenAI to get the tools and choices as sent, and its custom call back whole
    assert sent is not None and allowed_sent is not None and sent_back is not None
    assert (sent["tools"], sent["tool_choice"]) == (tools, forced)
    assert allowed_sent["tool_choice"] == only_weather
    assert call.to_dict() == {
        "id": call.id,
        "type": "custom",
        "custom": {"name": "run_sql", "input": ""},
    }
    assert whole.choices[0].finish_reason == "tool_calls"
    # streamed under its own type
    streamed = [
        part.to_dict()
        for chunk in chunks
        for choice in chunk.choices
        for part in choice.delta.tool_calls or []
    ]
    assert [(part["type"], part["custom"]["name"]) for part in streamed] == [("custom", "run_sql")]
    [function] = weather.choices[0].message.tool_calls or []
    assert (function.type, function.to_dict()["function"]["name"]) == ("function", "get_weather")
    assert sent_back["messages"][1]["tool_calls"] == [call.to_dict()]
    assert answer.choices[0].message.content == "mock reply to: 3 rows"
