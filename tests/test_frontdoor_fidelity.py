"""What the provider said comes back to the caller whole, in either API's format, streamed or
not: the stop sequence it stopped at and the model it served. The official openai and
anthropic SDKs against a real front door, worker and mock provider over HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator

import openai
import pytest
from anthropic import AsyncAnthropic
from anthropic.types import MessageParam

from queuegate.settings import Settings
from router import load_catalog
from tests.frontdoor_support import Door, open_door

STORY: list[MessageParam] = [{"role": "user", "content": "Tell me a story"}]
"""The mock answers ``mock reply to: Tell me a story``: it stops at ``story`` when asked."""


@pytest.fixture
async def door(settings: Settings) -> AsyncIterator[Door]:
    async with open_door(settings) as opened:
        yield opened


def anthropic_client(door: Door) -> AsyncAnthropic:
    return AsyncAnthropic(base_url=door.url, api_key=door.keys["alpha"], max_retries=0)


def served_model(door: Door, alias: str) -> str:
    """The upstream model of the alias's deployment, which the mock reports serving."""
    catalog = load_catalog(None, {"QUEUEGATE_MOCK_URL": door.gateway.mock.url})
    return catalog.models[alias].deployments[0].model


async def test_an_anthropic_caller_is_told_the_stop_sequence_streamed_or_not(door: Door) -> None:
    async with anthropic_client(door) as sdk:
        # When a Claude model stops at one of the request's stop sequences, asked whole
        whole = await sdk.messages.create(
            model="claude-haiku", max_tokens=50, stop_sequences=["story"], messages=STORY
        )
        # and streamed
        async with sdk.messages.stream(
            model="claude-haiku", max_tokens=50, stop_sequences=["story"], messages=STORY
        ) as stream:
            deltas = [e async for e in stream if e.type == "message_delta"]
            final = await stream.get_final_message()

    # Expect Anthropic's own answer: stop_sequence, naming the sequence
    for message in (whole, final):
        assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "story")
        assert message.content[0].type == "text"
        assert message.content[0].text.rstrip() == "mock reply to: Tell me a"
    [delta] = deltas
    assert (delta.delta.stop_reason, delta.delta.stop_sequence) == ("stop_sequence", "story")


async def test_an_openai_caller_gets_the_stop_sequence_beside_finish_reason(door: Door) -> None:
    async with door.client() as sdk:
        # When an OpenAI-format caller's Claude model stops at a stop sequence
        whole = await sdk.chat.completions.create(
            model="claude-haiku", max_tokens=50, stop=["story"], messages=[dict(STORY[0])]
        )
        chunks = [
            chunk
            async for chunk in await sdk.chat.completions.create(
                model="claude-haiku",
                max_tokens=50,
                stop=["story"],
                messages=[dict(STORY[0])],
                stream=True,
            )
        ]

    # Expect OpenAI's finish_reason stop, and the sequence Anthropic named beside it
    [choice] = whole.choices
    assert choice.finish_reason == "stop"
    assert choice.model_extra == {"stop_sequence": "story"}
    [last] = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason]
    assert last.finish_reason == "stop" and last.model_extra == {"stop_sequence": "story"}


async def test_an_openai_provider_cannot_say_it_stopped_at_a_sequence(door: Door) -> None:
    async with anthropic_client(door) as sdk:
        # When a model served by OpenAI's API stops at a stop sequence
        message = await sdk.messages.create(
            model="gpt-4o-mini", max_tokens=50, stop_sequences=["story"], messages=STORY
        )

    # Expect the sequence honoured, but end_turn: OpenAI's finish_reason "stop" does not tell
    # a stop sequence from a natural end (docs/providers.md)
    assert message.content[0].type == "text"
    assert message.content[0].text.rstrip() == "mock reply to: Tell me a"
    assert (message.stop_reason, message.stop_sequence) == ("end_turn", None)


@pytest.mark.parametrize("alias", ["claude-haiku", "gpt-4o-mini"])
async def test_every_answer_names_the_model_the_provider_served(door: Door, alias: str) -> None:
    served = served_model(door, alias)
    async with door.client() as openai_sdk, anthropic_client(door) as anthropic_sdk:
        # When the alias is asked for in both formats, whole and streamed
        raw = await openai_sdk.chat.completions.with_raw_response.create(
            model=alias, messages=[dict(STORY[0])]
        )
        completion = raw.parse()
        chunks = [
            chunk
            async for chunk in await openai_sdk.chat.completions.create(
                model=alias, messages=[dict(STORY[0])], stream=True
            )
        ]
        message = await anthropic_sdk.messages.create(model=alias, max_tokens=50, messages=STORY)
        async with anthropic_sdk.messages.stream(
            model=alias, max_tokens=50, messages=STORY
        ) as stream:
            [start] = [e async for e in stream if e.type == "message_start"]
            final = await stream.get_final_message()

    # Expect the model the provider reported everywhere, as the providers themselves answer;
    # the gateway's header names the alias that served (another one after a fallback)
    assert completion.model == served
    assert {chunk.model for chunk in chunks} == {served}
    assert message.model == start.message.model == final.model == served
    assert raw.headers["x-queuegate-model-used"] == alias


async def test_more_than_four_stop_sequences_reach_a_vllm_server_and_openai_refuses_them(
    door: Door,
) -> None:
    stops = ["never", "seen", "here", "at", "all", "story"]
    async with door.client() as sdk:
        # When a caller sends six stop sequences to a model a vLLM server serves
        served = await sdk.chat.completions.create(
            model="local-llama", max_tokens=50, stop=stops, messages=[dict(STORY[0])]
        )
        sent = door.gateway.mock.requests[-1].body
        # and to one OpenAI serves
        with pytest.raises(openai.BadRequestError) as refused:
            await sdk.chat.completions.create(
                model="gpt-4o-mini", max_tokens=50, stop=stops, messages=[dict(STORY[0])]
            )

    # Expect vLLM, which takes a list of any length, to get them all and stop at the last
    assert sent is not None and sent["stop"] == stops
    assert served.choices[0].message.content == "mock reply to: Tell me a"
    # and OpenAI's limit of 4 to be kept, naming the parameter
    assert refused.value.param == "stop"
