"""The SDK calls beyond chat that the front door serves: the openai SDK's
``models.retrieve`` and the anthropic SDK's ``messages.count_tokens`` (the gateway's own
estimate, computed in the front door: nothing is published); and errors that repeat a
caller's value repeat only the start of it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anthropic
import httpx
import openai
import pytest

from queuegate.settings import Settings
from tests.frontdoor_support import HELLO, Door, open_door


@pytest.fixture
async def door(settings: Settings) -> AsyncIterator[Door]:
    async with open_door(settings) as opened:
        yield opened


def claude(door: Door) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=door.url, api_key=door.keys["alpha"], max_retries=0)


async def test_a_model_is_retrieved_by_its_alias_and_an_unknown_one_is_not_found(
    door: Door,
) -> None:
    async with door.client() as client:
        model = await client.models.retrieve("gpt-4o-mini")
        with pytest.raises(openai.NotFoundError) as missing:
            await client.models.retrieve("gpt-9")

    assert (model.id, model.object, model.owned_by) == ("gpt-4o-mini", "model", "queuegate")
    assert missing.value.code == "unknown_model"
    assert "GET /v1/models" in missing.value.message


async def test_the_anthropic_sdk_lists_and_retrieves_models_in_its_own_shape(door: Door) -> None:
    # When the anthropic SDK lists the models, and retrieves one (the same routes as OpenAI's)
    async with claude(door) as sdk:
        listed = [model async for model in sdk.models.list()]
        one = await sdk.models.retrieve("claude-haiku")
    # Expect Anthropic's fields filled, as its API sends them (before: None, OpenAI's shape)
    assert {"gpt-4o-mini", "claude-haiku"} <= {m.id for m in listed}
    assert all(m.type == "model" and m.display_name == m.id for m in listed)
    assert (one.id, one.type, one.display_name) == ("claude-haiku", "model", "claude-haiku")
    assert one.created_at.year == 1970  # no date to give: OpenAI's `created` 0 alike


async def test_the_anthropic_sdk_pages_through_the_models(door: Door) -> None:
    # When the anthropic SDK lists the models a page of one at a time (following after_id),
    # and asks for those after the last, and the page before the last
    async with claude(door) as sdk:
        paged = [model.id async for model in sdk.models.list(limit=1)]
        first = await sdk.models.list(limit=1)
        after_last = await sdk.models.list(after_id=paged[-1])
        before_last = await sdk.models.list(before_id=paged[-1], limit=1)
    # Expect every alias once, in order, one a page while more follow; none past the last;
    # and the one before it (before: every page was the whole list, has_more false)
    assert paged == sorted(set(paged)) and {"gpt-4o-mini", "claude-haiku"} <= set(paged)
    assert [m.id for m in first.data] == paged[:1] and first.has_more
    assert after_last.data == [] and not after_last.has_more
    assert [m.id for m in before_last.data] == [paged[-2]] and before_last.has_more


async def test_count_tokens_is_the_gateways_estimate_and_publishes_nothing(door: Door) -> None:
    async with claude(door) as sdk:
        plain = await sdk.messages.count_tokens(model="claude-haiku", messages=HELLO)
        with_system = await sdk.messages.count_tokens(
            model="gpt-4o-mini", system="Be brief.", messages=HELLO
        )

    # "Hello there" is 11 characters: ceil(11 / 4) tokens, and 3 for the message around them;
    # "Be brief." adds ceil((9 + 11) / 4) - 3 and its own message's 3.
    assert (plain.input_tokens, with_system.input_tokens) == (6, 11)
    assert door.gateway.mock.stats.calls == 0


async def test_count_tokens_refuses_what_a_message_would_be_refused(door: Door) -> None:
    async with claude(door) as sdk:
        with pytest.raises(anthropic.NotFoundError):
            await sdk.messages.count_tokens(model="claude-9", messages=HELLO)
        with pytest.raises(anthropic.BadRequestError, match="non-empty content"):
            await sdk.messages.count_tokens(
                model="claude-haiku", messages=[{"role": "user", "content": ""}]
            )
        with pytest.raises(anthropic.BadRequestError, match="max_tokens: Extra inputs"):
            await sdk.messages.count_tokens(
                model="claude-haiku", messages=HELLO, extra_body={"max_tokens": 5}
            )


async def test_an_error_repeats_only_the_start_of_a_long_value(door: Door) -> None:
    name = "m" * 100_000
    async with door.client() as client:
        with pytest.raises(openai.NotFoundError) as missing:
            await client.chat.completions.create(model=name, messages=HELLO)
    async with httpx.AsyncClient(base_url=door.url) as http:
        no_route = await http.get("/v1/" + "r" * 10_000, headers={"x-api-key": door.keys["alpha"]})

    assert "m" * 100 in missing.value.message and "m" * 101 not in missing.value.message
    assert len(missing.value.response.content) < 500
    assert no_route.status_code == 404 and len(no_route.content) < 500
