"""The HTTP front door, end to end: the official openai SDK against a real uvicorn server,
in front of a real worker, accounting and the mock provider."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest
from pydantic import ValidationError

from mockprovider import Behavior, MockConfig
from queuegate.numbers import plain_decimal
from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from tests.frontdoor_support import HELLO, Door, open_door

FAILING = MockConfig(
    models={
        "flaky-gpt": Behavior(error_rate=1.0, error_status=500),
        "llama-3.1-8b": Behavior(error_rate=1.0, error_status=500),
    }
)
"""flaky-gpt (whose catalog fallback is claude-haiku) and local-llama (which has none) answer
500 to everything."""


@pytest.fixture
async def door(settings: Settings) -> AsyncIterator[Door]:
    async with open_door(settings) as opened:
        yield opened


@pytest.fixture
async def failing_door(settings: Settings) -> AsyncIterator[Door]:
    async with open_door(settings, mock_config=FAILING) as opened:
        yield opened


async def test_a_chat_completion_goes_through_the_team_queue_and_back(door: Door) -> None:
    async with door.client() as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=HELLO, max_tokens=20
        )
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.total_tokens > 0
    job_id = raw.headers["x-queuegate-job-id"]
    assert raw.headers["x-request-id"] == job_id == completion._request_id
    assert float(raw.headers["x-queuegate-cost-usd"]) > 0
    assert raw.headers["x-queuegate-model-used"] == "gpt-4o-mini"
    assert float(raw.headers["x-queuegate-latency-ms"]) > 0
    [row] = await door.gateway.usage_rows(1)
    assert row["job_id"] == job_id and row["team"] == "alpha"
    assert row["identity"] == f"frontdoor:guest/api_key:{door.key_ids['alpha']}"


@pytest.mark.parametrize("model", ["gpt-4o-mini", "claude-haiku"])
async def test_a_whole_answer_has_the_gateways_id_as_its_stream_has(door: Door, model: str) -> None:
    # When a model of an OpenAI or an Anthropic deployment answers whole, and streamed
    async with door.client() as client:
        raw = await client.chat.completions.with_raw_response.create(model=model, messages=HELLO)
        stream = await client.chat.completions.create(model=model, messages=HELLO, stream=True)
        chunks = [chunk async for chunk in stream]
    # Expect the id the job's stream has, made from its id: never the provider's (the mock's
    # chatcmpl-… or msg_…), which would say what served it
    assert raw.parse().id == f"chatcmpl-{raw.headers['x-request-id']}"
    assert len({chunk.id for chunk in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")


async def test_the_sync_sdk_is_served_too(door: Door) -> None:
    def call() -> str | None:
        with door.sync_client("beta") as client:
            answer = client.chat.completions.create(model="claude-haiku", messages=HELLO)
        return answer.choices[0].message.content

    assert await asyncio.to_thread(call)
    [row] = await door.gateway.usage_rows(1)
    assert row["team"] == "beta" and row["provider"] == "anthropic"


async def test_a_stream_arrives_chunk_by_chunk_as_the_sdk_reads_it_with_usage_last(
    door: Door,
) -> None:
    async with door.client() as client:
        stream = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "Tell me a long story about the sea"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        whole = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "Tell me a long story about the sea"}],
        )
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(texts) > 3
    assert "".join(texts) == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]


async def test_a_sync_stream_ends_with_done_and_no_usage_unless_asked(door: Door) -> None:
    def call() -> list[object]:
        with (
            door.sync_client() as client,
            client.chat.completions.create(
                model="claude-haiku", messages=HELLO, stream=True
            ) as stream,
        ):
            return list(stream)

    chunks = await asyncio.to_thread(call)
    assert chunks and all(getattr(c, "usage", None) is None for c in chunks)


async def test_each_choice_of_a_stream_keeps_the_providers_logprobs_in_the_sdks_helper(
    door: Door,
) -> None:
    # Given two choices streamed with logprobs, read by the SDK's stream helper, which counts
    # the logprobs of a choice's first chunk twice unless it is the stream's first chunk
    request: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Hi there friend"}],
        "n": 2,
        "logprobs": True,
        "top_logprobs": 1,
    }
    provider = openai.AsyncOpenAI(
        base_url=f"{door.gateway.mock.url}/v1", api_key="sk-test-mock", max_retries=0
    )
    # When the same request is streamed through the gateway and straight from the provider
    async with door.client() as client, client.chat.completions.stream(**request) as stream:
        relayed = await stream.get_final_completion()
    async with provider, provider.chat.completions.stream(**request) as stream:
        direct = await stream.get_final_completion()
    # Expect each choice its text and the provider's logprobs, once each
    assert len(direct.choices) == len(relayed.choices) == 2
    for ours, theirs in zip(relayed.choices, direct.choices, strict=True):
        assert ours.message.content == theirs.message.content
        assert ours.logprobs == theirs.logprobs and theirs.logprobs is not None


async def test_models_lists_the_catalogs_aliases(door: Door) -> None:
    async with door.client() as client:
        models = [model.id async for model in client.models.list()]
    assert {"gpt-4o-mini", "claude-haiku", "local-llama"} <= set(models)


async def test_chat_answers_with_the_gateway_block(door: Door) -> None:
    async with httpx.AsyncClient(base_url=door.url) as http:
        response = await http.post(
            "/v1/chat",
            json={"model": "flaky-gpt", "messages": HELLO},
            headers={"Authorization": f"Bearer {door.keys['alpha']}"},
        )
    assert response.status_code == 200, response.text
    block = response.json()["_gateway"]
    assert block["request_id"] == response.headers["x-request-id"]
    assert block["model_used"] == "flaky-gpt" and block["fallback"] is False
    assert float(block["cost_usd"]) > 0 and block["latency_ms"] > 0


async def test_the_gateway_block_says_when_tokens_were_counted_from_the_text(
    settings: Settings,
) -> None:
    # Given a self-hosted server that answers without usage (OpenAI-compatible ones may)
    silent = MockConfig(models={"llama-3.1-8b": Behavior(usage={})})
    async with (
        open_door(settings, mock_config=silent) as door,
        httpx.AsyncClient(base_url=door.url) as http,
    ):
        response = await http.post(
            "/v1/chat",
            json={"model": "local-llama", "messages": HELLO},
            headers={"Authorization": f"Bearer {door.keys['alpha']}"},
        )
    # Expect its answer billed by its text, and saying so over HTTP as a result does
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["_gateway"]["tokens_estimated"] is True
    assert body["usage"]["completion_tokens"] > 0


async def test_a_cached_answers_usage_adds_up_to_what_its_rows_bill(settings: Settings) -> None:
    # Given a team whose answers are cached, and an answer in the cache
    async with open_door(settings, {"alpha": TeamConfig(cache=True)}) as door:
        async with door.client() as client:
            first = await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)

            # When the same request comes again, whole and streamed with its usage
            raw = await client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=HELLO
            )
            stream = await client.chat.completions.create(
                model="gpt-4o-mini",
                messages=HELLO,
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [chunk async for chunk in stream]
        rows = await door.gateway.usage_rows(3)

    # Expect each answer's usage to say the tokens its row bills: the cached ones none
    # (before: the cached call's, though a caller adding up its answers gets what
    # `queuegate usage` reports)
    again, streamed = raw.parse().usage, chunks[-1].usage
    assert first.usage is not None and again is not None and streamed is not None
    assert raw.headers["x-queuegate-cost-usd"] == "0"
    answered = sum(u.total_tokens for u in (first.usage, again, streamed))
    assert answered == sum(row["input_tokens"] + row["output_tokens"] for row in rows) > 0
    assert again.total_tokens == streamed.total_tokens == 0
    assert again.prompt_tokens == again.completion_tokens == 0


async def test_health_readiness_metrics_and_docs(door: Door) -> None:
    async with httpx.AsyncClient(base_url=door.url) as http:
        assert (await http.get("/healthz")).status_code == 200
        ready = await http.get("/readyz")
        assert ready.status_code == 200
        assert ready.json() == {"status": "ok", "broker": True, "redis": True, "database": True}
        await http.get("/v1/models", headers={"x-api-key": door.keys["alpha"]})
        metrics = (await http.get("/metrics")).text
        assert 'queuegate_http_requests_total{route="/v1/models",status="200"}' in metrics
        assert "queuegate_http_request_seconds_bucket" in metrics
        assert (await http.get("/docs")).status_code == 200
        assert "/v1/chat/completions" in (await http.get("/openapi.json")).json()["paths"]


async def test_a_cheap_jobs_cost_is_shown_in_plain_notation(door: Door) -> None:
    # Given a job that costs under a millionth of a dollar (local-llama: $0.05 a Mtok in)
    async with httpx.AsyncClient(base_url=door.url) as http:
        response = await http.post(
            "/v1/chat",
            json={"model": "local-llama", "messages": HELLO, "max_tokens": 3},
            headers={"Authorization": f"Bearer {door.keys['alpha']}"},
        )
    assert response.status_code == 200, response.text

    # Expect its cost in the header and the _gateway block as the audit log writes it:
    # digits after a point, never an exponent a reader (or a spreadsheet) takes for text
    [row] = await door.gateway.usage_rows(1)
    assert Decimal(0) < row["cost_usd"] < Decimal("0.000001")
    shown = plain_decimal(row["cost_usd"])
    assert shown.startswith("0.000000")
    assert response.headers["x-queuegate-cost-usd"] == shown
    assert response.json()["_gateway"]["cost_usd"] == shown


async def test_a_requests_own_fallback_serves_it_when_its_model_fails(failing_door: Door) -> None:
    # Given local-llama failing, which the catalog gives no fallback
    async with failing_door.client() as client:
        # When a request for it names its own fallback, as LiteLLM's proxy takes it
        raw = await client.chat.completions.with_raw_response.create(
            model="local-llama", messages=HELLO, extra_body={"fallbacks": ["claude-haiku"]}
        )

    # Expect the fallback to answer, and to be what the answer and the usage row name
    assert raw.parse().choices[0].message.content
    assert raw.headers["x-queuegate-model-used"] == "claude-haiku"
    assert raw.headers["x-queuegate-fallback"] == "true"
    [row] = await failing_door.gateway.usage_rows(1)
    assert row["model_requested"] == "local-llama" and row["model_used"] == "claude-haiku"


async def test_a_requests_own_fallbacks_replace_its_models_in_the_catalog(
    failing_door: Door,
) -> None:
    # Given flaky-gpt failing, whose catalog fallback is claude-haiku
    async with failing_door.client() as client:
        # When a request for it names gpt-4o-mini as its fallback
        raw = await client.chat.completions.with_raw_response.create(
            model="flaky-gpt", messages=HELLO, extra_body={"fallbacks": ["gpt-4o-mini"]}
        )

    # Expect gpt-4o-mini to serve it, never claude-haiku, the fallbacks sent to no provider
    assert raw.headers["x-queuegate-model-used"] == "gpt-4o-mini"
    [row] = await failing_door.gateway.usage_rows(1)
    assert row["model_used"] == "gpt-4o-mini"
    calls = [call.body for call in failing_door.gateway.mock.requests if call.body is not None]
    assert [body["model"] for body in calls] == ["flaky-gpt", "flaky-gpt", "gpt-4o-mini"]
    assert not any("fallbacks" in body for body in calls)


async def test_a_request_naming_no_fallbacks_is_not_served_by_the_catalogs(
    failing_door: Door,
) -> None:
    # Given flaky-gpt failing, whose catalog fallback is claude-haiku
    async with failing_door.client() as client:
        # When a request for it names no fallback at all, as a queued job may
        with pytest.raises(openai.APIStatusError) as failed:
            await client.chat.completions.create(
                model="flaky-gpt", messages=HELLO, extra_body={"fallbacks": []}
            )

    # Expect it failed on flaky-gpt alone (before: refused 400, [] was no list of 1 to 8)
    assert failed.value.status_code == 502
    calls = [call.body for call in failing_door.gateway.mock.requests if call.body is not None]
    assert [body["model"] for body in calls] == ["flaky-gpt", "flaky-gpt"]


async def test_nine_fallbacks_are_refused_by_either_door(door: Door) -> None:
    nine = ["gpt-4o-mini"] * 9
    async with door.client() as client:
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(
                model="gpt-4o-mini", messages=HELLO, extra_body={"fallbacks": nine}
            )
    assert refused.value.param == "fallbacks"
    # ... and a queued job with as many, by the client as a worker would, unpublished
    # (before: served, the bound the front door's alone)
    async with door.gateway.client("alpha") as queued:
        with pytest.raises(ValidationError) as unpublished:
            await queued.chat("gpt-4o-mini", HELLO, fallbacks=nine)
    assert unpublished.value.errors()[0]["loc"] == ("fallbacks",)
    assert door.gateway.mock.stats.calls == 0


async def test_a_fallback_the_catalog_lacks_is_not_found_naming_it(door: Door) -> None:
    async with door.client() as client:
        with pytest.raises(openai.NotFoundError) as refused:
            await client.chat.completions.create(
                model="gpt-4o-mini", messages=HELLO, extra_body={"fallbacks": ["gpt-9"]}
            )

    assert refused.value.code == "unknown_model" and refused.value.param == "fallbacks.0"
    assert "fallbacks.0: model 'gpt-9' is not served here" in refused.value.message
    assert door.gateway.mock.stats.calls == 0


async def test_fallbacks_that_are_no_list_of_aliases_are_refused(door: Door) -> None:
    async with door.client() as client:
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(
                model="gpt-4o-mini", messages=HELLO, extra_body={"fallbacks": "claude-haiku"}
            )

    assert refused.value.param == "fallbacks"
    assert "fallbacks: Input should be a valid list" in refused.value.message
    assert door.gateway.mock.stats.calls == 0
