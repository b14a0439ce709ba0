"""What each provider cannot take is refused or dropped as the policy says, what it offers
(prompt caching, reasoning) is carried both ways, and every token class is priced; all over
real HTTP against the mock, which checks requests as strictly as the real APIs."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web

from mockprovider import Behavior, MockConfig, MockProvider
from mockprovider.catalog import mock_deployment
from mockprovider.wire import REASONING_TOKENS
from queuegate.errors import AllProvidersFailed, InvalidRequest, StreamInterrupted
from queuegate.keys import Keys
from queuegate.messages import ChatJob
from queuegate.provider_formats import ANTHROPIC_BODY, anthropic_message
from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from queuegate.spend import ledger_spent
from router import Catalog, open_router
from router.providers import Delta, Piece
from router.providers.anthropic import DEFAULT_MAX_TOKENS, THINKING_BUDGETS
from tests.support import running_gateway, serving
from tests.teams import register
from workers.admission.estimate import prompt_tokens

ENV = {"QUEUEGATE_MOCK_KEY": "sk-test-fidelity"}
LONG = "All work and no play makes a dull prompt. " * 120
"""About 5,000 characters: over the providers' shortest cacheable prefix (1,024 tokens)."""


def chat(model: str, text: str = "Hello there", **fields: Any) -> ChatJob:
    return ChatJob.model_validate(
        {
            "job_id": f"job-{time.monotonic_ns()}",
            "team": "alpha",
            "model": model,
            "messages": [{"role": "user", "content": text}],
            **fields,
        }
    )


def catalog(url: str, **claude: Any) -> Catalog:
    """``claude`` (Anthropic) and ``gpt`` (OpenAI), each one deployment on the mock, with
    cache prices; ``claude`` fields go to its alias entry."""
    return Catalog.model_validate(
        {
            "models": {
                "claude": {
                    "deployments": [
                        mock_deployment(
                            "claude-dep",
                            "claude-model",
                            url,
                            provider="anthropic",
                            input_per_mtok="3",
                            output_per_mtok="15",
                            cached_input_per_mtok="0.30",
                            cache_write_per_mtok="3.75",
                            cache_write_1h_per_mtok="6",
                        )
                    ],
                    **claude,
                },
                "gpt": {
                    "deployments": [
                        mock_deployment(
                            "gpt-dep",
                            "gpt-model",
                            url,
                            input_per_mtok="2",
                            output_per_mtok="8",
                            cached_input_per_mtok="0.5",
                        )
                    ]
                },
            }
        }
    )


@pytest.fixture
async def mock() -> AsyncIterator[MockProvider]:
    async with MockProvider() as provider:
        yield provider


# --- 1 and 2: refuse or drop, never silently ----------------------------------------------------

UNSUPPORTED_BY_ANTHROPIC: list[tuple[dict[str, Any], str]] = [
    ({"params": {"logprobs": True, "top_logprobs": 2}}, "logprobs"),
    ({"params": {"frequency_penalty": 0.5}}, "frequency_penalty"),
    ({"params": {"presence_penalty": 0.5}}, "presence_penalty"),
    ({"params": {"logit_bias": {"50256": -100}}}, "logit_bias"),
    ({"params": {"seed": 7}}, "seed"),
    ({"params": {"service_tier": "flex"}}, "service_tier"),
    ({"params": {"metadata": {"trace": "t-1"}}}, "metadata.trace"),
    ({"params": {"temperature": 1.5}}, "temperature"),
    (
        {"messages": [{"role": "user", "content": "Hi", "name": "alice"}]},
        "messages[].name",
    ),
    (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is it?"},
                        {
                            "type": "image_url",
                            "image_url": {"url": "https://example.com/a.png", "detail": "high"},
                        },
                    ],
                }
            ]
        },
        "image_url.detail",
    ),
]


@pytest.mark.parametrize(("fields", "param"), UNSUPPORTED_BY_ANTHROPIC)
async def test_a_parameter_anthropic_lacks_is_refused_by_name_before_any_call(
    settings: Settings, mock: MockProvider, fields: dict[str, Any], param: str
) -> None:
    # Given the default policy (refuse), when a job asks Anthropic for what it lacks
    async with open_router(catalog(mock.url), ENV, settings) as router:
        with pytest.raises(InvalidRequest) as caught:
            await router.complete(chat("claude", **fields))

    # Expect the caller's error, naming the parameter, and no call made or counted
    assert caught.value.code == "invalid_request"
    assert param in caught.value.message
    assert caught.value.attempts == []
    assert mock.stats.calls == 0


@pytest.mark.parametrize(("fields", "param"), UNSUPPORTED_BY_ANTHROPIC)
async def test_with_drop_the_parameter_is_left_out_and_listed(
    settings: Settings, mock: MockProvider, fields: dict[str, Any], param: str
) -> None:
    async with open_router(catalog(mock.url), ENV, settings) as router:
        routed = await router.complete(chat("claude", unsupported_params="drop", **fields))

    [call] = mock.requests
    assert call.status == 200  # the mock refuses any field the Messages API does not have
    if param == "temperature":
        assert routed.params_changed == ("temperature",)
        assert call.body is not None and call.body["temperature"] == 1.0
    else:
        assert param in routed.params_dropped
        assert routed.params_changed == ()


async def test_openai_metadata_never_overwrites_the_user_id_mapped_from_user(
    settings: Settings, mock: MockProvider
) -> None:
    params = {"user": "user-42", "metadata": {"user_id": "someone-else", "trace": "t-1"}}
    async with open_router(catalog(mock.url), ENV, settings) as router:
        routed = await router.complete(chat("claude", params=params, unsupported_params="drop"))

    [call] = mock.requests
    assert call.body is not None and call.body["metadata"] == {"user_id": "user-42"}
    assert set(routed.params_dropped) == {"metadata.user_id", "metadata.trace"}


@pytest.mark.parametrize(("tier", "sent"), [("auto", "auto"), ("default", "standard_only")])
async def test_service_tiers_anthropic_has_are_mapped(
    settings: Settings, mock: MockProvider, tier: str, sent: str
) -> None:
    async with open_router(catalog(mock.url), ENV, settings) as router:
        routed = await router.complete(chat("claude", params={"service_tier": tier}))

    [call] = mock.requests
    assert call.body is not None and call.body["service_tier"] == sent
    assert routed.params_dropped == ()


async def test_a_refusing_deployment_passes_the_job_to_a_fallback_that_takes_it(
    settings: Settings, mock: MockProvider
) -> None:
    async with open_router(catalog(mock.url), ENV, settings) as router:
        routed = await router.complete(chat("claude", params={"seed": 7}, fallbacks=["gpt"]))

    assert routed.model_used == "gpt"
    [call] = mock.requests  # Anthropic was never called
    assert call.body is not None and call.body["seed"] == 7
    assert [attempt.deployment for attempt in routed.attempts] == ["gpt-dep"]


async def test_the_job_policy_overrides_the_team_which_overrides_the_catalog(
    settings: Settings, mock: MockProvider
) -> None:
    seed = {"params": {"seed": 7}}
    async with open_router(catalog(mock.url, unsupported_params="drop"), ENV, settings) as router:
        by_model = await router.complete(chat("claude", **seed))
        with pytest.raises(InvalidRequest):
            await router.complete(chat("claude", **seed), unsupported_params="refuse")
        by_job = await router.complete(
            chat("claude", unsupported_params="drop", **seed), unsupported_params="refuse"
        )

    assert by_model.params_dropped == ("seed",)
    assert by_job.params_dropped == ("seed",)


async def test_openai_gets_only_its_own_parameters_and_anthropic_thinking_as_effort(
    settings: Settings, mock: MockProvider
) -> None:
    thinking = {"type": "enabled", "budget_tokens": 8000}
    async with open_router(catalog(mock.url), ENV, settings) as router:
        with pytest.raises(InvalidRequest) as caught:
            await router.complete(chat("gpt", params={"top_k": 40}))
        routed = await router.complete(chat("gpt", params={"thinking": thinking}))

    assert "top_k" in caught.value.message
    [call] = mock.requests
    assert call.body is not None and call.body["reasoning_effort"] == "medium"
    assert "thinking" not in call.body
    assert routed.reasoning_tokens == 256  # the mock's medium effort


async def test_team_policy_and_dropped_parameters_reach_the_result_and_the_usage_row(
    settings: Settings,
) -> None:
    # Given team alpha configured to drop what a provider lacks
    await register(settings, "alpha", TeamConfig(unsupported_params="drop"))
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        # When it asks Claude with a seed and a temperature above Anthropic's range
        dropped = await client.chat(
            "claude-haiku", [{"role": "user", "content": "Hi"}], seed=7, temperature=1.5
        )
        # ... and one job of it says refuse
        job = client.job("claude-haiku", [{"role": "user", "content": "Hi"}], seed=7)
        refused = await (
            await client.submit(job.model_copy(update={"unsupported_params": "refuse"}))
        ).result(10)

        # Expect the first served, saying what was dropped and changed, in its usage row too
        assert dropped.status == "ok", dropped.error
        assert dropped.gateway.params_dropped == ["seed"]
        assert dropped.gateway.params_changed == ["temperature"]
        # ... and the second refused as the caller's error, naming the parameter
        assert refused.status == "error" and refused.error is not None
        assert refused.error.code == "invalid_request"
        assert "seed" in refused.error.message
        assert refused.error.attempts == 0
        rows = {row["job_id"]: row for row in await gw.usage_rows(2)}
        row = rows[dropped.job_id]
        assert (row["params_dropped"], row["params_changed"]) == ("seed", "temperature")
        assert gw.mock.stats.calls == 1


# --- 5: every token class priced ----------------------------------------------------------------


async def test_anthropic_cache_writes_and_reads_are_priced_apart(
    settings: Settings, mock: MockProvider
) -> None:
    system = [{"type": "text", "text": LONG, "cache_control": {"type": "ephemeral"}}]
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Hi"}]
    async with open_router(catalog(mock.url), ENV, settings) as router:
        first = await router.complete(chat("claude", messages=messages))
        second = await router.complete(chat("claude", messages=messages))

    sent = mock.requests[0].body
    assert sent is not None and sent["system"] == system  # the marker reached Anthropic
    written = first.cache_write_tokens
    assert written > 1024 and first.cached_tokens == 0
    assert second.cached_tokens == written and second.cache_write_tokens == 0
    assert first.input_tokens == second.input_tokens
    plain = first.input_tokens - written
    per = Decimal(1_000_000)
    assert (
        first.cost_usd
        == (plain * Decimal(3) + written * Decimal("3.75") + first.output_tokens * Decimal(15))
        / per
    )
    assert (
        second.cost_usd
        == (plain * Decimal(3) + written * Decimal("0.30") + second.output_tokens * Decimal(15))
        / per
    )
    usage = second.response["usage"]
    assert usage["prompt_tokens"] == second.input_tokens
    assert usage["prompt_tokens_details"]["cached_tokens"] == written


async def test_one_hour_cache_writes_have_their_own_price(
    settings: Settings, mock: MockProvider
) -> None:
    marker = {"type": "ephemeral", "ttl": "1h"}
    content = [{"type": "text", "text": LONG, "cache_control": marker}]
    async with open_router(catalog(mock.url), ENV, settings) as router:
        routed = await router.complete(
            chat("claude", messages=[{"role": "user", "content": content}])
        )

    written = routed.cache_write_tokens
    assert written > 1024
    plain = routed.input_tokens - written
    assert routed.cost_usd == (
        plain * Decimal(3) + written * Decimal(6) + routed.output_tokens * Decimal(15)
    ) / Decimal(1_000_000)


async def test_openai_cached_input_is_priced_at_its_own_price(
    settings: Settings, mock: MockProvider
) -> None:
    def job(question: str) -> ChatJob:
        return chat(
            "gpt",
            messages=[{"role": "system", "content": LONG}, {"role": "user", "content": question}],
        )

    async with open_router(catalog(mock.url), ENV, settings) as router:
        first = await router.complete(job("First?"))
        second = await router.complete(job("Second?"))

    assert first.cached_tokens == 0
    cached = second.cached_tokens
    assert cached > 1024
    assert second.cost_usd == (
        (second.input_tokens - cached) * Decimal(2)
        + cached * Decimal("0.5")
        + second.output_tokens * Decimal(8)
    ) / Decimal(1_000_000)


@pytest.mark.parametrize("alias", ["gpt", "claude"])
async def test_a_stream_broken_after_text_is_billed_for_what_was_received(
    settings: Settings, alias: str
) -> None:
    # Given a provider that cuts every stream after a few events (text already sent)
    cut = Behavior(stream_cut_after=4)
    faults = MockConfig(models={"gpt-model": cut, "claude-model": cut})
    received: list[Delta] = []

    async def sink(piece: Piece, model: str, alias: str) -> None:
        received.append(piece.delta)

    async with (
        MockProvider(faults) as mock,
        open_router(catalog(mock.url), ENV, settings) as router,
    ):
        with pytest.raises(StreamInterrupted) as caught:
            await router.complete(chat(alias, "Tell me a long story", stream=True), on_delta=sink)

    text = "".join(delta.get("content") or "" for delta in received)
    billed = caught.value.billed
    assert text and billed is not None
    assert billed.estimated  # neither provider sends the output count before the end
    assert billed.output_tokens == -(-len(text) // 4)
    assert billed.input_tokens > 0
    assert billed.cost_usd > 0
    assert billed.deployment == f"{alias}-dep"


async def test_a_marked_prompt_of_a_stream_broken_before_its_counts_is_billed_as_written(
    settings: Settings,
) -> None:
    # Given an OpenAI-format provider that cuts every stream after a few events, before the
    # chunk with its counts, and a job marking its prompt for a cache
    faults = MockConfig(models={"gpt-model": Behavior(stream_cut_after=4)})
    system = [{"type": "text", "text": LONG, "cache_control": {"type": "ephemeral"}}]
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Go on"}]

    async def sink(piece: Piece, model: str, alias: str) -> None:
        pass  # relayed: a stream broken once its caller has text is not tried again

    async with (
        MockProvider(faults) as mock,
        open_router(catalog(mock.url), ENV, settings) as router,
    ):
        with pytest.raises(StreamInterrupted) as caught:
            await router.complete(chat("gpt", stream=True, messages=messages), on_delta=sink)

    # Expect its prompt estimated as written to the cache, as every other estimate of a call
    # prices a marked prompt (before: as plain input, none of it written)
    billed = caught.value.billed
    assert billed is not None and billed.estimated and billed.input_tokens > 0
    assert billed.cache_write_tokens == billed.input_tokens


async def test_a_legacy_function_call_answered_without_counts_bills_its_call_as_output(
    settings: Settings,
) -> None:
    # Given an OpenAI-compatible server answering a legacy function_call, with no usage
    arguments = json.dumps({"city": "Paris", "days": 3, "notes": "x" * 400})
    message = {
        "role": "assistant",
        "content": None,
        "function_call": {"name": "weather", "arguments": arguments},
    }
    answer = {
        "id": "c",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "message": message, "finish_reason": "function_call"}],
    }

    async def answered(request: web.Request) -> web.Response:
        return web.json_response(answer)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answered)
    async with serving(app) as url:
        entries = {"m": {"deployments": [mock_deployment("d", "m", url)]}}
        async with open_router(
            Catalog.model_validate({"models": entries}), ENV, settings
        ) as router:
            routed = await router.complete(chat("m"))

    # Expect its output estimated from the call it made (before: from no text, 0 tokens)
    assert routed.estimated
    assert routed.output_tokens == -(-(len("weather") + len(arguments)) // 4)


UNREADABLE_USAGE: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # name: (an OpenAI wire's usage, an Anthropic wire's), each no counts to bill by
    "none": ({}, {}),
    "negative": (
        {"prompt_tokens": -1_000_000, "completion_tokens": -5_000_000, "total_tokens": -6_000_000},
        {"input_tokens": -1_000_000, "output_tokens": -5_000_000},
    ),
    "huge": (
        {"prompt_tokens": 10**15, "completion_tokens": 10**15, "total_tokens": 2 * 10**15},
        {"input_tokens": 10**15, "output_tokens": 10**15},
    ),
    "not whole numbers": (
        {"prompt_tokens": "5", "completion_tokens": 1.5e3},
        {"input_tokens": "5", "output_tokens": 1.5e3},
    ),
}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("alias", ["gpt", "claude"])
@pytest.mark.parametrize("reported", list(UNREADABLE_USAGE))
async def test_an_answer_without_counts_to_bill_by_is_billed_by_its_text(
    settings: Settings, alias: str, reported: str, stream: bool
) -> None:
    # Given a provider whose answers report no counts, or none a count can be (before: a
    # negative count paid the team back, 10^15 overflowed usage_log, none was free)
    openai, anthropic = UNREADABLE_USAGE[reported]
    faults = MockConfig(
        models={"gpt-model": Behavior(usage=openai), "claude-model": Behavior(usage=anthropic)}
    )
    prompt = "Tell me a long story"

    async def sink(piece: Piece, model: str, alias: str) -> None:
        pass

    async with (
        MockProvider(faults) as mock,
        open_router(catalog(mock.url), ENV, settings) as router,
    ):
        routed = await router.complete(chat(alias, prompt, stream=stream), on_delta=sink)

    text = routed.response["choices"][0]["message"]["content"]
    assert routed.estimated
    assert routed.input_tokens == -(-len(prompt) // 4)
    assert routed.output_tokens == -(-len(text) // 4)
    assert Decimal(0) < routed.cost_usd < Decimal("0.001")
    # The answer says what it is billed by, not the provider's counts
    usage = routed.response["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (
        routed.input_tokens,
        routed.output_tokens,
    )
    assert "usage" not in routed.response.get(ANTHROPIC_BODY, {})


@pytest.mark.parametrize("written", ["2500", 2500.0, -1, 10**10])
async def test_an_unreadable_cache_count_is_billed_as_the_marked_prompt_written(
    settings: Settings, written: object
) -> None:
    # Given an answer whose cache write count is no count, to a prompt marked for an hour
    # (before: taken as no write, the write free)
    usage = {"input_tokens": 3, "output_tokens": 5, "cache_creation_input_tokens": written}
    faults = MockConfig(models={"claude-model": Behavior(usage=usage)})
    marked = {"type": "ephemeral", "ttl": "1h"}
    system = [{"type": "text", "text": LONG, "cache_control": marked}]
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Hi"}]
    async with (
        MockProvider(faults) as mock,
        open_router(catalog(mock.url), ENV, settings) as router,
    ):
        routed = await router.complete(chat("claude", messages=messages))

    # Expect it counted from the text, the prompt billed as written to the cache for an hour
    assert routed.estimated
    assert routed.cache_write_tokens == routed.input_tokens > 1000
    per = Decimal(1_000_000)
    assert (
        routed.cost_usd
        == (routed.input_tokens * Decimal(6) + routed.output_tokens * Decimal(15)) / per
    )


def _nested(levels: int) -> Any:
    deep: Any = []
    for _ in range(levels):
        deep = [deep]
    return deep


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_an_answer_nested_past_a_jobs_depth_is_a_bad_response(
    settings: Settings, stream: bool
) -> None:
    # Given answers nesting 150 levels deep, past the bound of a job (pydantic writes 200)
    # (before: the worker failed writing it, and the job looped in its queue unanswered)
    usage = {"prompt_tokens": 5, "completion_tokens": 5, "x": _nested(150)}
    faults = MockConfig(models={"gpt-model": Behavior(usage=usage)})
    received: list[Delta] = []

    async def sink(piece: Piece, model: str, alias: str) -> None:
        received.append(piece.delta)

    async with (
        MockProvider(faults) as mock,
        open_router(catalog(mock.url), ENV, settings) as router,
    ):
        with pytest.raises((AllProvidersFailed, StreamInterrupted)) as caught:
            await router.complete(chat("gpt", "Tell me", stream=stream), on_delta=sink)

    # Expect a bad response: a whole one fails the call, a stream that sent text is billed
    assert "the answer nests deeper than 100 levels" in str(caught.value)
    if stream:
        assert isinstance(caught.value, StreamInterrupted) and received
        billed = caught.value.billed
        assert billed is not None and billed.cost_usd > 0
    else:
        assert isinstance(caught.value, AllProvidersFailed)


async def test_a_job_answered_nested_too_deep_is_answered_once_not_looped(
    settings: Settings,
) -> None:
    # Given a provider whose answers nest past a job's bound, and a job with no fallback
    usage = {"prompt_tokens": 5, "completion_tokens": 5, "x": _nested(150)}
    faults = MockConfig(models={"gpt-4o-mini": Behavior(usage=usage)})
    async with running_gateway(settings, mock_config=faults) as gw, gw.client("alpha") as client:
        job = client.job("gpt-4o-mini", [{"role": "user", "content": "Hi"}], fallbacks=[])
        result = await (await client.submit(job)).result(10)

        # Then it is answered an error at once, with one row (before, at 250 levels: the
        # worker failed writing it and the job went round its queue for good)
        assert result.status == "error" and result.error is not None
        assert "nests deeper than 100 levels" in result.error.message
        [row] = await gw.usage_rows(1)
        assert row["status"] == "error"
        # ... billed at its estimate, as a call timed out once sent is: the provider answered
        # 200, and bills it (before: free)
        assert result.gateway.cost_usd > 0, result.gateway.attempts
        assert Decimal(row["cost_usd"]) == result.gateway.cost_usd


async def test_a_job_answered_no_answer_has_the_tokens_its_estimate_bills_on_its_row(
    settings: Settings,
) -> None:
    # Given a provider whose answers nest past a job's bound, and a job with no fallback
    usage = {"prompt_tokens": 5, "completion_tokens": 5, "x": _nested(150)}
    faults = MockConfig(models={"gpt-4o-mini": Behavior(usage=usage)})
    async with running_gateway(settings, mock_config=faults) as gw, gw.client("alpha") as client:
        messages = [{"role": "user", "content": "Tell me a story"}]
        job = client.job("gpt-4o-mini", messages, fallbacks=[], max_tokens=40)
        result = await (await client.submit(job)).result(10)

        # Then its row carries the tokens its estimate is billed by, marked estimated
        # (before: 0 input and 0 output tokens at a cost above 0, which reports summed)
        assert result.status == "error"
        [row] = await gw.usage_rows(1)
        assert (row["input_tokens"], row["output_tokens"]) == (prompt_tokens(job), 40)
        assert row["tokens_estimated"] is True and result.gateway.tokens_estimated is True
        per = Decimal(1_000_000)
        priced = (row["input_tokens"] * Decimal("0.15") + 40 * Decimal("0.60")) / per
        assert Decimal(row["cost_usd"]) == priced == result.gateway.cost_usd


PARTLY_UNREADABLE = {
    "gpt-4o-mini": {
        "prompt_tokens": 5,
        "completion_tokens": 6,
        "total_tokens": 99,
        "prompt_tokens_details": {"cached_tokens": 50, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": "3", "accepted_prediction_tokens": 0},
    },
    "claude-haiku": {
        "input_tokens": 3,
        "output_tokens": 6,
        "cache_read_input_tokens": 0,
        "cache_creation_input_tokens": 100,
        "cache_creation": {"ephemeral_5m_input_tokens": 40, "ephemeral_1h_input_tokens": 500},
        "service_tier": "standard",
    },
}
"""Usage a count of which is clamped or no count: the cached tokens past the prompt, a
reasoning count as text, a total that is no sum, a one-hour cache write past the write."""


@pytest.mark.parametrize("alias", list(PARTLY_UNREADABLE))
async def test_an_answers_usage_says_the_counts_its_row_bills(
    settings: Settings, alias: str
) -> None:
    # Given a provider answering with counts that are clamped or no count, and valid details
    deployment = {"gpt-4o-mini": "gpt-4o-mini", "claude-haiku": "claude-3-5-haiku-latest"}
    faults = MockConfig(models={deployment[alias]: Behavior(usage=PARTLY_UNREADABLE[alias])})
    async with running_gateway(settings, mock_config=faults) as gw, gw.client("alpha") as client:
        job = client.job(alias, [{"role": "user", "content": "Tell me"}], fallbacks=[])
        result = await (await client.submit(job)).result(10)
        [row] = await gw.usage_rows(1)

    # Then the answer's usage says what its row bills, the provider's valid details kept
    # (before: the provider's counts as sent, a total of 99 and 50 cached of 5 prompt tokens)
    assert result.status == "ok" and result.response is not None
    usage = result.response["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (
        row["input_tokens"],
        row["output_tokens"],
        row["input_tokens"] + row["output_tokens"],
    )
    prompt = usage["prompt_tokens_details"]
    assert prompt["cached_tokens"] == row["cached_tokens"]
    assert prompt.get("cache_write_tokens", 0) == row["cache_write_tokens"]
    reasoning = usage.get("completion_tokens_details", {}).get("reasoning_tokens", 0)
    assert reasoning == row["reasoning_tokens"]
    if alias == "gpt-4o-mini":
        assert row["cached_tokens"] == 5 and row["reasoning_tokens"] == 0
        assert prompt["audio_tokens"] == 0
        assert usage["completion_tokens_details"]["accepted_prediction_tokens"] == 0


async def test_an_anthropic_answers_own_usage_says_the_counts_it_is_billed_by(
    settings: Settings,
) -> None:
    # Given an Anthropic answer whose one-hour cache write is past its whole write
    usage = PARTLY_UNREADABLE["claude-haiku"]
    faults = MockConfig(models={"claude-model": Behavior(usage=usage)})
    async with (
        MockProvider(faults) as mock,
        open_router(catalog(mock.url), ENV, settings) as router,
    ):
        routed = await router.complete(chat("claude"))

    # Then the Messages API answer its caller gets says the write billed, split as priced
    # (before: 40 written for five minutes and 500 for an hour, of a write of 100)
    native = anthropic_message(routed.response, "msg_1")["usage"]
    assert routed.cache_write_tokens == native["cache_creation_input_tokens"] == 100
    assert native["cache_creation"] == {
        "ephemeral_5m_input_tokens": 0,
        "ephemeral_1h_input_tokens": 100,
    }
    assert (native["input_tokens"], native["output_tokens"]) == (3, routed.output_tokens)
    assert native["service_tier"] == "standard"


async def test_a_cut_anthropic_stream_keeps_the_cache_write_its_start_reported(
    settings: Settings,
) -> None:
    # Given a stream whose message_start reports a cache write, cut after some text
    system = [{"type": "text", "text": LONG, "cache_control": {"type": "ephemeral"}}]
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Tell me"}]
    faults = MockConfig(models={"claude-model": Behavior(stream_cut_after=4)})

    async def sink(piece: Piece, model: str, alias: str) -> None:
        pass

    async with (
        MockProvider(faults) as mock,
        open_router(catalog(mock.url), ENV, settings) as router,
    ):
        with pytest.raises(StreamInterrupted) as caught:
            await router.complete(chat("claude", messages=messages, stream=True), on_delta=sink)

    billed = caught.value.billed
    assert billed is not None
    # recorded as it is priced (before: priced as a write, recorded as none)
    assert billed.cache_write_tokens > 1024


MARKS = [
    ({"type": "ephemeral"}, Decimal("1.00")),
    ({"type": "ephemeral", "ttl": "5m"}, Decimal("1.00")),
    ({"type": "ephemeral", "ttl": "1h"}, Decimal("1.60")),
]
"""Cache marks and the price (claude-haiku's, in the bundled catalog) of a prompt token
each writes: five minutes' write, or an hour's."""


@pytest.mark.parametrize(("mark", "written"), MARKS, ids=["ephemeral", "5m", "1h"])
async def test_an_anthropic_stream_cut_after_its_start_is_billed_once_beside_its_fallback(
    settings: Settings, tmp_path: Path, mark: dict[str, str], written: Decimal
) -> None:
    # Given Anthropic streams cut after message_start, which reports the prompt written to
    # its cache for as long as the job's mark says, and a fallback that answers
    text = resources.files("router").joinpath("catalogs/mock.yaml").read_text("utf-8")
    text = text.replace("  claude-haiku:\n", "  claude-haiku:\n    fallbacks: [local-llama]\n")
    path = tmp_path / "catalog.yaml"
    path.write_text(text)
    faults = MockConfig(models={"claude-3-5-haiku-latest": Behavior(stream_cut_after=1)})
    system = [{"type": "text", "text": LONG, "cache_control": mark}]
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Tell me"}]
    async with (
        running_gateway(settings, mock_config=faults, catalog=path) as gw,
        gw.client("alpha") as client,
    ):
        job = client.job("claude-haiku", messages, stream=True, max_tokens=50)
        result = await (await client.submit(job)).result(10)
        [row] = await gw.usage_rows(1)

    # Then each cut call is billed once, at its estimate (the prompt priced as a cache
    # write for the mark's time), and the fallback by its own counts (before: the cut calls
    # were free; then a five-minute mark was priced as an hour's write)
    assert result.status == "ok" and result.gateway.model_used == "local-llama"
    *cut, served = result.gateway.attempts
    assert cut and all(a.deployment == "anthropic-main" for a in cut)
    assert served.deployment == "local-vllm" and result.response is not None
    answered = result.response["usage"]
    per = Decimal(1_000_000)
    estimate = (prompt_tokens(job) * written + 50 * Decimal("4.00")) / per
    own = (
        answered["prompt_tokens"] * Decimal("0.05")
        + answered["completion_tokens"] * Decimal("0.08")
    ) / per
    assert Decimal(row["cost_usd"]) == result.gateway.cost_usd == own + len(cut) * estimate
    # ... their prompts on its row as written to the cache, as they are priced
    assert row["cache_write_tokens"] == len(cut) * prompt_tokens(job)


async def test_a_plain_answer_cut_mid_body_is_billed_once_beside_its_fallback(
    settings: Settings,
) -> None:
    # Given a provider whose plain answers send their 200 headers, then drop the connection
    # mid-body (the provider has done the work), and a fallback that answers
    faults = MockConfig(models={"gpt-4o-mini": Behavior(body_cut_after=10)})
    async with running_gateway(settings, mock_config=faults) as gw, gw.client("alpha") as client:
        job = client.job("gpt-4o-mini", [{"role": "user", "content": "Tell me"}], max_tokens=40)
        result = await (await client.submit(job)).result(10)
        [row] = await gw.usage_rows(1)

    # Then each cut call is recorded with its 200 and billed once, at its estimate, and the
    # fallback by its own counts (before: a connection error with no status, free)
    assert result.status == "ok" and result.gateway.model_used == "claude-haiku"
    assert result.response is not None
    *cut, served = result.gateway.attempts
    assert cut and all(
        (a.deployment, a.status, a.error) == ("openai-main", 200, "connection") for a in cut
    )
    assert served.deployment == "anthropic-main"
    answered = result.response["usage"]
    per = Decimal(1_000_000)
    estimate = (prompt_tokens(job) * Decimal("0.15") + 40 * Decimal("0.60")) / per
    own = (
        answered["prompt_tokens"] * Decimal("0.80")
        + answered["completion_tokens"] * Decimal("4.00")
    ) / per
    assert Decimal(row["cost_usd"]) == result.gateway.cost_usd == own + len(cut) * estimate
    # ... with their estimated tokens on its row beside the fallback's, as a job failed after
    # them has: its tokens are what its cost bills (before: the fallback's alone)
    assert (row["input_tokens"], row["output_tokens"]) == (
        answered["prompt_tokens"] + len(cut) * prompt_tokens(job),
        answered["completion_tokens"] + len(cut) * 40,
    )
    assert row["tokens_estimated"] is True and result.gateway.tokens_estimated is True


@pytest.mark.parametrize(("mark", "written"), MARKS[1:], ids=["5m", "1h"])
async def test_a_job_failed_after_a_cut_answer_bills_its_prompt_at_its_marks_write_price(
    settings: Settings, mark: dict[str, str], written: Decimal
) -> None:
    # Given an Anthropic job marking its prompt for a cache, with no fallback, whose plain
    # answers are cut mid-body after their 200 head
    faults = MockConfig(models={"claude-3-5-haiku-latest": Behavior(body_cut_after=10)})
    system = [{"type": "text", "text": LONG, "cache_control": mark}]
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Tell me"}]
    async with running_gateway(settings, mock_config=faults) as gw, gw.client("alpha") as client:
        job = client.job("claude-haiku", messages, fallbacks=[], max_tokens=50)
        result = await (await client.submit(job)).result(10)
        [row] = await gw.usage_rows(1)

    # Then each cut call is billed at its estimate, the prompt as written to the cache at
    # the mark's own price (before: an hour's, 1.60, for a five-minute mark too)
    assert result.status == "error"
    cut = result.gateway.attempts
    assert cut and all((a.status, a.error) == (200, "connection") for a in cut)
    prompt = prompt_tokens(job)
    assert (row["input_tokens"], row["output_tokens"]) == (len(cut) * prompt, len(cut) * 50)
    assert row["cache_write_tokens"] == row["input_tokens"]
    per = Decimal(1_000_000)
    estimate = (prompt * written + 50 * Decimal("4.00")) / per
    assert Decimal(row["cost_usd"]) == result.gateway.cost_usd == len(cut) * estimate


@pytest.mark.parametrize(
    ("error", "error_class"), [("overloaded_error", "overloaded"), ("timeout_error", "timeout")]
)
async def test_an_error_event_in_a_stream_is_recorded_with_its_200_and_not_billed(
    settings: Settings, tmp_path: Path, error: str, error_class: str
) -> None:
    # Given Anthropic streams that report a failure in an error event after message_start
    # (a failed request, which Anthropic does not charge), and a fallback that answers
    text = resources.files("router").joinpath("catalogs/mock.yaml").read_text("utf-8")
    text = text.replace("  claude-haiku:\n", "  claude-haiku:\n    fallbacks: [local-llama]\n")
    path = tmp_path / "catalog.yaml"
    path.write_text(text)
    failed = Behavior(stream_cut_after=1, stream_error={"type": error, "message": "Failed"})
    faults = MockConfig(models={"claude-3-5-haiku-latest": failed})
    async with (
        running_gateway(settings, mock_config=faults, catalog=path) as gw,
        gw.client("alpha") as client,
    ):
        messages = [{"role": "user", "content": "Tell me"}]
        job = client.job("claude-haiku", messages, stream=True, max_tokens=50)
        result = await (await client.submit(job)).result(10)
        [row] = await gw.usage_rows(1)

    # Then each failed call is recorded with the 200 it came with, and only the fallback is
    # billed (before: a timeout_error was billed at its estimate, as a call timed out is)
    assert result.status == "ok" and result.gateway.model_used == "local-llama"
    *failures, served = result.gateway.attempts
    assert failures and all((a.status, a.error) == (200, error_class) for a in failures)
    assert served.deployment == "local-vllm"
    per = Decimal(1_000_000)
    own = (row["input_tokens"] * Decimal("0.05") + row["output_tokens"] * Decimal("0.08")) / per
    assert Decimal(row["cost_usd"]) == result.gateway.cost_usd == own


async def test_a_stream_an_error_event_ends_after_its_text_is_billed_once_by_what_came(
    settings: Settings,
) -> None:
    # Given an Anthropic stream that reports a timeout_error after some text
    error = {"type": "timeout_error", "message": "Timed out"}
    faults = MockConfig(
        models={"claude-3-5-haiku-latest": Behavior(stream_cut_after=4, stream_error=error)}
    )
    async with running_gateway(settings, mock_config=faults) as gw, gw.client("alpha") as client:
        messages = [{"role": "user", "content": "Tell me a story"}]
        job = client.job("claude-haiku", messages, stream=True, max_tokens=50)
        result = await (await client.submit(job)).result(10)
        [row] = await gw.usage_rows(1)

    # Then its one call is billed by what the provider generated until then, not at its
    # estimate besides
    assert result.status == "error"
    [failed] = result.gateway.attempts
    assert (failed.status, failed.error) == (200, "timeout")
    per = Decimal(1_000_000)
    own = (row["input_tokens"] * Decimal("0.80") + row["output_tokens"] * Decimal("4.00")) / per
    assert row["output_tokens"] > 0
    assert Decimal(row["cost_usd"]) == result.gateway.cost_usd == own


async def test_a_job_answered_with_negative_counts_is_billed_once_by_its_text(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given a team with a budget and a provider answering with negative counts
    await register(settings, "alpha", TeamConfig(budget_usd=Decimal(10)))
    negative = {"prompt_tokens": -1_000_000, "completion_tokens": -5_000_000}
    faults = MockConfig(models={"gpt-4o-mini": Behavior(usage=negative)})
    async with running_gateway(settings, mock_config=faults) as gw, gw.client("alpha") as client:
        job = client.job("gpt-4o-mini", [{"role": "user", "content": "Tell me more"}])
        result = await (await client.submit(job)).result(10)

        # Then it is answered ok, billed by its text, on one row and in the budget
        assert result.status == "ok" and result.response is not None
        assert result.gateway.tokens_estimated is True
        assert result.gateway.cost_usd > 0
        assert result.response["usage"]["prompt_tokens"] > 0
        [row] = await gw.usage_rows(1)
        assert row["input_tokens"] > 0 and row["output_tokens"] > 0
        assert Decimal(row["cost_usd"]) == result.gateway.cost_usd
        assert row["tokens_estimated"] is True
        month = datetime.now(UTC).strftime("%Y-%m")
        spent = await ledger_spent(redis_client, Keys(settings.redis_prefix), "alpha", month)
        assert spent == result.gateway.cost_usd
        assert gw.mock.stats.calls == 1


CLAIMED = 10_000_000
"""Output tokens a lying provider claims for a job of ``max_tokens`` 50: $20 or more."""
DEPLOYED = {"gpt-4o-mini": "gpt-4o-mini", "claude-haiku": "claude-3-5-haiku-latest"}
PRICES = {"gpt-4o-mini": ("0.15", "0.60"), "claude-haiku": ("0.80", "4.00")}


def _usage_of(alias: str, prompt: int, output: int) -> dict[str, Any]:
    if alias == "gpt-4o-mini":
        return {"prompt_tokens": prompt, "completion_tokens": output}
    return {"input_tokens": prompt, "output_tokens": output}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("alias", list(DEPLOYED))
async def test_an_output_count_past_the_jobs_max_tokens_is_billed_at_it(
    settings: Settings, alias: str, stream: bool
) -> None:
    # Given a provider claiming 10^7 output tokens for a job of max_tokens 50 (before: billed
    # as sent, $20 on a $1 budget, where admission had reserved $0.000118)
    faults = MockConfig(models={DEPLOYED[alias]: Behavior(usage=_usage_of(alias, 15, CLAIMED))})
    async with running_gateway(settings, mock_config=faults) as gw, gw.client("alpha") as client:
        messages = [{"role": "user", "content": "Tell me a story"}]
        job = client.job(alias, messages, fallbacks=[], stream=stream, max_tokens=50)
        result = await (await client.submit(job)).result(10)
        [row] = await gw.usage_rows(1)

    # Then its output is billed at the 50 the provider cannot have passed, marked estimated
    assert result.status == "ok" and result.response is not None
    assert (row["input_tokens"], row["output_tokens"]) == (15, 50)
    assert row["tokens_estimated"] is True and result.gateway.tokens_estimated is True
    per, (input_price, output_price) = Decimal(1_000_000), PRICES[alias]
    priced = (15 * Decimal(input_price) + 50 * Decimal(output_price)) / per
    assert Decimal(row["cost_usd"]) == result.gateway.cost_usd == priced
    # ... and its answer says the counts billed, as its row holds them
    usage = result.response["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (
        15,
        50,
        65,
    )
    if alias == "claude-haiku":
        native = anthropic_message(result.response, "msg_1")["usage"]
        assert (native["input_tokens"], native["output_tokens"]) == (15, 50)


@pytest.mark.parametrize(("alias", "n"), [("gpt-4o-mini", 2), ("claude-haiku", 1)])
async def test_an_output_count_at_the_jobs_max_tokens_is_believed(
    settings: Settings, alias: str, n: int
) -> None:
    # Given a provider answering a job of max_tokens 50 with all of it, for each choice
    bound = 50 * n
    faults = MockConfig(models={DEPLOYED[alias]: Behavior(usage=_usage_of(alias, 15, bound))})
    async with running_gateway(settings, mock_config=faults) as gw, gw.client("alpha") as client:
        messages = [{"role": "user", "content": "Tell me a story"}]
        job = client.job(alias, messages, fallbacks=[], max_tokens=50, n=n)
        result = await (await client.submit(job)).result(10)
        [row] = await gw.usage_rows(1)

    # Then its counts are believed as sent
    assert result.status == "ok" and result.response is not None
    assert (row["input_tokens"], row["output_tokens"]) == (15, bound)
    assert not row["tokens_estimated"] and not result.gateway.tokens_estimated
    assert result.response["usage"]["completion_tokens"] == bound


async def test_an_anthropic_output_count_is_believed_up_to_the_max_tokens_sent_for_a_job(
    settings: Settings,
) -> None:
    # Given a job that sets no max_tokens, sent to Anthropic with the adapter's, and a
    # provider claiming 10^9 input and 10^9 output tokens (before: $3000 and more)
    usage = {"input_tokens": 15, "output_tokens": 10**9}
    faults = MockConfig(models={"claude-model": Behavior(usage=usage)})
    async with (
        MockProvider(faults) as mock,
        open_router(catalog(mock.url), ENV, settings) as router,
    ):
        routed = await router.complete(chat("claude"))

    # Then its output is billed at the max_tokens the request carried
    assert routed.estimated
    assert (routed.input_tokens, routed.output_tokens) == (15, DEFAULT_MAX_TOKENS)
    assert routed.cost_usd == (15 * Decimal(3) + DEFAULT_MAX_TOKENS * Decimal(15)) / 10**6


async def test_a_stream_cut_after_its_output_count_is_billed_within_max_tokens(
    settings: Settings,
) -> None:
    # Given an Anthropic stream whose message_delta claims 10^7 output tokens, then cut
    # before its message_stop (before: its claim billed as sent)
    prompt = "Tell me a story"
    texts: list[str] = []

    async def sink(piece: Piece, model: str, alias: str) -> None:
        if piece.delta.get("content"):
            texts.append(piece.delta["content"])

    async with MockProvider() as mock, open_router(catalog(mock.url), ENV, settings) as router:
        await router.complete(
            chat("claude", prompt, stream=True, params={"max_tokens": 50}), on_delta=sink
        )
    # message_start, its block's start, a ping, its deltas, its stop, then message_delta
    cut = 3 + len(texts) + 2
    usage = {"input_tokens": 15, "output_tokens": CLAIMED}
    faults = MockConfig(models={"claude-model": Behavior(usage=usage, stream_cut_after=cut)})
    async with (
        MockProvider(faults) as mock,
        open_router(catalog(mock.url), ENV, settings) as router,
    ):
        with pytest.raises(StreamInterrupted) as caught:
            job = chat("claude", prompt, stream=True, params={"max_tokens": 50})
            await router.complete(job, on_delta=sink)

    # Then it is billed at its max_tokens, marked estimated
    billed = caught.value.billed
    assert billed is not None and billed.estimated
    assert (billed.input_tokens, billed.output_tokens) == (15, 50)


async def test_a_broken_stream_is_accounted_on_the_usage_row_and_the_budget(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given a team with a budget, and a provider that cuts its stream after some text
    await register(settings, "alpha", TeamConfig(budget_usd=Decimal(10)))
    faults = MockConfig(models={"gpt-4o-mini": Behavior(stream_cut_after=4)})
    async with running_gateway(settings, mock_config=faults) as gw, gw.client("alpha") as client:
        job = client.job("gpt-4o-mini", [{"role": "user", "content": "Tell me more"}], stream=True)
        handle = await client.submit(job)
        result = await handle.result(10)

        assert result.status == "error" and result.error is not None
        assert result.gateway.cost_usd > 0
        assert result.gateway.tokens_estimated is True
        [row] = await gw.usage_rows(1)
        assert row["output_tokens"] > 0 and Decimal(row["cost_usd"]) == result.gateway.cost_usd
        assert row["tokens_estimated"] is True
        assert row["deployment"] == "openai-main"
        # ... and the team's budget charged the same, not refunded
        month = datetime.now(UTC).strftime("%Y-%m")
        spent = await ledger_spent(redis_client, Keys(settings.redis_prefix), "alpha", month)
        assert spent == result.gateway.cost_usd


# --- 6: prompt caching and reasoning carried both ways ------------------------------------------


async def test_cache_control_on_tools_and_messages_reaches_anthropic(
    settings: Settings, mock: MockProvider
) -> None:
    marker = {"type": "ephemeral"}
    tool = {
        "type": "function",
        "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}},
        "cache_control": marker,
    }
    messages = [{"role": "user", "content": "Look it up", "cache_control": marker}]
    async with open_router(catalog(mock.url), ENV, settings) as router:
        await router.complete(chat("claude", messages=messages, params={"tools": [tool]}))
        await router.complete(chat("gpt", messages=messages, params={"tools": [tool]}))

    anthropic, openai = mock.requests
    assert anthropic.body is not None and anthropic.body["tools"][0]["cache_control"] == marker
    assert anthropic.body["messages"][0]["content"] == [
        {"type": "text", "text": "Look it up", "cache_control": marker}
    ]
    # OpenAI caches by itself and refuses the marker: it is left out
    assert openai.status == 200


@pytest.mark.parametrize("effort", ["low", "high"])
async def test_reasoning_effort_becomes_a_thinking_budget_and_thinking_comes_back(
    settings: Settings, mock: MockProvider, effort: str
) -> None:
    async with open_router(catalog(mock.url), ENV, settings) as router:
        routed = await router.complete(chat("claude", params={"reasoning_effort": effort}))

    [call] = mock.requests
    budget = THINKING_BUDGETS[effort]
    assert call.body is not None
    assert call.body["thinking"] == {"type": "enabled", "budget_tokens": budget}
    assert call.body["max_tokens"] == budget + DEFAULT_MAX_TOKENS
    message = routed.response["choices"][0]["message"]
    assert message["reasoning_content"] == "mock thinking about: Hello there"
    assert message["content"] == "mock reply to: Hello there"
    assert routed.reasoning_tokens == 5
    assert routed.response["usage"]["completion_tokens_details"] == {"reasoning_tokens": 5}


async def test_thinking_within_max_tokens_and_anthropic_rules_or_refused(
    settings: Settings, mock: MockProvider
) -> None:
    async with open_router(catalog(mock.url), ENV, settings) as router:
        bounded = await router.complete(
            chat("claude", params={"reasoning_effort": "high", "max_tokens": 4000})
        )
        with pytest.raises(InvalidRequest) as too_small:
            await router.complete(
                chat("claude", params={"reasoning_effort": "low", "max_tokens": 1000})
            )
        with pytest.raises(InvalidRequest) as hot:
            await router.complete(
                chat("claude", params={"reasoning_effort": "low", "temperature": 0.2})
            )
        cooled = await router.complete(
            chat(
                "claude",
                params={"reasoning_effort": "low", "temperature": 0.2},
                unsupported_params="drop",
            )
        )

    first, last = mock.requests
    assert first.body is not None and first.body["max_tokens"] == 4000
    assert first.body["thinking"]["budget_tokens"] == 3999
    assert "reasoning_effort" in too_small.value.message
    assert "temperature" in hot.value.message
    assert last.body is not None and "temperature" not in last.body
    assert cooled.params_changed == ("temperature",)
    assert bounded.reasoning_tokens > 0


@pytest.mark.parametrize("effort", ["low", "max"])
async def test_reasoning_effort_beside_adaptive_thinking_becomes_its_output_effort(
    settings: Settings, mock: MockProvider, effort: str
) -> None:
    params = {"reasoning_effort": effort, "thinking": {"type": "adaptive"}}
    async with open_router(catalog(mock.url), ENV, settings) as router:
        # When a job thinking adaptively asks for an effort
        routed = await router.complete(chat("claude", params=params))

    # Expect it sent as Anthropic sets the effort of adaptive thinking (no budget to set),
    # neither refused nor dropped, and the thinking back
    [call] = mock.requests
    assert call.status == 200
    assert call.body is not None
    assert call.body["thinking"] == {"type": "adaptive"}
    assert call.body["output_config"] == {"effort": effort}
    assert call.body["max_tokens"] == DEFAULT_MAX_TOKENS
    assert (routed.params_dropped, routed.params_changed) == ((), ())
    message = routed.response["choices"][0]["message"]
    assert message["reasoning_content"] == "mock thinking about: Hello there"


async def test_a_minimal_effort_beside_adaptive_thinking_is_refused_or_sent_as_low(
    settings: Settings, mock: MockProvider
) -> None:
    params = {"reasoning_effort": "minimal", "thinking": {"type": "adaptive"}}
    async with open_router(catalog(mock.url), ENV, settings) as router:
        # When a job thinking adaptively asks for minimal effort, below Anthropic's lowest
        with pytest.raises(InvalidRequest) as refused:
            await router.complete(chat("claude", params=params))
        # and again under drop
        lowered = await router.complete(chat("claude", params=params, unsupported_params="drop"))

    # Expect it refused by name, uncalled; under drop sent as low, listed as changed
    assert "reasoning_effort" in refused.value.message
    [call] = mock.requests
    assert call.body is not None and call.body["output_config"] == {"effort": "low"}
    assert lowered.params_changed == ("reasoning_effort",)


@pytest.mark.parametrize("effort", ["xhigh", "max"])
async def test_openai_takes_every_reasoning_effort_it_documents_and_an_adaptive_ones(
    settings: Settings, mock: MockProvider, effort: str
) -> None:
    adaptive = {"reasoning_effort": effort, "thinking": {"type": "adaptive"}}
    async with open_router(catalog(mock.url), ENV, settings) as router:
        # When a job asks OpenAI for one of its highest efforts (the openai SDK's
        # ReasoningEffort has both)
        routed = await router.complete(chat("gpt", params={"reasoning_effort": effort}))
        # and a job thinking adaptively at that effort, as an Anthropic-format request's
        # output_config.effort makes one, goes to OpenAI too
        beside = await router.complete(chat("gpt", params=adaptive))

    # Expect each sent as asked, neither refused nor dropped, and reasoned at that effort
    assert [call.status for call in mock.requests] == [200, 200]
    for call, answer in zip(mock.requests, (routed, beside), strict=True):
        assert call.body is not None and call.body["reasoning_effort"] == effort
        assert "thinking" not in call.body and "output_config" not in call.body
        assert (answer.params_dropped, answer.params_changed) == ((), ())
        assert answer.reasoning_tokens == REASONING_TOKENS[effort]


async def test_streamed_thinking_arrives_as_reasoning_content_deltas(
    settings: Settings, mock: MockProvider
) -> None:
    received: list[Delta] = []

    async def sink(piece: Piece, model: str, alias: str) -> None:
        received.append(piece.delta)

    job = chat("claude", params={"reasoning_effort": "minimal"}, stream=True)
    async with open_router(catalog(mock.url), ENV, settings) as router:
        routed = await router.complete(job, on_delta=sink)

    thought = "".join(d.get("reasoning_content") or "" for d in received)
    assert thought == "mock thinking about: Hello there"
    assert "".join(d.get("content") or "" for d in received) == "mock reply to: Hello there"
    assert routed.response["choices"][0]["message"]["reasoning_content"] == thought


async def test_an_answer_sent_back_as_history_keeps_its_reasoning_out_of_the_request(
    settings: Settings, mock: MockProvider
) -> None:
    async with open_router(catalog(mock.url), ENV, settings) as router:
        first = await router.complete(chat("claude", params={"reasoning_effort": "low"}))
        history = [
            {"role": "user", "content": "Hello there"},
            first.response["choices"][0]["message"],
            {"role": "user", "content": "And then?"},
        ]
        for alias in ("claude", "gpt"):
            await router.complete(chat(alias, messages=history))

    assert [call.status for call in mock.requests] == [200, 200, 200]
    for call in mock.requests[1:]:
        assert call.body is not None
        assert "reasoning_content" not in str(call.body["messages"])


def function_tool(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}


async def test_a_streamed_custom_tool_call_is_assembled_under_its_own_type(
    settings: Settings, mock: MockProvider
) -> None:
    custom = {"type": "custom", "custom": {"name": "run_sql", "format": {"type": "text"}}}
    choice = {"type": "custom", "custom": {"name": "run_sql"}}
    received: list[Delta] = []

    async def sink(piece: Piece, model: str, alias: str) -> None:
        received.append(piece.delta)

    job = chat("gpt", params={"tools": [custom], "tool_choice": choice}, stream=True)
    async with open_router(catalog(mock.url), ENV, settings) as router:
        routed = await router.complete(job, on_delta=sink)

    [call] = routed.response["choices"][0]["message"]["tool_calls"]
    assert call == {"type": "custom", "custom": {"name": "run_sql", "input": ""}, "id": call["id"]}
    assert routed.response["choices"][0]["finish_reason"] == "tool_calls"
    # (the empty deltas after it: the provider's finish reason and usage arriving)
    assert [d["tool_calls"][0]["custom"]["name"] for d in received if d] == ["run_sql"]


async def test_allowed_tools_reach_anthropic_as_the_tools_allowed_and_their_mode(
    settings: Settings, mock: MockProvider
) -> None:
    allowed = {"mode": "required", "tools": [{"type": "function", "function": {"name": "clock"}}]}
    params = {
        "tools": [function_tool("weather"), function_tool("clock")],
        "tool_choice": {"type": "allowed_tools", "allowed_tools": allowed},
    }
    async with open_router(catalog(mock.url), ENV, settings) as router:
        routed = await router.complete(chat("claude", params=params))

    [call] = mock.requests
    assert call.body is not None
    assert [tool["name"] for tool in call.body["tools"]] == ["clock"]
    assert call.body["tool_choice"] == {"type": "any"}
    [called] = routed.response["choices"][0]["message"]["tool_calls"]
    assert called["function"]["name"] == "clock"
