"""A streamed answer replayed from a stored one (a response cache hit, a retry under the same
Idempotency-Key) reads as its live stream did: each tool call under its own ``index`` with
its id and function first, each choice apart, ``reasoning_content`` before the content. The
official openai SDK at the front door, GatewayClient on the queue path, the mock provider."""

from __future__ import annotations

from typing import Any

import openai
from openai.types.chat import ChatCompletion

from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from tests.frontdoor_support import open_door
from tests.support import running_gateway

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
TOOLS: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "Weather in Oslo?"}],
    "tools": [WEATHER],
    "n": 2,
}
THINKING: dict[str, Any] = {
    "model": "claude-haiku",
    "messages": [{"role": "user", "content": "Think first"}],
    "reasoning_effort": "low",
}


def calls_of(completion: ChatCompletion) -> list[list[tuple[str, str, str]]]:
    """Each choice's tool calls: id, name, arguments."""
    return [
        [(c.id, c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
        for choice in completion.choices
    ]


async def final(sdk: openai.AsyncOpenAI, **request: Any) -> ChatCompletion:
    async with sdk.chat.completions.stream(**request) as stream:
        return await stream.get_final_completion()


async def texts(sdk: openai.AsyncOpenAI, **request: Any) -> list[tuple[str, str]]:
    """The stream's text deltas, field by field, in order."""
    out: list[tuple[str, str]] = []
    async for chunk in await sdk.chat.completions.create(stream=True, **request):
        for choice in chunk.choices:
            delta = choice.delta.model_dump()
            out.extend((f, delta[f]) for f in ("reasoning_content", "content") if delta.get(f))
    return out


async def test_a_cached_tool_answer_streams_each_call_under_its_index(settings: Settings) -> None:
    # Given a caching team whose streamed question with tools (n=2) was answered
    teams = {"alpha": TeamConfig(cache=True)}
    async with open_door(settings, teams) as door, door.client() as sdk:
        first = await final(sdk, **TOOLS)
        # When it is streamed again, answered from the cache
        cached = await final(sdk, **TOOLS)
        calls = door.gateway.mock.stats.calls

    # Expect the SDK to rebuild the same calls, one per choice, not merged
    assert calls == 1
    assert len(calls_of(first)) == 2 and all(len(c) == 1 for c in calls_of(first))
    assert calls_of(cached) == calls_of(first)


async def test_a_retried_tool_stream_under_its_key_replays_each_call_under_its_index(
    settings: Settings,
) -> None:
    async with open_door(settings) as door, door.client() as sdk:
        # Given a streamed question with tools (n=2) answered under an Idempotency-Key
        headers = {"Idempotency-Key": "tools-1"}
        first = await final(sdk, **TOOLS, extra_headers=headers)
        # When the caller retries it under the same key
        retried = await final(sdk, **TOOLS, extra_headers=headers)
        calls = door.gateway.mock.stats.calls

    # Expect the stored answer's calls, rebuilt by the SDK as they first were
    assert calls == 1
    assert calls_of(retried) == calls_of(first)


async def test_a_cached_thinking_answer_streams_its_reasoning_before_its_content(
    settings: Settings,
) -> None:
    # Given a caching team's OpenAI-format stream from an Anthropic deployment that thinks
    teams = {"alpha": TeamConfig(cache=True)}
    async with open_door(settings, teams) as door, door.client() as sdk:
        live = await texts(sdk, **THINKING)
        # When it is streamed again (from the cache), then retried under a key twice
        cached = await texts(sdk, **THINKING)
        headers = {"Idempotency-Key": "think-1"}
        await texts(sdk, **THINKING, extra_headers=headers)
        retried = await texts(sdk, **THINKING, extra_headers=headers)

    # Expect the reasoning, then the content, each time
    fields = [f for f, _ in live]
    assert fields[0] == "reasoning_content" and fields[-1] == "content"
    joined = {f: "".join(t for g, t in live if g == f) for f in fields}
    for replay in (cached, retried):
        assert [f for f, _ in replay] == ["reasoning_content", "content"]
        assert dict(replay) == joined


async def test_a_cached_answer_streams_tool_calls_with_index_to_a_gateway_client(
    settings: Settings,
) -> None:
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        # Given a question with tools (n=2) that opted in to the cache, answered once
        await (await client.submit(client.job(**TOOLS, cache=True))).result(10)
        # When it is streamed, from the cache
        stream = client.stream(**TOOLS, cache=True, timeout=10)
        chunks = [chunk async for chunk in stream]

    # Expect each choice's call as a first delta: its index, id, type and function
    assert stream.result is not None and stream.result.gateway.cached
    assert stream.result.response is not None
    calls = [(c.index, c.delta["tool_calls"]) for c in chunks if "tool_calls" in c.delta]
    stored = [choice["message"]["tool_calls"][0] for choice in stream.result.response["choices"]]
    assert calls == [(i, [{**stored[i], "index": 0}]) for i in (0, 1)]
    assert all(call["id"] and call["type"] == "function" for _, (call,) in calls)
