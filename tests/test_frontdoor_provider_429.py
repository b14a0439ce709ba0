"""A provider's own 429 through the front door: the workers called it, waited and tried
again already, so the SDKs are told not to send the request again (each retry was a new job
calling the provider again: an attack counted 3 jobs and 6 calls for one request). The
gateway's own limits' 429 is still retried (``test_frontdoor_errors``): nothing was called."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anthropic
import openai
import pytest

from mockprovider import Behavior, MockConfig
from queuegate.settings import Settings
from tests.frontdoor_support import HELLO, Door, open_door
from tests.test_frontdoor_errors import Answers, watched_sdks

LIMITED = MockConfig(models={"claude-3-5-haiku-latest": Behavior(error_rate=1.0, error_status=429)})
"""claude-haiku's deployment: the model has no fallbacks in the bundled catalog."""


@pytest.fixture
async def door(settings: Settings) -> AsyncIterator[Door]:
    async with open_door(settings, mock_config=LIMITED) as opened:
        yield opened


async def test_the_sdks_with_their_default_retries_send_a_providers_429_once(door: Door) -> None:
    # Given the SDKs as callers build them: two retries of a 429 by default
    answers = Answers()
    async with watched_sdks(door, answers) as (gpt, claude):
        # When the provider answers every call 429
        answers.call()
        with pytest.raises(openai.RateLimitError) as limited:
            await gpt.chat.completions.create(model="claude-haiku", messages=HELLO)
        answers.call()
        with pytest.raises(anthropic.RateLimitError) as limited_claude:
            await claude.messages.create(model="claude-haiku", max_tokens=10, messages=HELLO)

    # Expect each request sent once, told not to be sent again: one job each, and only its
    # own calls at the provider
    for error in (limited.value, limited_claude.value):
        assert error.response.headers["x-should-retry"] == "false"
        assert "retry-after" in error.response.headers
    assert answers.calls == [[429], [429]]
    rows = await door.gateway.usage_rows(2)
    assert len(rows) == 2
    assert {row["error_code"] for row in rows} == {"rate_limited"}
    assert door.gateway.mock.stats.calls == sum(row["attempts"] for row in rows)


async def test_a_streamed_request_every_deployment_of_answers_429_is_rate_limited_too(
    door: Door,
) -> None:
    # When the provider answers every call 429 to a streamed request, of each SDK
    async with (
        openai.AsyncOpenAI(base_url=f"{door.url}/v1", api_key=door.keys["alpha"]) as gpt,
        anthropic.AsyncAnthropic(base_url=door.url, api_key=door.keys["alpha"]) as claude,
    ):
        with pytest.raises(openai.RateLimitError) as limited:
            await gpt.chat.completions.create(model="claude-haiku", messages=HELLO, stream=True)
        with pytest.raises(anthropic.RateLimitError) as limited_claude:
            await claude.messages.create(
                model="claude-haiku", max_tokens=10, messages=HELLO, stream=True
            )

    # Expect it told rate_limited, as the same request unstreamed is (it was
    # all_providers_failed), and its usage rows so too
    for error in (limited.value, limited_claude.value):
        assert error.response.headers["x-should-retry"] == "false"
    rows = await door.gateway.usage_rows(2)
    assert {row["error_code"] for row in rows} == {"rate_limited"}
