"""Every way a request can fail, answered in OpenAI's error shape with the status its code
maps to, so the openai SDK raises its own typed exceptions."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx
import httpx2
import openai
import pytest

from mockprovider import Behavior, MockConfig
from queuegate.db import create_pool
from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from queuegate.tenancy import revoke_api_keys
from tests.frontdoor_support import HELLO, Door, open_door

TEAMS = {
    "alpha": TeamConfig(),
    "beta": TeamConfig(budget_usd=0),
    "gamma": TeamConfig(rpm=1),
}
FAULTS = MockConfig(
    models={
        "llama-3.1-8b": Behavior(error_rate=1.0, error_status=503),
        "flaky-gpt": Behavior(latency_ms=3000),
    }
)
LATE = "1"
"""Seconds a caller waits (x-queuegate-timeout) for flaky-gpt, which answers after 3: time for
the front door's own steps before it publishes however loaded the machine (beyond it, it
answers 503, nothing published), none for the provider."""


class Answers:
    """What an SDK sent and the status of each response it read, call by call (a call's
    retries go with it); give ``hooks`` to its HTTP client."""

    def __init__(self) -> None:
        self.calls: list[list[int | None]] = []
        """Per call, a status per request sent: None while (or if never) answered."""

    @property
    def hooks(self) -> dict[str, list[Any]]:
        return {"request": [self._sent], "response": [self._read]}

    def call(self) -> None:
        self.calls.append([])

    async def _sent(self, request: httpx.Request | httpx2.Request) -> None:
        self.calls[-1].append(None)

    async def _read(self, response: httpx.Response | httpx2.Response) -> None:
        self.calls[-1][-1] = response.status_code

    def paid_once(self) -> None:
        """Each call ended at a 504 (its job published, maybe called), after nothing but
        refusals that publish nothing (503, 429): never sent again once its job was out, nor
        after a timeout of the SDK's own."""
        for statuses in self.calls:
            assert statuses[-1] == 504, statuses
            assert {*statuses[:-1]} <= {429, 503}, statuses


@contextlib.asynccontextmanager
async def watched_sdks(
    door: Door, answers: Answers, **options: Any
) -> AsyncIterator[tuple[openai.AsyncOpenAI, anthropic.AsyncAnthropic]]:
    """alpha's openai and anthropic SDK clients (with ``options``: a timeout), each request
    and response of theirs seen by ``answers``."""
    http = httpx.AsyncClient(event_hooks=answers.hooks)
    claude_http = httpx2.AsyncClient(event_hooks=answers.hooks)  # the anthropic SDK's
    key = door.keys["alpha"]
    async with (
        openai.AsyncOpenAI(base_url=door.v1, api_key=key, http_client=http, **options) as gpt,
        anthropic.AsyncAnthropic(
            base_url=door.url, api_key=key, http_client=claude_http, **options
        ) as claude,
    ):
        yield gpt, claude


@pytest.fixture
async def door(settings: Settings) -> AsyncIterator[Door]:
    settings = settings.model_copy(update={"security_cache_ttl": 0.2})
    async with open_door(settings, TEAMS, FAULTS) as opened:
        yield opened


async def test_no_key_an_unknown_key_and_a_revoked_key_are_401(door: Door) -> None:
    async with door.client() as client:
        assert await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
        for key in ("qg_000000000000_" + "x" * 43, "sk-not-ours"):
            stranger = client.with_options(api_key=key)
            with pytest.raises(openai.AuthenticationError) as refused:
                await stranger.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
            assert refused.value.code == "unauthorized"
        pool = await create_pool(door.gateway.settings)
        try:
            assert await revoke_api_keys(pool, "alpha") == 1
        finally:
            await pool.close()
        revoked_at = time.monotonic()
        with pytest.raises(openai.AuthenticationError, match="unknown or revoked"):
            while time.monotonic() - revoked_at < 0.2 + 1.0:  # refused within the cache's ttl
                await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)


async def test_a_request_without_a_key_is_401_in_openais_shape(door: Door) -> None:
    async with httpx.AsyncClient(base_url=door.url) as http:
        response = await http.post("/v1/chat/completions", json={"model": "gpt-4o-mini"})
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["code"] == "unauthorized" and error["type"] == "invalid_request_error"
    assert "Authorization: Bearer" in error["message"]


async def test_an_unknown_model_is_404_before_anything_is_published(door: Door) -> None:
    async with door.client() as client:
        with pytest.raises(openai.NotFoundError) as missing:
            await client.chat.completions.create(model="gpt-9", messages=HELLO)
    assert missing.value.code == "unknown_model"
    assert "GET /v1/models" in missing.value.message
    assert door.gateway.mock.stats.calls == 0


async def test_an_exhausted_budget_is_402(door: Door) -> None:
    async with door.client("beta") as client:
        with pytest.raises(openai.APIStatusError) as refused:
            await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert refused.value.status_code == 402
    assert refused.value.code == "budget_exhausted"
    assert refused.value.type == "insufficient_quota"


async def test_a_request_its_limits_cannot_admit_in_time_is_429_with_retry_after(
    door: Door,
) -> None:
    async with door.client("gamma") as client:
        await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
        with pytest.raises(openai.RateLimitError) as limited:
            await client.chat.completions.create(
                model="gpt-4o-mini", messages=HELLO, extra_headers={"x-queuegate-timeout": "2"}
            )
    assert limited.value.code == "rate_limited"
    assert int(limited.value.response.headers["retry-after"]) > 30
    assert "x-should-retry" not in limited.value.response.headers  # nothing called: retry
    assert door.gateway.mock.stats.calls == 1


async def test_every_provider_failing_is_502(door: Door) -> None:
    async with door.client() as client:
        with pytest.raises(openai.InternalServerError) as failed:
            await client.chat.completions.create(model="local-llama", messages=HELLO)
    assert failed.value.status_code == 502
    assert failed.value.code == "all_providers_failed"
    # The workers retried and fell back: the SDK is told not to call it all again
    headers = failed.value.response.headers
    assert headers["x-should-retry"] == "false"
    # The job the workers failed is named, as a served job's answer names it
    assert headers["x-queuegate-job-id"] == headers["x-request-id"]


async def test_no_answer_within_the_callers_timeout_is_504(door: Door) -> None:
    async with door.client() as client:
        with pytest.raises(openai.InternalServerError) as late:
            await client.chat.completions.create(
                model="flaky-gpt", messages=HELLO, extra_headers={"x-queuegate-timeout": LATE}
            )
    assert late.value.status_code == 504
    assert late.value.code == "deadline_exceeded"


async def test_every_error_carries_a_request_id_the_jobs_once_there_is_one(door: Door) -> None:
    async with door.client() as client:
        # Refused before there is a job: a fresh id each
        with pytest.raises(openai.NotFoundError) as unknown:
            await client.chat.completions.create(model="gpt-9", messages=HELLO)
        with pytest.raises(openai.PermissionDeniedError) as forbidden:
            await client.get(
                f"{door.url}/admin/usage", cast_to=object, options={"params": {"team": "beta"}}
            )
        # Refused by the worker (seed has no Anthropic equivalent), and given up on in time
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(model="claude-haiku", messages=HELLO, seed=7)
        with pytest.raises(openai.InternalServerError) as late:
            await client.chat.completions.create(
                model="flaky-gpt", messages=HELLO, extra_headers={"x-queuegate-timeout": LATE}
            )
    async with anthropic.AsyncAnthropic(
        base_url=door.url, api_key=door.keys["alpha"], max_retries=0
    ) as claude:
        with pytest.raises(anthropic.NotFoundError) as unknown_claude:
            await claude.messages.create(model="claude-9", max_tokens=10, messages=HELLO)
    async with httpx.AsyncClient(base_url=door.url) as http:
        no_key = await http.post("/v1/chat/completions", json={"model": "gpt-4o-mini"})

    fresh = [unknown.value.response, forbidden.value.response, unknown_claude.value.response]
    ids = {response.headers["x-request-id"] for response in [*fresh, no_key]}
    assert len(ids) == 4 and all(ids)
    refused_id = refused.value.response.headers["x-request-id"]
    late_id = late.value.response.headers["x-request-id"]
    assert late.value.status_code == 504
    rows = {row["job_id"]: row for row in await door.gateway.usage_rows(2)}
    assert rows[refused_id]["error_code"] == "invalid_request"
    assert late_id in rows


async def test_the_sdk_with_its_default_retries_pays_once_for_a_504(door: Door) -> None:
    # Given the openai SDK as callers build it: two retries of a 5xx by default
    answers = Answers()
    http = httpx.AsyncClient(event_hooks=answers.hooks)
    async with openai.AsyncOpenAI(
        base_url=door.v1, api_key=door.keys["alpha"], http_client=http
    ) as client:
        # When the provider is still answering as the caller's timeout passes
        answers.call()
        with pytest.raises(openai.InternalServerError) as late:
            await client.chat.completions.create(
                model="flaky-gpt", messages=HELLO, extra_headers={"x-queuegate-timeout": LATE}
            )
    assert late.value.status_code == 504 and late.value.code == "deadline_exceeded"

    # Expect it told not to retry: no request after the 504, one provider call, one usage row
    assert late.value.response.headers["x-should-retry"] == "false"
    answers.paid_once()
    async with asyncio.timeout(10):
        await door.gateway.mock.wait_for_calls(1)
    assert len(await door.gateway.usage_rows(1)) == 1
    assert door.gateway.mock.stats.calls == 1


async def test_an_sdk_reads_the_504_before_its_own_timeout_and_pays_once(door: Door) -> None:
    # Given each SDK with a timeout of its own (announced in x-stainless-read-timeout) and its
    # default retries, and a provider still answering when that timeout passes
    answers = Answers()
    async with watched_sdks(door, answers, timeout=1.0) as (client, claude):
        answers.call()
        with pytest.raises(openai.InternalServerError) as late:
            await client.chat.completions.create(model="flaky-gpt", messages=HELLO)
        answers.call()
        with pytest.raises(openai.InternalServerError) as late_stream:
            await client.chat.completions.create(model="flaky-gpt", messages=HELLO, stream=True)
        answers.call()
        with pytest.raises(anthropic.InternalServerError) as late_claude:
            await claude.messages.create(model="flaky-gpt", max_tokens=10, messages=HELLO)

    # Expect the gateway's 504 read by each, not a timeout of the SDK's own that it retries
    # as a new job: no request after a 504, three provider calls, three usage rows
    for error in (late.value, late_stream.value, late_claude.value):
        assert error.status_code == 504
    assert late.value.code == late_stream.value.code == "deadline_exceeded"
    answers.paid_once()
    async with asyncio.timeout(10):
        await door.gateway.mock.wait_for_calls(3)
    assert len(await door.gateway.usage_rows(3)) == 3
    assert door.gateway.mock.stats.calls == 3


async def test_an_sdk_timeout_past_the_gateways_longest_wait_is_served(door: Door) -> None:
    # Given SDK clients built with a two-hour timeout, which they announce on every request
    async with (
        openai.AsyncOpenAI(base_url=door.v1, api_key=door.keys["alpha"], timeout=7200) as client,
        anthropic.AsyncAnthropic(
            base_url=door.url, api_key=door.keys["alpha"], timeout=7200
        ) as claude,
    ):
        # Expect their requests served (waiting at most the gateway's hour), not refused
        # over a header their callers never set
        answer = await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
        message = await claude.messages.create(model="claude-haiku", max_tokens=10, messages=HELLO)
    assert answer.choices[0].message.content
    assert message.content
