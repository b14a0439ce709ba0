"""The router over real HTTP against the mock provider: serving, fallback, failures, deadlines."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import traceback
from collections.abc import AsyncIterator
from contextlib import aclosing
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from mockprovider import Behavior, MockConfig, MockProvider
from mockprovider.catalog import mock_deployment
from queuegate.errors import (
    AllProvidersFailed,
    DeadlineExceeded,
    InvalidRequest,
    JobError,
    UnknownModel,
)
from queuegate.keys import Keys
from queuegate.messages import ChatJob
from queuegate.redis_client import redis_for
from queuegate.settings import Settings
from router import Catalog, Router, load_catalog, open_router
from router.catalog import Deployment
from router.providers import ProviderError
from router.providers.base import UpstreamRequest, classify
from router.providers.openai import OpenAIAdapter
from router.router import NO_KEY
from router.transport import Upstream, events, post, time_limit

SENTINEL_KEY = "sk-SENTINEL-0123456789abcdef"
ENV = {"QUEUEGATE_MOCK_KEY": SENTINEL_KEY}
CONTEXT_TOO_LONG_OPENAI = {
    "error": {
        "message": "This model's maximum context length is 128000 tokens. However, your "
        "messages resulted in 130000 tokens. Please reduce the length of the messages.",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
    }
}
CONTEXT_TOO_LONG_ANTHROPIC = {
    "type": "error",
    "error": {
        "type": "invalid_request_error",
        "message": "prompt is too long: 210000 tokens > 200000 maximum",
    },
}


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


def deployment(name: str, model: str, url: str, /, **fields: Any) -> dict[str, Any]:
    return mock_deployment(name, model, url, timeout=5) | fields


def primary_and_backup(mock_url: str, /, **primary: Any) -> Catalog:
    """Alias ``primary`` (upstream model ``primary-model``) falling back to ``backup``.

    Both deployments are at ``mock_url`` unless ``primary`` fields say otherwise.
    """
    return Catalog.model_validate(
        {
            "models": {
                "primary": {
                    "fallbacks": ["backup"],
                    "deployments": [
                        deployment("primary-dep", "primary-model", mock_url, **primary)
                    ],
                },
                "backup": {"deployments": [deployment("backup-dep", "backup-model", mock_url)]},
            }
        }
    )


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def everything_said(exc: BaseException) -> str:
    """The error as anyone could see it: message, attempts, chained causes, traceback."""
    said = "".join(traceback.format_exception(exc))
    if isinstance(exc, JobError):
        said += repr(exc.attempts)
    return said


@pytest.fixture
async def mock() -> AsyncIterator[MockProvider]:
    async with MockProvider() as provider:
        yield provider


@pytest.fixture
def mock_catalog(mock: MockProvider) -> Catalog:
    return load_catalog(None, {"QUEUEGATE_MOCK_URL": mock.url})


# --- serving -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [
        ("gpt-4o-mini", "/v1/chat/completions", True),
        ("claude-haiku", "/v1/messages", True),
        ("local-llama", "/vllm/v1/chat/completions", False),
    ],
    ids=["openai", "anthropic", "openai_compatible"],
)
async def test_each_provider_kind_serves_a_chat_completion(
    settings: Settings, mock: MockProvider, mock_catalog: Catalog, case: tuple[str, str, bool]
) -> None:
    alias, path, keyed = case
    expected = mock_catalog.resolve(alias).deployments[0]

    async with open_router(mock_catalog, ENV, settings) as router:
        routed = await router.complete(chat(alias, "Hello there"))

    assert routed.response["object"] == "chat.completion"
    message = routed.response["choices"][0]["message"]
    # (OpenAI's answers carry "refusal": null, as the mock's now do; the others none)
    assert message | {"refusal": None} == {
        "role": "assistant",
        "content": "mock reply to: Hello there",
        "refusal": None,
    }
    assert routed.response["choices"][0]["finish_reason"] == "stop"
    assert (routed.model_used, routed.deployment, routed.provider) == (
        alias,
        expected.name,
        expected.provider,
    )
    assert not routed.fallback_used
    assert routed.input_tokens > 0 and routed.output_tokens > 0
    assert routed.response["usage"]["prompt_tokens"] == routed.input_tokens
    [attempt] = routed.attempts
    assert (attempt.model, attempt.deployment, attempt.status, attempt.error) == (
        alias,
        expected.name,
        200,
        None,
    )
    assert routed.latency_ms == attempt.latency_ms > 0
    [call] = mock.requests
    assert (call.path, call.model, call.had_key) == (path, expected.model, keyed)


async def test_a_vllm_server_gets_every_stop_sequence_and_openai_at_most_four(
    settings: Settings, mock: MockProvider, mock_catalog: Catalog
) -> None:
    stops = ["#1", "#2", "#3", "#4", "#5", "there"]
    async with open_router(mock_catalog, ENV, settings) as router:
        routed = await router.complete(chat("local-llama", params={"stop": stops}))
        with pytest.raises(InvalidRequest) as refused:
            await router.complete(chat("gpt-4o-mini", params={"stop": stops}))

    [call] = mock.requests
    assert call.body is not None and call.body["stop"] == stops
    assert routed.response["choices"][0]["message"]["content"] == "mock reply to: Hello"
    assert refused.value.param == "stop"


async def test_anthropic_deployment_gets_a_translated_request_and_answers_tool_calls(
    settings: Settings, mock: MockProvider, mock_catalog: Catalog
) -> None:
    job = chat(
        "claude-haiku",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?"},
        ],
        params={
            "tools": [{"type": "function", "function": {"name": "get_weather"}}],
            "stop": "END",
        },
    )

    async with open_router(mock_catalog, ENV, settings) as router:
        routed = await router.complete(job)

    [call] = mock.requests
    assert call.system == "Be brief."
    assert call.messages == [{"role": "user", "content": "Weather in Paris?"}]
    assert call.body is not None and call.body["max_tokens"] == 1024
    assert call.body["stop_sequences"] == ["END"]
    choice = routed.response["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"][0]["function"] == {
        "name": "get_weather",
        "arguments": "{}",
    }


async def test_cost_is_exact_from_the_deployment_prices(
    settings: Settings, mock: MockProvider, mock_catalog: Catalog
) -> None:
    async with open_router(mock_catalog, ENV, settings) as router:
        routed = await router.complete(chat("claude-haiku"))

    expected = (
        routed.input_tokens * Decimal("0.80") + routed.output_tokens * Decimal("4.00")
    ) / 1_000_000
    assert routed.cost_usd == expected > 0


async def test_many_concurrent_jobs_share_the_pooled_clients(
    settings: Settings, mock: MockProvider, mock_catalog: Catalog
) -> None:
    mock.configure(MockConfig(default=Behavior(latency_ms=200)))
    aliases = ["gpt-4o-mini", "claude-haiku", "local-llama"] * 40

    async with open_router(mock_catalog, ENV, settings) as router:
        served = await asyncio.gather(*(router.complete(chat(alias)) for alias in aliases))

    assert [routed.model_used for routed in served] == aliases
    assert mock.stats.calls == 120
    # Each call held the mock 200 ms: many of those windows overlap when calls run together.
    ends = sorted(record.t for record in mock.requests)
    most_at_once = max(sum(1 for other in ends if end - 0.2 < other <= end) for end in ends)
    assert most_at_once >= 20


# --- fallback ----------------------------------------------------------------------------------


async def test_500_falls_back_to_the_next_alias(
    settings: Settings, mock: MockProvider, mock_catalog: Catalog
) -> None:
    mock.configure(MockConfig(models={"flaky-gpt": Behavior(error_rate=1.0, error_status=500)}))

    async with open_router(mock_catalog, ENV, settings) as router:
        routed = await router.complete(chat("flaky-gpt"))

    assert (routed.model_used, routed.deployment, routed.provider) == (
        "claude-haiku",
        "anthropic-main",
        "anthropic",
    )
    assert routed.fallback_used
    assert [(a.model, a.deployment, a.status, a.error) for a in routed.attempts] == [
        ("flaky-gpt", "openai-flaky", 500, "server_error"),
        ("flaky-gpt", "openai-flaky", 500, "server_error"),  # retried once by default
        ("claude-haiku", "anthropic-main", 200, None),
    ]
    assert (
        routed.cost_usd
        == (routed.input_tokens * Decimal("0.80") + routed.output_tokens * Decimal("4.00"))
        / 1_000_000
    )


async def test_timeout_falls_back_after_the_deployment_timeout(
    settings: Settings, mock: MockProvider
) -> None:
    mock.configure(MockConfig(models={"primary-model": Behavior(timeout_rate=1.0, hang_s=10)}))
    catalog = primary_and_backup(mock.url, timeout=0.3)

    async with open_router(catalog, ENV, settings) as router:
        routed = await router.complete(chat("primary"))

    assert routed.deployment == "backup-dep"
    first = routed.attempts[0]
    assert (first.deployment, first.status, first.error) == ("primary-dep", None, "timeout")
    assert 250 <= first.latency_ms < 2000


async def test_a_call_waiting_for_a_connection_is_not_timed_out_nor_called_again(
    settings: Settings, mock: MockProvider
) -> None:
    # Given a deployment answering in 1 s with a 1.7 s timeout, and three times more calls at
    # once than the router's connections to it
    mock.configure(MockConfig(models={"primary-model": Behavior(latency_ms=1000)}))
    catalog = primary_and_backup(mock.url, timeout=1.7)
    redis = redis_for(settings)
    router = Router(catalog, ENV, redis=redis, keys=Keys(settings.redis_prefix), connections=10)

    # When they are all sent at once (the last ones wait 2 s for a connection)
    started = time.monotonic()
    try:
        async with router:
            routed = await asyncio.gather(*(router.complete(chat("primary")) for _ in range(30)))
    finally:
        await redis.aclose()

    # Expect each answered by the deployment on its one call: its timeout bounds the
    # provider's answer, not the wait for a connection (counted in it, the late ones timed out
    # while the provider was answering them, and went to the fallback: called twice)
    assert {r.deployment for r in routed} == {"primary-dep"}
    assert all(len(r.attempts) == 1 for r in routed)
    assert len(mock.requests) == 30
    assert max(r.attempts[0].latency_ms for r in routed) < 1700
    # And they did wait: three rounds of the provider's second
    assert time.monotonic() - started >= 3.0


class EnteredAt:
    """A router gate noting when each call entered it (where a worker records it as sent)."""

    def __init__(self) -> None:
        self.at: list[float] = []
        self.entered = asyncio.Event()

    async def enter(self, deployment: Deployment) -> None:
        self.at.append(time.monotonic())
        self.entered.set()

    async def rate_limited(self, deployment: Deployment) -> None:
        return None


async def test_a_call_enters_its_gate_once_it_holds_a_connection(
    settings: Settings, mock: MockProvider
) -> None:
    # Given a deployment without limits of its own answering in 0.5 s, and one connection
    mock.configure(MockConfig(models={"primary-model": Behavior(latency_ms=500)}))
    catalog = primary_and_backup(mock.url)
    redis = redis_for(settings)
    router = Router(catalog, ENV, redis=redis, keys=Keys(settings.redis_prefix), connections=1)
    gates = [EnteredAt(), EnteredAt()]

    # When two jobs are sent at once
    try:
        async with router:
            await asyncio.gather(*(router.complete(chat("primary"), gate=g) for g in gates))
    finally:
        await redis.aclose()

    # Expect the second to pass its gate (be recorded as sent, and billed as lost should its
    # worker die) only once the first call gave the connection back, not while it waited
    first, second = sorted(gate.at[0] for gate in gates)
    assert second - first >= 0.45


async def test_a_job_goes_straight_to_its_call_only_while_a_connection_is_free(
    settings: Settings, mock: MockProvider
) -> None:
    # Given a deployment answering in 0.5 s, one connection, and its closed circuit trusted
    mock.configure(MockConfig(models={"primary-model": Behavior(latency_ms=500)}))
    catalog = primary_and_backup(mock.url)
    [deployment] = catalog.resolve("primary").deployments
    redis = redis_for(settings)
    router = Router(catalog, ENV, redis=redis, keys=Keys(settings.redis_prefix), connections=1)
    try:
        async with router:
            await router.health.allow(deployment)
            # Expect a job's first call known in advance (recorded with its claim) while the
            # connection is free
            assert router.first_call(chat("primary")) == ("primary", deployment)
            # And not while another call holds it: recorded with the claim, the call would
            # be billed as lost should the worker die while it waits for the connection
            holding = EnteredAt()  # entered once its call holds the connection
            busy = asyncio.create_task(router.complete(chat("primary"), gate=holding))
            await holding.entered.wait()
            await router.health.allow(deployment)
            assert router.first_call(chat("primary")) is None
            await busy
            await router.health.allow(deployment)
            assert router.first_call(chat("primary")) == ("primary", deployment)
    finally:
        await redis.aclose()


async def test_connection_refused_falls_back(settings: Settings, mock: MockProvider) -> None:
    catalog = primary_and_backup(mock.url, api_base=f"http://127.0.0.1:{closed_port()}")

    async with open_router(catalog, ENV, settings) as router:
        routed = await router.complete(chat("primary"))

    assert routed.deployment == "backup-dep"
    assert [(a.status, a.error) for a in routed.attempts] == [
        (None, "connection"),
        (None, "connection"),
        (200, None),
    ]


@pytest.mark.parametrize(
    "body", [CONTEXT_TOO_LONG_OPENAI, CONTEXT_TOO_LONG_ANTHROPIC], ids=["openai", "anthropic"]
)
async def test_context_length_error_moves_on(
    settings: Settings, mock: MockProvider, body: dict[str, Any]
) -> None:
    behavior = Behavior(error_rate=1.0, error_status=400, error_body=body)
    mock.configure(MockConfig(models={"primary-model": behavior}))

    async with open_router(primary_and_backup(mock.url), ENV, settings) as router:
        routed = await router.complete(chat("primary"))

    assert routed.deployment == "backup-dep"
    assert [(a.status, a.error) for a in routed.attempts] == [(400, "context_length"), (200, None)]


async def test_job_fallbacks_override_the_catalog(
    settings: Settings, mock: MockProvider, mock_catalog: Catalog
) -> None:
    mock.configure(MockConfig(models={"flaky-gpt": Behavior(error_rate=1.0)}))

    async with open_router(mock_catalog, ENV, settings) as router:
        routed = await router.complete(chat("flaky-gpt", fallbacks=["local-llama"]))

    assert routed.model_used == "local-llama"


# --- failures ----------------------------------------------------------------------------------


async def test_400_fails_the_job_without_fallback(settings: Settings, mock: MockProvider) -> None:
    mock.configure(MockConfig(models={"primary-model": Behavior(error_rate=1.0, error_status=400)}))

    async with open_router(primary_and_backup(mock.url), ENV, settings) as router:
        with pytest.raises(InvalidRequest) as caught:
            await router.complete(chat("primary"))

    assert caught.value.code == "invalid_request"
    assert str(caught.value) == "primary-dep: 400 bad_request: mock: injected 400 for primary-model"
    assert [(a.deployment, a.status, a.error) for a in caught.value.attempts] == [
        ("primary-dep", 400, "bad_request")
    ]
    assert mock.stats.calls == 1  # neither retried nor fallen back


async def test_every_deployment_failing_lists_each_attempt(
    settings: Settings, mock: MockProvider, mock_catalog: Catalog
) -> None:
    mock.configure(
        MockConfig(
            models={
                "flaky-gpt": Behavior(error_rate=1.0, error_status=500),
                "claude-3-5-haiku-latest": Behavior(error_rate=1.0, error_status=529),
            }
        )
    )

    async with open_router(mock_catalog, ENV, settings) as router:
        with pytest.raises(AllProvidersFailed) as caught:
            await router.complete(chat("flaky-gpt"))

    assert caught.value.code == "all_providers_failed"
    flaky = "openai-flaky: 500 server_error: mock: injected 500 for flaky-gpt"
    haiku = "anthropic-main: 529 overloaded: mock: injected 529 for claude-3-5-haiku-latest"
    assert str(caught.value) == (
        f"all 2 models failed after 4 calls: {flaky}; {flaky}; {haiku}; {haiku}"
    )
    assert [(a.model, a.status, a.error) for a in caught.value.attempts] == [
        ("flaky-gpt", 500, "server_error"),
        ("flaky-gpt", 500, "server_error"),
        ("claude-haiku", 529, "overloaded"),
        ("claude-haiku", 529, "overloaded"),
    ]


async def test_a_model_without_fallbacks_failing_is_named_alone(
    settings: Settings, mock: MockProvider, mock_catalog: Catalog
) -> None:
    mock.configure(MockConfig(models={"llama-3.1-8b": Behavior(error_rate=1.0, error_status=500)}))

    async with open_router(mock_catalog, ENV, settings) as router:
        with pytest.raises(AllProvidersFailed) as caught:
            await router.complete(chat("local-llama"))

    # Not "all 1 models failed".
    assert str(caught.value).startswith("local-llama failed after 2 calls: local-vllm: 500")


async def test_a_missing_key_variable_is_told_to_the_operator_and_not_to_the_job(
    settings: Settings,
    mock: MockProvider,
    mock_catalog: Catalog,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a router opened without the variable its keyed deployments read their key from
    caplog.set_level(logging.WARNING, logger="router.router")
    async with open_router(mock_catalog, {}, settings) as router:
        warned = [record.getMessage() for record in caplog.records]
        # When jobs ask for a keyed deployment and for one that needs no key
        with pytest.raises(AllProvidersFailed) as caught:
            await router.complete(chat("gpt-4o-mini"))
        keyless = await router.complete(chat("local-llama"))

    # Expect one warning per keyed deployment at open, naming it, the variable, what to do
    keyed = ["openai-main", "anthropic-main", "openai-flaky"]
    assert len(warned) == len(keyed)
    for name, line in zip(keyed, warned, strict=True):
        assert line.startswith(f"deployment {name} has no key: QUEUEGATE_MOCK_KEY is not set: ")
        assert "restart the worker" in line
    # ... and the job told only that each deployment it tried has no key
    assert f"openai-main: no_api_key: {NO_KEY}" in str(caught.value)
    assert f"anthropic-main: no_api_key: {NO_KEY}" in str(caught.value)
    assert "QUEUEGATE_MOCK_KEY" not in everything_said(caught.value)
    # Nothing reached the network: no call is counted.
    assert caught.value.attempts == []
    assert "all 2 models failed after 0 calls" in str(caught.value)
    assert keyless.deployment == "local-vllm"
    assert mock.stats.calls == 1


@pytest.mark.parametrize("written", [None, ""], ids=["missing", "empty"])
async def test_an_unreadable_key_file_is_told_to_the_operator_and_not_to_the_job(
    settings: Settings,
    mock: MockProvider,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    written: str | None,
) -> None:
    # Given a deployment whose key file is missing or empty
    key_file = tmp_path / "provider.key"
    if written is not None:
        key_file.write_text(written)
    entry = mock_deployment("filed", "gpt-4o-mini", mock.url, api_key_file=str(key_file))
    del entry["api_key_env"]
    catalog = Catalog.model_validate({"models": {"m": {"deployments": [entry]}}})
    caplog.set_level(logging.WARNING, logger="router.router")
    async with open_router(catalog, {}, settings) as router:
        [warned] = [record.getMessage() for record in caplog.records]
        with pytest.raises(AllProvidersFailed) as caught:
            await router.complete(chat("m"))

    # Expect the operator told which file and what to do, the job only that there is no key
    said = f"cannot read {key_file} (" if written is None else f"{key_file} is empty: "
    assert warned.startswith(f"deployment filed has no key: {said}")
    assert "read again at the next call" in warned
    assert f"filed: no_api_key: {NO_KEY}" in str(caught.value)
    assert str(tmp_path) not in everything_said(caught.value)
    assert mock.stats.calls == 0


async def test_no_key_value_appears_in_any_error(settings: Settings, mock: MockProvider) -> None:
    echo = {"error": {"message": f"Incorrect API key provided: {SENTINEL_KEY}", "code": "x"}}
    mock.configure(
        MockConfig(
            models={
                "primary-model": Behavior(error_rate=1.0, error_status=401, error_body=echo),
                "backup-model": Behavior(error_rate=1.0, error_status=400, error_body=echo),
            }
        )
    )
    async with open_router(primary_and_backup(mock.url), ENV, settings) as router:
        with pytest.raises(InvalidRequest) as echoed:
            await router.complete(chat("primary"))
    mock.configure(MockConfig(models={"backup-model": Behavior(timeout_rate=1.0, hang_s=5)}))
    unreachable = primary_and_backup(mock.url, api_base=f"http://127.0.0.1:{closed_port()}")
    async with open_router(unreachable, ENV, settings) as router:
        with pytest.raises(DeadlineExceeded) as lost:
            await router.complete(chat("primary"), deadline=time.monotonic() + 0.5)

    assert "[redacted]" in str(echoed.value)
    assert [a.error for a in echoed.value.attempts] == ["auth", "bad_request"]
    assert [a.error for a in lost.value.attempts] == ["connection", "connection", "timeout"]
    for failure in (echoed.value, lost.value):
        assert SENTINEL_KEY not in everything_said(failure)


# --- deadlines ---------------------------------------------------------------------------------


async def test_deadline_already_passed_calls_nothing(
    settings: Settings, mock: MockProvider, mock_catalog: Catalog
) -> None:
    async with open_router(mock_catalog, ENV, settings) as router:
        with pytest.raises(DeadlineExceeded) as caught:
            await router.complete(chat("gpt-4o-mini"), deadline=time.monotonic() - 1)

    assert caught.value.code == "deadline_exceeded"
    assert caught.value.attempts == []
    assert mock.stats.calls == 0


async def test_deadline_caps_the_call_and_stops_the_chain(
    settings: Settings, mock: MockProvider
) -> None:
    mock.configure(MockConfig(models={"primary-model": Behavior(timeout_rate=1.0, hang_s=10)}))
    catalog = primary_and_backup(mock.url, timeout=30)

    async with open_router(catalog, ENV, settings) as router:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded) as caught:
            await router.complete(chat("primary"), deadline=started + 0.3)
        elapsed = time.monotonic() - started

    assert 0.25 <= elapsed < 5  # cut at the deadline, not at the 10 s hang
    assert [(a.deployment, a.error) for a in caught.value.attempts] == [("primary-dep", "timeout")]
    assert "deadline passed after calling primary-dep" in str(caught.value)
    assert mock.stats.calls == 1


# --- router contract ---------------------------------------------------------------------------


async def test_check_refuses_unknown_models_and_fallbacks(
    settings: Settings, redis_client: aioredis.Redis, mock_catalog: Catalog
) -> None:
    router = Router(mock_catalog, ENV, redis=redis_client, keys=Keys(settings.redis_prefix))

    router.check(chat("gpt-4o-mini", fallbacks=["local-llama"]))
    with pytest.raises(UnknownModel, match="'gpt-9'"):
        router.check(chat("gpt-9"))
    with pytest.raises(UnknownModel, match=r"^fallbacks\.1: unknown model 'ghost'") as caught:
        router.check(chat("gpt-4o-mini", fallbacks=["local-llama", "ghost"]))
    assert caught.value.param == "fallbacks.1"  # named as the front door names it


async def test_router_must_be_open_to_complete_and_opens_once(
    settings: Settings, redis_client: aioredis.Redis, mock_catalog: Catalog
) -> None:
    router = Router(mock_catalog, ENV, redis=redis_client, keys=Keys(settings.redis_prefix))

    with pytest.raises(RuntimeError, match="not open"):
        await router.complete(chat("gpt-4o-mini"))
    async with router:
        pass
    with pytest.raises(RuntimeError, match="opened only once"):
        await router.__aenter__()


# --- the HTTP boundary and the classification table --------------------------------------------


async def test_a_call_whose_bound_came_due_while_the_worker_stalled_reads_its_answer() -> None:
    # Given calls bounded by 0.1 s, and the worker's loop stalled (stopped, or starved) from
    # 0.05 s to 0.55 s, the first call's answer coming in meanwhile: as the loop resumes, its
    # answer and its bound are both due, the answer first (as a socket's bytes come first)
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[str] = loop.create_future()
    never: asyncio.Future[str] = loop.create_future()

    async def call(reply: asyncio.Future[str]) -> str:
        async with time_limit(0.1):
            return await reply

    answered, unanswered = asyncio.create_task(call(answer)), asyncio.create_task(call(never))
    started = time.monotonic()
    loop.call_later(0.05, time.sleep, 0.5)
    loop.call_later(0.06, answer.set_result, "answered")

    # Expect the answer read, not the call cut (cut, a call the provider had served was billed
    # at its estimate); and a call with no answer cut a moment after the stall
    assert await answered == "answered"
    with pytest.raises(ProviderError) as caught:
        await unanswered
    assert caught.value.error_class == "timeout"
    assert time.monotonic() - started < 0.55 + 0.5

    # ... and a bound that comes due on time cuts its call then, stall or no stall before it
    started = time.monotonic()
    with pytest.raises(ProviderError):
        await call(loop.create_future())
    assert time.monotonic() - started < 0.1 + 0.2


async def test_rate_limit_is_classified_with_the_retry_after_the_provider_sent(
    mock: MockProvider,
) -> None:
    mock.configure(MockConfig(default=Behavior(rate_limit_rpm=1, retry_after=2.5)))
    request = OpenAIAdapter().build_request(chat("m"), "gpt-4o-mini", SENTINEL_KEY)

    async with Upstream(mock.url) as upstream, time_limit(5):
        await post(upstream, request, SENTINEL_KEY)
        with pytest.raises(ProviderError) as caught:
            await post(upstream, request, SENTINEL_KEY)

    error = caught.value
    assert (error.status, error.error_class, error.moves_on) == (429, "rate_limited", True)
    assert error.retry_after == 2.5


async def test_calls_past_the_pool_wait_for_a_connection_and_each_gives_it_back(
    mock: MockProvider,
) -> None:
    mock.configure(
        MockConfig(
            models={"slow": Behavior(latency_ms=100), "broken": Behavior(fail_first=1)},
        )
    )
    adapter = OpenAIAdapter()
    slow = adapter.build_request(chat("m"), "slow", SENTINEL_KEY)
    broken = adapter.build_request(chat("m"), "broken", SENTINEL_KEY)
    streamed = adapter.build_request(chat("m", stream=True), "slow", SENTINEL_KEY, stream=True)

    async with Upstream(mock.url, connections=2) as upstream, time_limit(10):

        async def held(request: UpstreamRequest) -> tuple[int, Any]:
            async with upstream.free:  # as the router's calls hold it
                return await post(upstream, request, SENTINEL_KEY)

        # Given two connections: six calls at once take three rounds, and all are answered.
        started = time.monotonic()
        answers = await asyncio.gather(*(held(slow) for _ in range(6)))
        elapsed = time.monotonic() - started
        # An error answer and a stream left after its first event give theirs back too.
        with pytest.raises(ProviderError):
            await held(broken)
        async with upstream.free, aclosing(events(upstream, streamed, SENTINEL_KEY)) as stream:
            await anext(stream)
        still = await asyncio.gather(*(held(slow) for _ in range(2)))

    assert [status for status, _ in answers + still] == [200] * 8
    assert elapsed >= 0.3


async def test_a_connection_that_does_not_open_within_the_connect_timeout_is_a_timeout() -> None:
    request = OpenAIAdapter().build_request(chat("m"), "gpt-4o-mini", SENTINEL_KEY)
    with socket.socket() as listener:
        # Given a listener that never accepts: once its queue is full, new connects just wait.
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        address = listener.getsockname()
        fillers = [socket.socket() for _ in range(4)]
        for filler in fillers:
            filler.setblocking(False)
            filler.connect_ex(address)
        try:
            async with Upstream(f"http://127.0.0.1:{address[1]}") as upstream, time_limit(5):
                started = time.monotonic()
                with pytest.raises(ProviderError) as caught:
                    await post(upstream, request, SENTINEL_KEY, connect=0.3)
        finally:
            for filler in fillers:
                filler.close()

    assert caught.value.error_class == "timeout"
    assert "connect timeout" in str(caught.value)
    assert time.monotonic() - started < 2


async def test_proxies_named_in_the_environment_are_not_used(
    mock: MockProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{closed_port()}")
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    request = OpenAIAdapter().build_request(chat("m"), "gpt-4o-mini", SENTINEL_KEY)

    async with Upstream(mock.url) as upstream, time_limit(5):
        status, _ = await post(upstream, request, SENTINEL_KEY)

    assert status == 200


@pytest.mark.parametrize(
    ("status", "error_class", "moves_on"),
    [
        (400, "bad_request", False),
        (422, "bad_request", False),
        (401, "auth", True),
        (403, "auth", True),
        (404, "not_found", True),
        (408, "timeout", True),
        (409, "server_error", True),
        (429, "rate_limited", True),
        (500, "server_error", True),
        (502, "server_error", True),
        (503, "overloaded", True),
        (529, "overloaded", True),
        (418, "bad_response", True),
    ],
)
def test_status_classification(status: int, error_class: str, moves_on: bool) -> None:
    assert classify(status) == error_class
    assert ProviderError(classify(status), status=status).moves_on is moves_on


def test_context_length_400_is_recognised_by_code_or_message() -> None:
    assert classify(400, "context_length_exceeded", "too long") == "context_length"
    assert classify(400, "invalid_request_error", "prompt is too long: 2 > 1") == "context_length"
    assert classify(400, None, "This model's maximum context length is 8192") == "context_length"
    assert classify(400, "invalid_request_error", "temperature: too hot") == "bad_request"
