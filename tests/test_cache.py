"""The response cache: an opted-in repeat is answered from Redis, free, and still accounted."""

from __future__ import annotations

from decimal import Decimal

import pytest

from queuegate.provider_formats import ANTHROPIC_BODY
from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from tests.support import running_gateway
from tests.teams import register

HELLO = [{"role": "user", "content": "Hello there"}]


async def test_a_repeated_cached_job_is_answered_from_the_cache_for_free(
    settings: Settings,
) -> None:
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        # Given a job that opted in to the cache, answered once
        first = await (await client.submit(client.job("gpt-4o-mini", HELLO, cache=True))).result(10)

        # When the same request comes again
        again = await (await client.submit(client.job("gpt-4o-mini", HELLO, cache=True))).result(10)

        # Expect the same answer (under its own job's id, saying the no tokens it is billed),
        # marked cached, costing nothing, with no second call
        assert again.status == "ok" and again.gateway.cached
        assert first.response is not None and again.response is not None
        assert again.response == first.response | {
            "id": f"chatcmpl-{again.job_id}",
            "usage": again.response["usage"],
        }
        assert again.gateway.cost_usd == 0 and again.gateway.attempts == []
        assert not first.gateway.cached and first.gateway.cost_usd > 0
        assert gw.mock.stats.calls == 1
        rows = {row["job_id"]: row for row in await gw.usage_rows(2)}
        assert rows[again.job_id]["cached"] and rows[again.job_id]["cost_usd"] == Decimal(0)
        assert not rows[first.job_id]["cached"]


@pytest.mark.parametrize("model", ["gpt-4o-mini", "claude-haiku"])
async def test_a_cached_answers_usage_says_the_no_tokens_its_row_bills(
    settings: Settings, model: str
) -> None:
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        # Given a job that opted in to the cache, answered once
        first = await (await client.submit(client.job(model, HELLO, cache=True))).result(10)

        # When the same request comes again, whole and streamed
        again = await (await client.submit(client.job(model, HELLO, cache=True))).result(10)
        stream = client.stream(model, HELLO, cache=True, timeout=10)
        assert [chunk async for chunk in stream]
        streamed = stream.result
        rows = {row["job_id"]: row for row in await gw.usage_rows(3)}

    # Expect each cached answer's usage to say its row's tokens, none, its details none too,
    # and an Anthropic answer's own usage alike (before: the cached call's, 4 in and 6 out)
    assert first.response is not None and first.response["usage"]["total_tokens"] > 0
    for result in (again, streamed):
        assert result is not None and result.gateway.cached and result.response is not None
        row = rows[result.job_id]
        usage = result.response["usage"]
        counts = (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"])
        assert counts == (row["input_tokens"], row["output_tokens"], 0) == (0, 0, 0)
        details = usage.get("prompt_tokens_details") or {}
        assert details.get("cached_tokens", 0) == row["cached_tokens"] == 0
        assert not any((usage.get("completion_tokens_details") or {}).values())
        native = result.response.get(ANTHROPIC_BODY)
        if native is not None:
            assert (native["usage"]["input_tokens"], native["usage"]["output_tokens"]) == (0, 0)


async def test_jobs_without_the_flag_and_other_requests_are_not_served_from_the_cache(
    settings: Settings,
) -> None:
    async with running_gateway(settings, teams=("alpha", "beta")) as gw:
        async with gw.client("alpha") as alpha:
            await (await alpha.submit(alpha.job("gpt-4o-mini", HELLO, cache=True))).result(10)
            plain = await alpha.chat("gpt-4o-mini", HELLO, timeout=10)
            other = await (
                await alpha.submit(alpha.job("gpt-4o-mini", HELLO, cache=True, max_tokens=5))
            ).result(10)
        async with gw.client("beta") as beta:
            elsewhere = await (
                await beta.submit(beta.job("gpt-4o-mini", HELLO, cache=True))
            ).result(10)

        assert not any(r.gateway.cached for r in (plain, other, elsewhere))
        assert gw.mock.stats.calls == 4


async def test_a_team_that_caches_by_default_answers_a_repeat_from_the_cache(
    settings: Settings,
) -> None:
    # Given team alpha caching by default, and a job that says nothing about the cache
    await register(settings, "alpha", TeamConfig(cache=True))
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        first = await client.chat("gpt-4o-mini", HELLO, timeout=10)

        # When the same request comes again
        again = await client.chat("gpt-4o-mini", HELLO, timeout=10)

        # Expect it answered from the cache, with no second provider call
        assert not first.gateway.cached
        assert again.gateway.cached and first.response is not None
        assert again.response is not None
        assert again.response == first.response | {
            "id": f"chatcmpl-{again.job_id}",
            "usage": again.response["usage"],
        }
        assert gw.mock.stats.calls == 1


async def test_a_job_that_says_no_cache_is_called_fresh_in_a_caching_team(
    settings: Settings,
) -> None:
    # Given team alpha caching by default, and an answer in the cache
    await register(settings, "alpha", TeamConfig(cache=True))
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        await client.chat("gpt-4o-mini", HELLO, timeout=10)

        # When the same request comes with cache=False
        fresh = await (await client.submit(client.job("gpt-4o-mini", HELLO, cache=False))).result(
            10
        )

        # Expect the provider called again
        assert not fresh.gateway.cached
        assert gw.mock.stats.calls == 2


async def test_a_cached_answer_to_a_streamed_job_arrives_as_one_chunk(settings: Settings) -> None:
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        await (await client.submit(client.job("claude-haiku", HELLO, cache=True))).result(10)

        stream = client.stream("claude-haiku", HELLO, cache=True, timeout=10)
        chunks = [chunk async for chunk in stream]

        assert stream.result is not None and stream.result.gateway.cached
        assert [c.delta for c in chunks] == [{"content": stream.result.content}]
        # (with no Anthropic events: an Anthropic caller gets the blocks whole at the end)
        assert [c.anthropic_events for c in chunks] == [[]]
        assert gw.mock.stats.calls == 1
