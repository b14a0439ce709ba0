"""Admission through the whole gateway: buckets, budgets and fairness under concurrency."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import redis.asyncio as aioredis

import workers.admission.gate
from mockprovider import Behavior, MockConfig
from producer import GatewayClient
from queuegate.keys import Keys
from queuegate.messages import ChatJob, ChatMessage, ChatParams, ChatResult
from queuegate.registry import ModelLimits, TeamConfig, default_burst, set_team_config
from queuegate.settings import Settings
from queuegate.spend import NANO, current_month, ledger_spent, ledgers_in_force, to_nano
from router import load_catalog
from tests.support import Gateway, depth, running_gateway, wait_until
from tests.teams import register
from workers.admission import Admission, Ahead, Settlement
from workers.admission.estimate import IMAGE_TOKENS, Estimate, estimate, prompt_tokens
from workers.admission.gate import Ticket
from workers.admission.scripts import Call, Scripts

# 40 characters (the mock counts 10 prompt tokens) whose reply is longer than max_tokens, so
# every job really uses 10 + 11 = 21 tokens; the gateway estimates 10 + 3 + 11 = 24.
WORDS = [{"role": "user", "content": "ab " * 13 + "a"}]
MAX_TOKENS = 11
REAL_TOKENS = 21
ESTIMATE_ERROR = 3


def limited_deployment(tmp_path: Path, limits: str) -> Path:
    """A catalog of model small on one deployment with its provider account's ``limits``."""
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(
        f"""
models:
  small:
    deployments:
      - {{name: small-1, provider: openai, model: small, api_base: "${{QUEUEGATE_MOCK_URL}}",
         api_key_env: QUEUEGATE_MOCK_KEY, input_per_mtok: 1, output_per_mtok: 2, {limits}}}
"""
    )
    return catalog


def small_deployment(tmp_path: Path, *, rpm: int, burst: int) -> Path:
    """A catalog of one model served by one deployment with its provider account's limits."""
    return limited_deployment(tmp_path, f"rpm: {rpm}, burst: {burst}")


@asynccontextmanager
async def rate_limited_small(
    settings: Settings, tmp_path: Path, *, provider_burst: int, burst: int
) -> AsyncIterator[tuple[Gateway, GatewayClient]]:
    """A gateway whose one deployment and its provider both admit 600 requests a minute, the
    provider ``provider_burst`` at once and the deployment's bucket ``burst``; and a client."""
    provider = MockConfig(
        models={"small": Behavior(rate_limit_rpm=600, rate_limit_burst=provider_burst)}
    )
    catalog = small_deployment(tmp_path, rpm=600, burst=burst)
    async with (
        running_gateway(settings, catalog=catalog, mock_config=provider) as gw,
        gw.client("alpha") as client,
    ):
        yield gw, client


def round_trips(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The scripts of every admission round trip of jobs from now on, one list a round trip
    (not the worker's reads of its teams' bucket fills for its live stats, which peek)."""
    batches: list[list[str]] = []
    run_all = Scripts.run_all

    async def counted(self: Scripts, calls: Sequence[Call], **options: Any) -> list[list[int]]:
        if any(call.args[:1] != ["peek"] for call in calls):
            batches.append([call.script for call in calls])
        return await run_all(self, calls, **options)

    monkeypatch.setattr(Scripts, "run_all", counted)
    return batches


def undos(monkeypatch: pytest.MonkeyPatch) -> list[Ahead]:
    """Every undo of what rode with a claim made from now on (``Admission.undo``)."""
    made: list[Ahead] = []
    undo = Admission.undo

    def counted(self: Admission, ahead: Ahead, lost: Decimal) -> Settlement | None:
        made.append(ahead)
        return undo(self, ahead, lost)

    monkeypatch.setattr(Admission, "undo", counted)
    return made


async def at_once(client: GatewayClient, jobs: int) -> list[ChatResult]:
    """Submit ``jobs`` jobs of WORDS to model small, then wait for every result."""
    handles = [await client.submit(client.job("small", WORDS)) for _ in range(jobs)]
    return [await h.result(timeout=30) for h in handles]


async def test_concurrent_jobs_never_exceed_the_token_rate_in_any_window(
    settings: Settings,
) -> None:
    # Given team alpha limited to 1,000 tokens per minute
    capacity, rate = 1000, 1000 / 60
    await register(settings, "alpha", TeamConfig(tpm=capacity))
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        # When 50 jobs (1,050 tokens) arrive at once
        handles = [
            await client.submit(client.job("gpt-4o-mini", WORDS, max_tokens=MAX_TOKENS))
            for _ in range(50)
        ]
        results = [await h.result(timeout=30) for h in handles]

        # Expect every job served, and the tokens called in any window within the bucket's
        # capacity plus its refill over the window plus one job's estimate error
        assert {r.status for r in results} == {"ok"}
        assert {r.response["usage"]["total_tokens"] for r in results if r.response} == {21}
        times = sorted(call.t for call in gw.mock.requests)
        assert len(times) == 50
        for i, start in enumerate(times):
            for j in range(i, len(times)):
                admitted = (j - i + 1) * REAL_TOKENS
                assert admitted <= capacity + rate * (times[j] - start) + ESTIMATE_ERROR
        # and the last jobs did wait for the refill
        assert times[-1] - times[0] > 1.0


async def test_concurrent_jobs_never_overspend_a_budget(settings: Settings) -> None:
    # Given a budget worth exactly 20 jobs of gpt-4o-mini (10 input + 11 output tokens)
    job_cost = (10 * Decimal("0.15") + 11 * Decimal("0.60")) / 1_000_000
    budget = 20 * job_cost
    await register(settings, "alpha", TeamConfig(budget_usd=budget))
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        # When 100 jobs arrive at once (no fallback: the estimate uses gpt-4o-mini's price)
        handles = [
            await client.submit(
                client.job("gpt-4o-mini", WORDS, fallbacks=[], max_tokens=MAX_TOKENS)
            )
            for _ in range(100)
        ]
        results = [await h.result(timeout=30) for h in handles]

        # Expect at most 20 served, the rest refused without a provider call
        served = [r for r in results if r.status == "ok"]
        refused = [r for r in results if r.status == "error"]
        assert 1 <= len(served) <= 20
        assert {r.error.code for r in refused if r.error} == {"budget_exhausted"}
        assert gw.mock.stats.calls == len(served)
        # and PostgreSQL's spend within the budget
        await gw.usage_rows(100)
        spent = await gw.pool.fetchval("SELECT sum(cost_usd) FROM usage_log")
        assert spent <= budget


async def test_jobs_asking_for_several_choices_never_overspend_a_budget(
    settings: Settings,
) -> None:
    # Given a budget worth 20 jobs of gpt-4o-mini asking for 20 tokens (the estimate left
    # out the choices asked for: each cost 8 jobs, the provider billing them all)
    job_cost = (10 * Decimal("0.15") + 20 * Decimal("0.60")) / 1_000_000
    budget = 20 * job_cost
    await register(settings, "alpha", TeamConfig(budget_usd=budget))
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        # When 20 jobs arrive at once, each asking for 8 choices of 20 tokens
        handles = [
            await client.submit(client.job("gpt-4o-mini", WORDS, fallbacks=[], n=8, max_tokens=20))
            for _ in range(20)
        ]
        results = [await h.result(timeout=30) for h in handles]
        await gw.usage_rows(20)
        spent = await gw.pool.fetchval("SELECT sum(cost_usd) FROM usage_log")

    # Expect at most a few served, and PostgreSQL's spend within the budget
    assert 1 <= sum(r.status == "ok" for r in results) <= 3
    assert spent <= budget


async def test_jobs_held_back_by_each_others_reservations_wait_for_them_and_are_all_served(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given a budget worth 8 jobs' estimates of gpt-4o-mini asking for up to 4,000 tokens,
    # and a provider answering each with 11 (a job really costs 1/300 of its estimate), slow
    # enough that the worker's 32 jobs are in flight at once
    estimate_usd = (13 * Decimal("0.15") + 4000 * Decimal("0.60")) / 1_000_000
    budget = 8 * estimate_usd
    await register(settings, "alpha", TeamConfig(budget_usd=budget))
    slow = MockConfig(models={"gpt-4o-mini": Behavior(latency_ms=20)})
    async with running_gateway(settings, mock_config=slow) as gw, gw.client("alpha") as client:
        # When 300 such jobs arrive at once (their estimates together 37 budgets)
        handles = [
            await client.submit(client.job("gpt-4o-mini", WORDS, fallbacks=[], max_tokens=4000))
            for _ in range(300)
        ]
        results = [await h.result(timeout=60) for h in handles]

        # Expect none refused: each waited for the others' reservations, never more than the
        # settled spend, far under the budget, would refuse it; every one called once
        assert [r.error.code for r in results if r.error] == []
        assert gw.mock.stats.calls == 300
        # and the spend (PostgreSQL's, and the ledger's with nothing reserved any more) within
        # the budget
        await gw.usage_rows(300)
        spent = await gw.pool.fetchval("SELECT sum(cost_usd) FROM usage_log")
        assert spent <= budget
        keys, month = Keys(settings.redis_prefix), current_month()
        ledger = await redis_client.hmget(keys.spend("alpha", month), ["reserved"])
        assert ledger == [b"0"]


async def test_a_job_held_back_by_reservations_past_its_deadline_is_answered_deadline_exceeded(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given team alpha's budget held whole by the reservation of a job in flight (nothing
    # settled against it)
    await register(settings, "alpha", TeamConfig(budget_usd=Decimal("0.001")))
    keys = Keys(settings.redis_prefix)
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        admission = gw.worker.admission
        assert admission is not None
        # (the month's ledger made by a job served, as the reserve below needs it made)
        assert (await client.chat("gpt-4o-mini", WORDS, fallbacks=[])).status == "ok"
        holder = client.job("gpt-4o-mini", WORDS, fallbacks=[], max_tokens=1600)
        ahead = admission.ahead(holder)
        assert ahead is not None
        [spend, *_] = await Scripts(redis_client, keys).run_all(ahead.calls)
        assert spend[0] == 0

        # When a job with a deadline 1.5 s away asks for it
        started = time.monotonic()
        waiting = await client.submit(
            client.job("gpt-4o-mini", WORDS, fallbacks=[], deadline=timedelta(seconds=1.5))
        )

        # Expect a job arriving meanwhile to go behind it: neither reserved with its claim
        # nor its first call recorded there, as it will wait too
        newcomer = client.job("gpt-4o-mini", WORDS, fallbacks=[])
        await wait_until(lambda: admission.ahead(newcomer) is None, timeout=1.4)
        deployment = load_catalog(None, {}).models["gpt-4o-mini"].deployments[0]
        assert admission.straight(newcomer, deployment) is None
        # ... and the waiting job answered deadline_exceeded at its deadline, not refused for
        # its budget at once, nor called
        result = await waiting.result(timeout=10)
    assert result.error is not None and result.error.code == "deadline_exceeded"
    assert time.monotonic() - started >= 1.4
    assert gw.mock.stats.calls == 1


@pytest.mark.parametrize(
    ("asked", "output"),
    [({"n": 8, "max_tokens": 20}, 160), ({"max_completion_tokens": 900}, 900), ({"n": 3}, 768)],
)
def test_a_jobs_estimate_holds_every_choice_and_the_completion_limit_it_asks_for(
    asked: dict[str, int], output: int
) -> None:
    job = ChatJob(job_id="j", team="alpha", model="gpt-4o-mini", messages=WORDS, params=asked)
    catalog = load_catalog(None, {"QUEUEGATE_MOCK_URL": "http://127.0.0.1:9"})
    assert estimate(job, catalog, TeamConfig(), 256).output_tokens == output


SCHEMA = {
    "type": "json_schema",
    "json_schema": {"name": "s", "schema": {"description": "q" * 40_000}},
}
"""A response format whose schema the provider bills as 10,000 prompt tokens."""


@pytest.mark.parametrize(
    "sent",
    [
        {"response_format": SCHEMA},
        {"functions": [{"name": "f", "description": "q" * 40_000}]},
        {"prediction": {"type": "content", "content": "q" * 40_000}},
        {"stop": ["q" * 10_000] * 4},
        {"something_new": "q" * 40_000},
    ],
    ids=["response_format", "functions", "prediction", "stop", "an unknown parameter"],
)
def test_a_jobs_estimate_counts_what_its_parameters_send_the_provider(sent: dict[str, Any]) -> None:
    # Given a job, and the same job sending 40,000 characters more in a parameter
    catalog = load_catalog(None, {"QUEUEGATE_MOCK_URL": "http://127.0.0.1:9"})
    plain = ChatJob(job_id="j", team="alpha", model="gpt-4o-mini", messages=WORDS)
    more = plain.model_copy(update={"params": ChatParams(**sent)})
    # Expect its prompt estimated at 10,000 tokens more, as the provider bills it
    added = (
        e.prompt_tokens for e in (estimate(j, catalog, TeamConfig(), 256) for j in (plain, more))
    )
    assert -next(added) + next(added) >= 10_000


@pytest.mark.parametrize(
    "message",
    [
        {"role": "user", "content": "hi", "name": "x" * 40_000},
        {"role": "assistant", "content": "no", "refusal": "x" * 40_000},
    ],
    ids=["name", "refusal"],
)
def test_a_jobs_estimate_counts_every_field_its_messages_send(message: dict[str, Any]) -> None:
    # Given a job, and the same job with a message holding 40,000 characters more in a
    # field beside its content (a name OpenAI bills, a refusal given back)
    catalog = load_catalog(None, {"QUEUEGATE_MOCK_URL": "http://127.0.0.1:9"})
    plain = ChatJob(job_id="j", team="alpha", model="gpt-4o-mini", messages=WORDS)
    more = plain.model_copy(update={"messages": [*plain.messages, ChatMessage(**message)]})
    # Expect its prompt estimated at 10,000 tokens more
    before, after = (estimate(j, catalog, TeamConfig(), 256) for j in (plain, more))
    assert after.prompt_tokens - before.prompt_tokens >= 10_000


CJK = "\u65e5\u672c\u8a9e\u306e\u6587\u7ae0" * 2_000
"""12,000 CJK characters, each a token or more at the providers."""


@pytest.mark.parametrize(
    "content",
    [CJK, [{"type": "text", "text": CJK}], "\U0001f600" * 12_000],
    ids=["CJK text", "CJK in a content part", "emoji"],
)
def test_text_of_other_scripts_is_estimated_near_what_providers_bill(content: object) -> None:
    # Given a job of 12,000 characters of CJK text or emoji (as a string, or a content
    # part), which the providers bill at about a token each, or more
    job = ChatJob(
        job_id="j",
        team="alpha",
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": content}],
    )
    # Expect it estimated at three quarters of a token a character or more (before, as a
    # string: characters / 4, 3,000 tokens, which let a team pass its tpm and budget fourfold)
    assert prompt_tokens(job) >= 9_000


def test_an_image_by_url_is_estimated_at_the_most_a_provider_bills_for_one() -> None:
    # Given a job with three images given by URL, and one inline
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    inline = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    content = [{"type": "text", "text": "what are these?"}, image, image, image, inline]
    job = ChatJob(
        job_id="j",
        team="alpha",
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": content}],
    )
    # Expect each image by URL estimated at IMAGE_TOKENS, the inline one by its characters
    assert 3 * IMAGE_TOKENS < prompt_tokens(job) < 3 * IMAGE_TOKENS + 100


PHOTO = {
    "type": "image_url",
    "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(bytes(600_000)).decode()},
}
"""A 600 KB photo sent inline, which the providers bill at most about 2,700 tokens."""


def test_an_inline_image_is_estimated_at_no_more_than_an_image_is_billed() -> None:
    job = ChatJob(
        job_id="j",
        team="alpha",
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": [{"type": "text", "text": "what is it?"}, PHOTO]}],
    )
    # Before: by its 800,000 characters, 200,000 tokens
    assert IMAGE_TOKENS <= prompt_tokens(job) < IMAGE_TOKENS + 100


async def test_an_inline_photo_passes_a_tpm_smaller_than_its_bytes(settings: Settings) -> None:
    # Given a team with a tpm of 100,000
    await register(settings, "alpha", TeamConfig(tpm=100_000))
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        # When it asks about a 600 KB photo sent inline (200,000 tokens by its bytes / 4)
        content = [{"type": "text", "text": "what is it?"}, PHOTO]
        job = client.job("gpt-4o-mini", [{"role": "user", "content": content}], max_tokens=10)
        result = await (await client.submit(job)).result(timeout=30)

    # Expect it answered (before: refused as larger than the team's bucket), and called once
    assert result.status == "ok", result.error
    assert gw.mock.stats.calls == 1


async def test_a_job_whose_response_format_passes_its_budget_is_refused_uncalled(
    settings: Settings,
) -> None:
    # Given a team whose budget holds a small job of gpt-4o-mini, not 10,000 prompt tokens
    await register(settings, "alpha", TeamConfig(budget_usd=Decimal("0.001")))
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        # When a job asks for a response format whose schema is 40,000 characters
        job = client.job("gpt-4o-mini", WORDS, fallbacks=[], max_tokens=10, response_format=SCHEMA)
        result = await (await client.submit(job)).result(timeout=30)

    # Expect it refused for its budget, and no call made
    assert result.error is not None and result.error.code == "budget_exhausted"
    assert gw.mock.stats.calls == 0


def test_a_jobs_estimate_leaves_out_the_fallbacks_its_team_caps() -> None:
    # Given a job of gpt-4o-mini, whose fallback claude-haiku is dearer
    job = ChatJob(job_id="j", team="alpha", model="gpt-4o-mini", messages=WORDS)
    catalog = load_catalog(None, {"QUEUEGATE_MOCK_URL": "http://127.0.0.1:9"})
    alone = estimate(job.model_copy(update={"fallbacks": []}), catalog, TeamConfig(), 256)
    assert estimate(job, catalog, TeamConfig(), 256).cost_nano > alone.cost_nano
    # When its team caps claude-haiku, which it then never falls back to (Router.complete)
    capped = TeamConfig(models={"claude-haiku": ModelLimits(budget_usd=Decimal(1))})
    # Expect it priced at gpt-4o-mini's alone: it was refused for claude-haiku's price
    assert estimate(job, catalog, capped, 256) == alone


MARKED = {"type": "ephemeral", "ttl": "1h"}


@pytest.mark.parametrize(
    "marked",
    [
        [
            {
                "role": "system",
                "content": [{"type": "text", "text": "x" * 4000, "cache_control": MARKED}],
            }
        ],
        [{"role": "user", "content": "x" * 4000, "cache_control": MARKED}],
    ],
    ids=["content part", "message"],
)
def test_a_job_marking_a_prompt_cache_is_priced_as_written_to_it(marked: list[Any]) -> None:
    # Given claude-haiku, whose cache writes cost 1.25 (5 min) and 2 (1 h) times its input
    catalog = load_catalog(None, {"QUEUEGATE_MOCK_URL": "http://127.0.0.1:9"})
    [deployment] = catalog.models["claude-haiku"].deployments
    job = ChatJob(job_id="j", team="alpha", model="claude-haiku", messages=[*marked, *WORDS])
    unmarked_messages = [{"role": "user", "content": "x" * 4000}, *WORDS]
    plain = ChatJob(job_id="j", team="alpha", model="claude-haiku", messages=unmarked_messages)
    # When each is estimated
    cached, unmarked = (estimate(j, catalog, TeamConfig(), 256) for j in (job, plain))
    # Expect the marked prompt priced at the dearest write (before: as input, half of what
    # an hour's write cost, and a team went 31 % past its budget)
    assert deployment.cache_write_1h_per_mtok == 2 * deployment.input_per_mtok
    prompt_usd = Decimal(cached.prompt_tokens) * deployment.input_per_mtok / 1_000_000
    assert cached.cost_nano - unmarked.cost_nano >= to_nano(prompt_usd) - 1
    assert (
        cached.usd_at(deployment)
        == (
            cached.prompt_tokens * deployment.cache_write_1h_per_mtok
            + cached.output_tokens * deployment.output_per_mtok
        )
        / 1_000_000
    )


@pytest.mark.parametrize("deadline", [None, timedelta(seconds=30)], ids=["no_deadline", "deadline"])
async def test_a_served_jobs_claim_and_admission_take_three_round_trips_and_leave_its_real_usage(
    settings: Settings,
    redis_client: aioredis.Redis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    deadline: timedelta | None,
) -> None:
    # Given team alpha with a token bucket and a budget, on a deployment with a token limit
    await register(settings, "alpha", TeamConfig(tpm=1000, budget_usd=Decimal(1)))
    catalog = limited_deployment(tmp_path, "tpm: 1000")
    batches = round_trips(monkeypatch)
    undone = undos(monkeypatch)
    async with running_gateway(settings, catalog=catalog) as gw, gw.client("alpha") as client:
        # When one job is served (a deadline it is well within changes nothing)
        began = time.monotonic()
        result = await client.chat(
            "small", WORDS, max_tokens=MAX_TOKENS, timeout=10, deadline=deadline
        )
        took = time.monotonic() - began
        assert result.status == "ok"

    # Expect three round trips: the claim with the budget's reservation and the team bucket's
    # take (then a reservation of its own when the first finds no ledger for the month, which
    # is then rebuilt from PostgreSQL, unless accounting's reconciliation made it first), the
    # deployment bucket's take with the call's record in the claim, then the outcome's store
    # with every settle (both buckets' tokens in one call, the budget's cost)
    after = [["take", "hold"], ["finish", "take", "spend"]]
    assert batches[0] == ["claim", "spend", "take"]
    assert batches[1:] in (after, [["spend", "take"], *after])
    # ... whose admission took over what rode with the claim: no undo of it was made
    assert undone == []
    # ... and the counters at what the job really used, not at its estimate: the budget at
    # its cost (10 input tokens at $1/M, 11 output at $2/M), each bucket 21 tokens down,
    # give or take the refill of 1,000 a minute over the time the job took (more than a
    # token on a loaded machine)
    keys = Keys(settings.redis_prefix)
    spent = await ledger_spent(redis_client, keys, "alpha", current_month())
    assert spent == Decimal(32_000) / NANO
    for bucket in (keys.team_bucket("alpha"), keys.deployment_bucket("small-1")):
        tokens = await redis_client.hget(bucket, "t")
        assert tokens is not None
        assert 1000 - REAL_TOKENS <= float(tokens) <= 1000 - REAL_TOKENS + 1000 / 60 * took


@asynccontextmanager
async def governed_after_a_job(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limits: str
) -> AsyncIterator[tuple[Gateway, GatewayClient]]:
    """A gateway serving team alpha with buckets (600 requests, 1,000 tokens a minute) and a
    budget, on a deployment with ``limits`` of its own, once it served a job of alpha's (the
    deployment's health trusted, a connection to it free); and alpha's client."""
    await register(settings, "alpha", TeamConfig(rpm=600, tpm=1000, budget_usd=Decimal(1)))
    catalog = limited_deployment(tmp_path, limits)
    # (its closed circuit trusted for the test, not 50 ms: no round trip to ask before a call)
    monkeypatch.setattr("router.health.TRUST_CLOSED", 600.0)
    async with running_gateway(settings, catalog=catalog) as gw, gw.client("alpha") as client:
        assert (await client.chat("small", WORDS, max_tokens=MAX_TOKENS)).status == "ok"
        yield gw, client


async def test_a_governed_jobs_deployment_take_and_call_record_ride_with_its_claim(
    settings: Settings,
    redis_client: aioredis.Redis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given team alpha with buckets and a budget, on a deployment with limits of its own (each
    # bucket 10 requests a second, a burst of 10, and 1,000 tokens a minute), and a job served
    # already
    keys = Keys(settings.redis_prefix)
    buckets = [keys.team_bucket("alpha"), keys.deployment_bucket("small-1")]
    began = time.monotonic()
    limits = "rpm: 600, tpm: 1000, burst: 10"
    async with governed_after_a_job(settings, tmp_path, monkeypatch, limits) as (_, client):
        spent = await ledger_spent(redis_client, keys, "alpha", current_month())
        before = [await redis_client.hmget(bucket, ["r", "t"]) for bucket in buckets]
        batches = round_trips(monkeypatch)
        undone = undos(monkeypatch)

        # When the next job is served
        assert (await client.chat("small", WORDS, max_tokens=MAX_TOKENS)).status == "ok"
        after = [await redis_client.hmget(bucket, ["r", "t"]) for bucket in buckets]
        took = time.monotonic() - began

    # Expect two round trips: the claim with the budget's reservation, the team's and the
    # deployment's takes and the call's record; then the outcome's store with every settle
    # (both buckets' tokens back in one call)
    assert batches == [
        ["claim", "spend", "take", "take", "hold"],
        ["finish", "take", "spend"],
    ]
    assert undone == []
    # ... each bucket a request and the job's real tokens down, not its estimate (give or
    # take the refill since the first job's writes), and the budget at its cost (10 input
    # tokens at $1/M, 11 output at $2/M)
    for (requests, tokens), (requests_now, tokens_now) in zip(before, after, strict=True):
        assert float(requests) - 1 <= float(requests_now) <= float(requests) - 1 + 10 * took
        down = float(tokens) - REAL_TOKENS
        assert down <= float(tokens_now) <= down + 1000 / 60 * took
    spent_now = await ledger_spent(redis_client, keys, "alpha", current_month())
    assert spent_now - spent == Decimal(32_000) / NANO


async def test_a_job_ended_after_its_claim_gives_back_the_deployments_take_that_rode_with_it(
    settings: Settings,
    redis_client: aioredis.Redis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a batch of team alpha's canceled, alpha's buckets and budget, a deployment whose
    # own buckets take minutes to refill what a job takes (6 requests and 100 tokens a
    # minute), and a job served already
    limits = "rpm: 6, tpm: 100, burst: 6"
    async with governed_after_a_job(settings, tmp_path, monkeypatch, limits) as (gw, client):
        keys = Keys(settings.redis_prefix)
        await redis_client.set(keys.batch_canceled("alpha", "gone"), 1)
        bucket = keys.deployment_bucket("small-1")
        before = await redis_client.hmget(bucket, ["r", "t"])
        batches = round_trips(monkeypatch)
        undone = undos(monkeypatch)

        # When a job of the batch is claimed, with its budget's reservation and its team's and
        # the deployment's takes, then ends on the cancel before admission
        job = client.job("small", WORDS, max_tokens=MAX_TOKENS, metadata={"batch": "gone"})
        result = await (await client.submit(job)).result(timeout=10)
        assert result.error is not None and result.error.code == "canceled"
        after = await redis_client.hmget(bucket, ["r", "t"])
        assert gw.mock.stats.calls == 1

    # Expect the undo in the outcome's store to give the deployment its request and every
    # estimated token back (what it holds only refilled since)
    assert batches[0] == ["claim", "spend", "take", "take", "hold"]
    # (the team's request and tokens back in one take, the deployment's in another)
    assert batches[1] == ["finish", "take", "take", "spend"]
    assert len(undone) == 1
    assert float(after[0]) >= float(before[0])
    assert float(after[1]) >= float(before[1])


async def test_a_deployment_take_that_rode_with_the_claim_goes_back_when_the_call_goes_elsewhere(
    settings: Settings, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    # Given model small on two deployments, each with buckets that take minutes to refill what
    # a job takes (6 requests and 100 tokens a minute), and a job's take of the first, as its
    # claim made it
    catalog = tmp_path / "catalog.yaml"
    deployment = """
      - {name: small-N, provider: openai, model: small, api_base: "${QUEUEGATE_MOCK_URL}",
         api_key_env: QUEUEGATE_MOCK_KEY, input_per_mtok: 1, output_per_mtok: 2, rpm: 6,
         tpm: 100, burst: 6}"""
    entries = "".join(deployment.replace("small-N", f"small-{n}") for n in (1, 2))
    catalog.write_text(f"models:\n  small:\n    deployments:{entries}\n")
    env = {"QUEUEGATE_MOCK_URL": "http://127.0.0.1:9", "QUEUEGATE_MOCK_KEY": "sk-test"}
    first, second = load_catalog(catalog, env).resolve("small").deployments
    keys = Keys(settings.redis_prefix)
    needed = Estimate(prompt_tokens=10, output_tokens=14, cost_nano=0, room_nano=0)
    async with running_gateway(settings, catalog=catalog) as gw:
        admission = gw.worker.admission
        assert admission is not None
        taken = admission.deployment_limit(first)
        assert taken is not None
        assert (await admission.take([taken], needed.tokens, 0, time.monotonic() + 10)).taken
        ticket = Ticket(admission, "alpha", needed, time.monotonic() + 10)
        ticket.deployment_ahead = taken

        # When its call enters the second deployment instead (the router went elsewhere)
        await ticket.enter(second)
        buckets = [keys.deployment_bucket("small-1"), keys.deployment_bucket("small-2")]
        levels = [[float(v) for v in await redis_client.hmget(b, ["r", "t"])] for b in buckets]

    # Expect the first's request and tokens back (full again), the second's taken
    assert levels[0] == [6, 100]
    assert 5 <= levels[1][0] < 5.5
    assert 76 <= levels[1][1] < 80


async def test_a_reservation_lapses_soon_after_its_jobs_deadline_not_a_time_limit_later(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given team alpha with a budget, and the reservations of two jobs held (waiting for the
    # team's rate limit) by a worker that then died: one whose deadline passed 11 s ago (it
    # expired in its queue: no delivery comes back to settle it), one without a deadline
    await register(settings, "alpha", TeamConfig(budget_usd=Decimal(1)))
    keys, month = Keys(settings.redis_prefix), current_month()
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        admission = gw.worker.admission
        assert admission is not None
        # (the month's ledger made by a job served, as the reserves below need it made)
        assert (await client.chat("gpt-4o-mini", WORDS)).status == "ok"
        [before] = await ledgers_in_force(redis_client, keys, "alpha", month, [None])
        assert before is not None
        passed = datetime.now(UTC) - timedelta(seconds=11)
        jobs = [client.job("gpt-4o-mini", WORDS, deadline=passed), client.job("gpt-4o-mini", WORDS)]
        reserved = []
        for job in jobs:
            ahead = admission.ahead(job)
            assert ahead is not None
            [spend, *_] = await Scripts(redis_client, keys).run_all(ahead.calls)
            assert spend[0] == 0
            reserved.append(ahead.estimate.cost_nano)

        # When the team's ledger is read as the next reserve compares it with the budget
        in_force = await ledgers_in_force(redis_client, keys, "alpha", month, [None])

    # Expect the expired job's reservation lapsed already (its deadline and 10 s), not
    # counted until its time limit and a minute (26 min); the other's still counted
    assert in_force == [before + reserved[1]]


async def test_a_duplicate_finding_the_job_busy_leaves_its_owners_budget_entry_alone(
    settings: Settings,
    redis_client: aioredis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given team alpha with a budget, a call far longer than a duplicate may wait for it
    # (and deliveries to spare)
    await register(settings, "alpha", TeamConfig(budget_usd=Decimal(1)))
    settings = settings.model_copy(update={"claim_wait": 0.2, "delivery_limit": 50})
    slow = MockConfig(default=Behavior(latency_ms=1500))
    caplog.set_level(logging.INFO, logger="workers.processor")
    keys = Keys(settings.redis_prefix)
    ledger = keys.spend("alpha", current_month())
    async with running_gateway(settings, mock_config=slow) as gw, gw.client("alpha") as client:
        # When one job is published twice at once, and the duplicate goes back to its queue
        # while the first delivery is in its call
        job = client.job("gpt-4o-mini", WORDS, fallbacks=[], max_tokens=MAX_TOKENS)
        handles = await asyncio.gather(client.submit(job), client.submit(job))
        await wait_until(lambda: any("past the wait" in r.getMessage() for r in caplog.records))
        entry = await redis_client.hget(ledger, f"j:{job.job_id}")
        assert gw.mock.stats.calls == 0  # the owner still in its call (counted once answered)

        # Expect the owner's reservation still in the ledger (a duplicate reserving under the
        # job's id, then undoing it, would have replaced and deleted it), and the job billed
        # once: its real cost (10 input tokens at $0.15/M, 11 output at $0.60/M)
        assert entry is not None and int(entry) > 0
        result = await handles[0].result(timeout=30)
        assert result.status == "ok"
        await wait_until(lambda: client.duplicates == 1, timeout=30)
        assert gw.mock.stats.calls == 1
        spent = await ledger_spent(redis_client, keys, "alpha", current_month())
        assert spent == (10 * Decimal("0.15") + 11 * Decimal("0.60")) / 1_000_000
        assert len(await gw.usage_rows(1)) == 1


async def test_a_job_ended_after_its_claim_gives_back_what_rode_with_the_claim(
    settings: Settings, redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given team alpha with a budget and buckets that take minutes to refill what a job takes
    # (6 requests and 100 tokens a minute), and a batch of its canceled before a worker takes
    # its job
    await register(settings, "alpha", TeamConfig(rpm=6, tpm=100, budget_usd=Decimal(1)))
    keys = Keys(settings.redis_prefix)
    await redis_client.set(keys.batch_canceled("alpha", "gone"), 1)
    batches = round_trips(monkeypatch)
    undone = undos(monkeypatch)
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        # When its job is claimed, its budget reserved and its team's buckets taken in the
        # claim's round trip, then it ends on the cancel before admission
        job = client.job("gpt-4o-mini", WORDS, max_tokens=MAX_TOKENS, metadata={"batch": "gone"})
        result = await (await client.submit(job)).result(timeout=10)
        assert result.error is not None and result.error.code == "canceled"
        bucket = await redis_client.hmget(keys.team_bucket("alpha"), ["r", "t"])
        spent = await ledger_spent(redis_client, keys, "alpha", current_month())
        assert gw.mock.stats.calls == 0

    # Expect the undo in the outcome's store: the request and every estimated token back in
    # the team's bucket, full again, and the budget's entry of the job at nothing
    assert batches[0] == ["claim", "spend", "take"]
    assert batches[1] == ["finish", "take", "spend"]  # request and tokens in one take
    assert len(undone) == 1
    assert [float(level or 0) for level in bucket] == [default_burst(6), 100]
    assert spent == 0


async def test_a_flooding_team_does_not_hold_up_a_trickling_one(settings: Settings) -> None:
    # Given team alpha limited to 30 requests per minute, and team beta without limits
    await register(settings, "alpha", TeamConfig(rpm=30))
    await register(settings, "beta", TeamConfig())
    quick = settings.model_copy(update={"shutdown_grace": 0.2})
    async with (
        running_gateway(quick, teams=("alpha", "beta")) as gw,
        gw.client("alpha") as alpha,
        gw.client("beta") as beta,
    ):
        # When alpha floods its queue with 100 jobs and beta sends 5, one at a time
        flood = [await alpha.submit(alpha.job("gpt-4o-mini", WORDS)) for _ in range(100)]
        trickle = [await beta.chat("gpt-4o-mini", WORDS, timeout=10) for _ in range(5)]

        # Expect beta's jobs all served while most of alpha's still wait in its queue
        assert {r.status for r in trickle} == {"ok"}
        connection = await aio_pika.connect(settings.amqp_url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(gw.topology.team_queue("alpha"), passive=True)
            assert queue.declaration_result.message_count is not None
            assert queue.declaration_result.message_count > 0
        assert len(flood) == 100
        assert gw.mock.stats.calls <= 30 + 5 + 1


async def test_a_job_that_cannot_be_admitted_in_time_is_answered_rate_limited(
    settings: Settings,
) -> None:
    # Given team alpha allowed 1 request per minute, whose one request is spent
    await register(settings, "alpha", TeamConfig(rpm=1))
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        first = await client.chat("gpt-4o-mini", WORDS, timeout=10)

        # When a second job with a 2-second deadline arrives
        handle = await client.submit(
            client.job("gpt-4o-mini", WORDS, deadline=timedelta(seconds=2))
        )
        second = await handle.result(timeout=10)

        # Expect it answered rate_limited at once, with the wait it would have needed
        assert first.status == "ok"
        assert second.error is not None and second.error.code == "rate_limited"
        assert second.error.retry_after_ms is not None and second.error.retry_after_ms > 50_000
        assert gw.mock.stats.calls == 1


async def test_a_team_over_its_rate_waits_for_the_refill_instead_of_failing(
    settings: Settings,
) -> None:
    # Given team alpha allowed 120 requests per minute (two a second) and all 120 at once,
    # all spent
    await register(settings, "alpha", TeamConfig(rpm=120, burst=120))
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        first = [await client.submit(client.job("gpt-4o-mini", WORDS)) for _ in range(120)]
        await asyncio.gather(*(h.result(timeout=10) for h in first))

        # When two more jobs arrive
        late = [await client.submit(client.job("gpt-4o-mini", WORDS)) for _ in range(2)]
        results = [await h.result(timeout=10) for h in late]

        # Expect both served once the bucket refilled, not refused
        assert {r.status for r in results} == {"ok"}
        assert gw.mock.stats.calls == 122


async def test_a_new_rpm_limit_starts_with_a_few_seconds_of_requests_not_a_minute(
    settings: Settings,
) -> None:
    # Given team alpha newly limited to 600 requests per minute (its default burst: 5 s, 50)
    await register(settings, "alpha", TeamConfig(rpm=600))
    holding = settings.model_copy(update={"prefetch": 200})  # every job reaches the worker
    async with running_gateway(holding) as gw, gw.client("alpha") as client:
        # When 150 jobs arrive at once, each allowed to wait 2 s for admission
        window = timedelta(seconds=2)
        jobs = [client.job("gpt-4o-mini", WORDS, deadline=window) for _ in range(150)]
        handles = [await client.submit(job) for job in jobs]
        results = [await h.result(timeout=30) for h in handles]

    # Expect the burst and what 2 s of the rate refill admitted (50 + 20, not 150) called,
    # the rest refused without a call: no 60 s window starting on a full bucket can start
    # more than rpm + burst
    codes = {r.error.code for r in results if r.error is not None}
    assert 50 <= gw.mock.stats.calls <= 50 + 20 + 1
    assert codes <= {"rate_limited", "deadline_exceeded"}
    assert sum(r.status == "ok" for r in results) <= gw.mock.stats.calls


async def test_a_deployments_own_limit_holds_across_teams(
    settings: Settings, tmp_path: Path
) -> None:
    # Given a deployment whose provider account allows 2 requests per minute, both at once,
    # used by two teams that have no limits of their own
    catalog = small_deployment(tmp_path, rpm=2, burst=2)
    async with (
        running_gateway(settings, teams=("alpha", "beta"), catalog=catalog) as gw,
        gw.client("alpha") as alpha,
        gw.client("beta") as beta,
    ):
        # When each team sends one job, then beta a third with a 2-second deadline
        first = await alpha.chat("small", WORDS, timeout=10)
        second = await beta.chat("small", WORDS, timeout=10)
        third = await beta.chat("small", WORDS, timeout=10, deadline=timedelta(seconds=2))

        # Expect the first two served and the third never sent to the provider
        assert (first.status, second.status) == ("ok", "ok")
        assert third.error is not None and third.error.code == "rate_limited"
        assert "deployment small-1" in third.error.message
        assert gw.mock.stats.calls == 2


async def test_jobs_waiting_for_a_deployment_go_at_its_pace_without_meeting_a_429(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a provider that enforces 600 requests a minute over short periods (10 a second,
    # 5 at once), and a deployment that says so: rpm 600, burst 2
    async with rate_limited_small(settings, tmp_path, provider_burst=5, burst=2) as (
        gw,
        client,
    ):
        admission = gw.worker.admission
        assert admission is not None
        takes = 0
        take = admission._buckets.take  # counted: waiting jobs must not poll Redis

        async def counted(*args: Any, **kwargs: Any) -> Any:
            nonlocal takes
            takes += 1
            return await take(*args, **kwargs)

        monkeypatch.setattr(admission._buckets, "take", counted)

        # When 20 jobs arrive at once
        results = await at_once(client, 20)

        # Expect all served without a 429, the calls at the rate after the burst of 2
        assert {r.status for r in results} == {"ok"}
        assert gw.mock.stats.by_status == {200: 20}
        times = sorted(call.t for call in gw.mock.requests)
        assert times[-1] - times[0] >= (20 - 2) / 10 - 0.1
        # and at most two takes per job: one on arrival (unless jobs wait in line already),
        # one in its turn, when the bucket has its request again (the job ahead says when)
        assert takes <= 2 * 20


async def test_a_burst_set_higher_than_the_provider_allows_costs_429s_but_no_failed_job(
    settings: Settings, tmp_path: Path
) -> None:
    # Given a provider that admits 600 requests a minute, 3 at once, and a deployment whose
    # burst says 30
    async with rate_limited_small(settings, tmp_path, provider_burst=3, burst=30) as (
        gw,
        client,
    ):
        # When 20 jobs arrive at once
        results = await at_once(client, 20)

        # Expect the provider's 429s to slow the deployment to its rate (they empty its
        # bucket), so each job's retry is admitted in time and every job is served
        assert {r.status for r in results} == {"ok"}
        assert gw.mock.stats.by_status[200] == 20


async def test_the_jobs_of_teams_served_unregistered_share_one_config(settings: Settings) -> None:
    # Given a worker serving two teams the registry does not hold (named with --teams)
    async with running_gateway(settings, teams=("alpha", "beta")) as gw:
        admission = gw.worker.admission
        assert admission is not None

        # When jobs of each ask for their team's config
        configs = [admission.config(team) for team in ("alpha", "alpha", "beta")]

    # Expect one config, without limits, for all: each job holds its team's until it ends,
    # and one made for each was 0.8 KB a job (4 MB with 5,000 held)
    assert configs[0] is configs[1] is configs[2]
    assert configs[0] == TeamConfig()


async def _set_limits(gw: Gateway, team: str, config: TeamConfig) -> float:
    """Set ``team``'s config and wait for the worker's registry to hold it; when it did."""
    admission = gw.worker.admission
    assert admission is not None and await set_team_config(gw.pool, team, config)
    await wait_until(lambda: admission.config(team) == config)
    return time.monotonic()


async def test_a_raised_rpm_lets_the_jobs_waiting_under_the_old_one_go_at_the_new_rate(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given team alpha allowed 6 requests a minute, one at a time (one every 10 s), and 6
    # jobs in its worker: the first called, the second's turn reserved 10 s ahead, the
    # rest in line behind it
    await register(settings, "alpha", TeamConfig(rpm=6, burst=1))
    bucket = Keys(settings.redis_prefix).team_bucket("alpha")
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        handles = [await client.submit(client.job("gpt-4o-mini", WORDS)) for _ in range(6)]
        await wait_until(lambda: gw.mock.stats.calls == 1)
        reserved = False
        while not reserved:  # taken into debt: polled, Redis announces nothing
            reserved = float(await redis_client.hget(bucket, "r") or 0) < 0
            await asyncio.sleep(0.01)

        # When its rpm is raised to 6,000
        raised = await _set_limits(gw, "alpha", TeamConfig(rpm=6000))

        # Expect every job served within seconds (the old rate called one every 10 s)
        async with asyncio.timeout(5):
            results = [await h.result(timeout=5) for h in handles]
        assert {r.status for r in results} == {"ok"}
        assert gw.mock.stats.calls == 6
        assert max(call.t for call in gw.mock.requests) - raised < 3


async def test_a_lowered_rpm_holds_the_jobs_waiting_under_the_old_one_to_the_new_rate(
    settings: Settings,
) -> None:
    # Given team alpha allowed 60 requests a minute, one at a time, and 20 jobs waiting for
    # it in its worker
    await register(settings, "alpha", TeamConfig(rpm=60, burst=1))
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        handles = [await client.submit(client.job("gpt-4o-mini", WORDS)) for _ in range(20)]
        await wait_until(lambda: gw.mock.stats.calls >= 2)

        # When its rpm is lowered to 6 (one every 10 s), and 5 s pass
        lowered = await _set_limits(gw, "alpha", TeamConfig(rpm=6, burst=1))
        await asyncio.sleep(5)  # the window whose calls are counted

        # Expect at most what the new limit admits in them (its burst, half a request of
        # rate) and the one turn reserved under the old limit less than 1 s before: the old
        # rate called 5
        assert sum(call.t > lowered for call in gw.mock.requests) <= 2

        # (and every job served once the limit is raised again)
        await _set_limits(gw, "alpha", TeamConfig(rpm=6000))
        results = [await h.result(timeout=10) for h in handles]
        assert {r.status for r in results} == {"ok"}


async def test_a_job_refused_for_its_rate_gives_back_no_tokens_it_never_took(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given team alpha allowed 240 tokens a minute (4 a second), its bucket emptied
    await register(settings, "alpha", TeamConfig(tpm=240))
    bucket = Keys(settings.redis_prefix).team_bucket("alpha")
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        seconds, micros = await redis_client.time()
        await redis_client.hset(bucket, mapping={"t": "0", "ts": seconds * 1_000_000 + micros})
        emptied = time.monotonic()

        # When a job needing 24 tokens (6 s of the rate) comes with a deadline 2 s away
        job = client.job("gpt-4o-mini", WORDS, max_tokens=MAX_TOKENS, deadline=timedelta(seconds=2))
        handle = await client.submit(job)
        refused = await handle.result(timeout=10)
        left = float(await redis_client.hget(bucket, "t") or 0)
        refilled = 4 * (time.monotonic() - emptied)

    # Expect it refused uncalled, and the bucket holding what refilled meanwhile alone, not
    # the 24 tokens of a take it never made as well
    assert refused.error is not None and refused.error.code == "rate_limited"
    assert gw.mock.stats.calls == 0
    assert left <= refilled


async def test_a_team_waits_behind_one_job_of_a_team_flooding_a_shared_deployment(
    settings: Settings, tmp_path: Path
) -> None:
    # Given a deployment allowing 600 requests a minute, one at a time (one every 0.1 s),
    # and team alpha's 60 jobs waiting for it in the worker (6 s of its rate)
    catalog = small_deployment(tmp_path, rpm=600, burst=1)
    async with (
        running_gateway(settings, teams=("alpha", "beta"), catalog=catalog) as gw,
        gw.client("alpha") as alpha,
        gw.client("beta") as beta,
    ):
        flood = [await alpha.submit(alpha.job("small", WORDS)) for _ in range(60)]
        await wait_until(lambda: gw.mock.stats.calls >= 2)

        # When team beta sends one job
        sent = time.monotonic()
        trickle = await beta.chat("small", WORDS, timeout=30)
        waited = time.monotonic() - sent

        # Expect it served within a few turns of the rate, not behind alpha's backlog
        assert trickle.status == "ok"
        assert waited < 1.5
        assert {(await h.result(timeout=30)).status for h in flood} == {"ok"}


@pytest.mark.parametrize("wait", ["rate", "budget"])
async def test_a_draining_worker_returns_its_jobs_waiting_for_admission_at_once_holding_nothing(
    settings: Settings, redis_client: aioredis.Redis, wait: str
) -> None:
    # Given three jobs of team alpha waiting in its worker for admission: for its rate (6
    # requests a minute, one at a time, taken by a job served; the first's turn reserved 10 s
    # ahead, the others in line), or for its budget, held whole by a job in flight's
    # reservation
    rate = wait == "rate"
    config = TeamConfig(rpm=6, burst=1) if rate else TeamConfig(budget_usd=Decimal("0.001"))
    await register(settings, "alpha", config)
    keys = Keys(settings.redis_prefix)
    bucket, ledger = keys.team_bucket("alpha"), keys.spend("alpha", current_month())
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        admission = gw.worker.admission
        assert admission is not None
        assert (await client.chat("gpt-4o-mini", WORDS, fallbacks=[])).status == "ok"
        if not rate:
            holder = admission.ahead(
                client.job("gpt-4o-mini", WORDS, fallbacks=[], max_tokens=1600)
            )
            assert holder is not None
            [spend, *_] = await Scripts(redis_client, keys).run_all(holder.calls)
            assert spend[0] == 0
        held = await redis_client.hget(ledger, "reserved")
        for _ in range(3):
            await client.submit(client.job("gpt-4o-mini", WORDS, fallbacks=[]))
        newcomer = client.job("gpt-4o-mini", WORDS, fallbacks=[])
        waiting = False
        while not waiting:  # polled: Redis and the line announce nothing
            reserved = float(await redis_client.hget(bucket, "r") or 0) < 0
            lined = admission.ahead(newcomer) is None
            waiting = gw.worker.in_flight == 3 and (reserved if rate else lined)
            await asyncio.sleep(0.01)

        # When the worker drains (a stop, as on SIGTERM)
        started = time.monotonic()
        await gw.stop_worker()
        took = time.monotonic() - started

        # Expect all three back in alpha's queue uncalled, at once rather than at the end
        # of the drain's grace, holding nothing: the reserved turn given back to the bucket,
        # no reservation in the budget's ledger beside the one held before
        assert took < settings.shutdown_grace / 2
        assert gw.mock.stats.calls == 1
        assert await depth(settings, gw.topology.team_queue("alpha")) == 3
        if rate:
            assert float(await redis_client.hget(bucket, "r") or 0) >= 0
        assert await redis_client.hget(ledger, "reserved") == held


@pytest.mark.parametrize("budget", [None, Decimal(100)])
async def test_a_jobs_estimate_is_made_once_however_it_is_admitted(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, budget: Decimal | None
) -> None:
    # Given a team without limits (its first call recorded with its claim, priced at the
    # job's estimate) or with a budget (reserved with its claim at the estimate), and the
    # estimates counted (a PDF's pages are counted in one, about 10 ms for the largest)
    await register(settings, "alpha", TeamConfig(budget_usd=budget))
    made: list[str] = []

    def counted(job: ChatJob, *args: Any) -> Estimate:
        made.append(job.job_id)
        return estimate(job, *args)

    monkeypatch.setattr(workers.admission.gate, "estimate", counted)
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        # When three jobs are served
        for _ in range(3):
            result = await client.chat("gpt-4o-mini", WORDS, timeout=10)
            assert result.status == "ok", result.error
    # Expect one estimate each (before: two for the team without limits, one for its first
    # call's record and one for its admission)
    assert sorted(made.count(job) for job in set(made)) == [1, 1, 1], made
