"""Retries, 429 pauses, circuit breakers, load balancing and timeouts, over real HTTP and Redis.

Each test builds its own catalog against the mock provider, with fast backoffs and breakers,
and opens Routers on the test's own Redis prefix; two Routers stand for two workers.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
import uvloop
from multidict import CIMultiDict

from mockprovider import Behavior, MockConfig, MockProvider
from mockprovider.catalog import mock_deployment
from queuegate.errors import DeadlineExceeded, InvalidRequest, RateLimited
from queuegate.keys import Keys
from queuegate.messages import ChatJob
from queuegate.settings import Settings
from router import Catalog, Deployment, open_router
from router.health import TRUST_CLOSED, Health
from router.policies import RetryPolicy
from router.providers import ProviderError
from router.providers.base import classify
from router.transport import retry_after
from tests.proxy import TcpProxy

ENV = {"QUEUEGATE_MOCK_KEY": "sk-test"}
FAST = {
    "retry": {"attempts": 2, "base_delay": 0.01, "max_delay": 0.05},
    "budget": {"attempts": 6, "wait": 5},
    "breaker": {"failures": 1000, "cooldown": 0.5},
}
"""Quick backoffs, and a breaker that does not open unless a test says so."""


def dep(name: str, model: str, url: str, /, **fields: Any) -> dict[str, Any]:
    return mock_deployment(name, model, url, timeout=5) | fields


def catalog(models: dict[str, Any], **resilience: Any) -> Catalog:
    return Catalog.model_validate({"models": models, "resilience": FAST | resilience})


def broken_primary(mock: MockProvider, **resilience: Any) -> Catalog:
    """Alias ``primary`` on a deployment failing every call (one attempt), falling back to
    ``backup``; the mock is configured for it."""
    mock.configure(MockConfig(models={"broken": Behavior(error_rate=1.0)}))
    return catalog(
        {
            "primary": {
                "fallbacks": ["backup"],
                "deployments": [dep("broken-dep", "broken", mock.url)],
            },
            "backup": {"deployments": [dep("backup-dep", "steady", mock.url)]},
        },
        retry={"attempts": 1},
        **resilience,
    )


def lone_deployment(
    settings: Settings, redis_client: aioredis.Redis, breaker: dict[str, float] | None = None
) -> tuple[Health, Deployment]:
    """A worker's view of the shared health of one deployment (nothing listens at its base)."""
    cat = catalog(
        {"m": {"deployments": [dep("d", "m", "http://127.0.0.1:1")]}},
        **({"breaker": breaker} if breaker else {}),
    )
    [deployment] = cat.models["m"].deployments
    return Health(redis_client, Keys(settings.redis_prefix), cat), deployment


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


def calls_to(mock: MockProvider, model: str) -> list[float]:
    return [call.t for call in mock.requests if call.model == model]


@pytest.fixture
async def mock() -> AsyncIterator[MockProvider]:
    async with MockProvider() as provider:
        yield provider


# --- retries -----------------------------------------------------------------------------------


async def test_a_flaky_primary_with_a_healthy_fallback_serves_every_job_within_the_bound(
    settings: Settings, mock: MockProvider
) -> None:
    # Given a primary answering 30 % 500s and hanging on 10 %, and a healthy fallback
    mock.configure(
        MockConfig(
            seed=7,
            models={"flaky": Behavior(error_rate=0.3, timeout_rate=0.1, hang_s=5)},
        )
    )
    cat = catalog(
        {
            "primary": {
                "fallbacks": ["backup"],
                "deployments": [dep("flaky-dep", "flaky", mock.url, timeout=0.2)],
            },
            "backup": {"deployments": [dep("backup-dep", "steady", mock.url)]},
        }
    )

    # When 30 jobs run at once
    async with open_router(cat, ENV, settings) as router:
        served = await asyncio.gather(*(router.complete(chat("primary")) for _ in range(30)))

    # Expect every one served, none making more than the per-deployment attempts on the primary
    # plus one call to the fallback
    assert len(served) == 30
    assert max(len(routed.attempts) for routed in served) <= 3
    for routed in served:
        flaky = [a for a in routed.attempts if a.deployment == "flaky-dep"]
        assert len(flaky) <= 2
        assert all(a.error in ("server_error", "timeout") for a in flaky if a.status != 200)
    seen = Counter(a.error for routed in served for a in routed.attempts)
    assert seen["server_error"] > 0 and seen["timeout"] > 0
    assert Counter(r.deployment for r in served)["backup-dep"] > 0
    assert any(len(r.attempts) == 2 and r.deployment == "flaky-dep" for r in served)


async def test_retry_after_is_a_floor_for_the_next_call_to_that_deployment(
    settings: Settings, mock: MockProvider
) -> None:
    # Given a deployment that answers its first call 429 with Retry-After: 2
    mock.configure(
        MockConfig(models={"busy": Behavior(fail_first=1, error_status=429, retry_after=2)})
    )
    cat = catalog({"solo": {"deployments": [dep("busy-dep", "busy", mock.url)]}})

    # When a job can only be served there
    async with open_router(cat, ENV, settings) as router:
        routed = await router.complete(chat("solo"))

    # Expect the retry no sooner than 2 s after the 429 (the mock's own clock)
    assert [(a.status, a.error) for a in routed.attempts] == [(429, "rate_limited"), (200, None)]
    first, second = calls_to(mock, "busy")
    assert second - first >= 2.0


async def test_a_429_pauses_the_deployment_for_every_worker_while_others_serve(
    settings: Settings, mock: MockProvider
) -> None:
    # Given an alias with two deployments, the first answering 429 with Retry-After: 30
    mock.configure(
        MockConfig(models={"busy": Behavior(fail_first=1, error_status=429, retry_after=30)})
    )
    cat = catalog(
        {
            "pair": {
                "deployments": [
                    dep("busy-dep", "busy", mock.url),
                    dep("spare-dep", "spare", mock.url),
                ]
            }
        }
    )

    # When one worker meets the 429, then another worker serves ten jobs
    async with open_router(cat, ENV, settings) as first:
        met = await first.complete(chat("pair"))
    async with open_router(cat, ENV, settings) as second:
        later = [await second.complete(chat("pair")) for _ in range(10)]

    # Expect the first job served by the spare, and no later job calling the paused deployment
    assert [(a.deployment, a.status) for a in met.attempts] == [
        ("busy-dep", 429),
        ("spare-dep", 200),
    ]
    assert {routed.deployment for routed in later} == {"spare-dep"}
    assert all(len(routed.attempts) == 1 for routed in later)
    assert len(calls_to(mock, "busy")) == 1


async def test_a_429_past_the_deadline_ends_the_job_rate_limited(
    settings: Settings, mock: MockProvider
) -> None:
    mock.configure(MockConfig(models={"busy": Behavior(rate_limit_rpm=1, retry_after=30)}))
    cat = catalog({"solo": {"deployments": [dep("busy-dep", "busy", mock.url)]}})

    async with open_router(cat, ENV, settings) as router:
        await router.complete(chat("solo"))
        with pytest.raises(RateLimited) as caught:
            await router.complete(chat("solo"), deadline=time.monotonic() + 1)

    assert caught.value.code == "rate_limited"
    assert [a.error for a in caught.value.attempts] == ["rate_limited"]


async def test_a_deployment_paused_by_another_worker_past_the_deadline_is_rate_limited(
    settings: Settings, mock: MockProvider
) -> None:
    mock.configure(MockConfig(models={"busy": Behavior(rate_limit_rpm=1, retry_after=30)}))
    cat = catalog({"solo": {"deployments": [dep("busy-dep", "busy", mock.url)]}})
    async with open_router(cat, ENV, settings) as first:
        await first.complete(chat("solo"))
        with pytest.raises(RateLimited):
            await first.complete(chat("solo"))

    async with open_router(cat, ENV, settings) as second:
        with pytest.raises(RateLimited) as caught:
            await second.complete(chat("solo"), deadline=time.monotonic() + 1)

    assert caught.value.attempts == []
    assert len(calls_to(mock, "busy")) == 2


async def test_a_retry_whose_backoff_ends_while_another_circuit_is_asked_is_made_at_once(
    settings: Settings, mock: MockProvider
) -> None:
    # Given an alias of two deployments in order: the first answers its first call 429 with
    # 0.2 s to wait, the second's circuit is open; and the router's Redis behind a proxy that
    # hangs once the second's circuit is asked of
    mock.configure(
        MockConfig(models={"flaky": Behavior(fail_first=1, error_status=429, retry_after=0.2)})
    )
    cat = catalog(
        {
            "both": {
                "deployments": [
                    dep("flaky-dep", "flaky", mock.url),
                    dep("open-dep", "open", mock.url, breaker={"failures": 1, "cooldown": 60}),
                ]
            }
        },
        rate_limit_pause=0,
    )
    opened = cat.models["both"].deployments[1]
    async with TcpProxy(settings.redis_url) as proxy:
        behind = settings.model_copy(update={"redis_url": proxy.url})
        async with open_router(cat, ENV, behind) as router:
            await router.health.failure(opened)
            proxy.hang_at(Keys(settings.redis_prefix).breaker(opened.name).encode())

            # When a job with no deadline, alone in the worker, has its first call refused,
            # and the wait that asks for ends while the second's circuit is asked of (a wait
            # in time: no event marks it)
            serving = asyncio.create_task(router.complete(chat("both")))
            await proxy.hung.wait()
            await asyncio.sleep(0.3)
            await proxy.up()

            # Expect the retry made then, not held until another job's call ends (none will)
            async with asyncio.timeout(5):
                routed = await serving

    assert routed.deployment == "flaky-dep"
    assert [a.error for a in routed.attempts] == ["rate_limited", None]


def test_backoff_is_full_jitter_capped_and_never_below_the_floor() -> None:
    policy = RetryPolicy(base_delay=0.1, max_delay=0.4)

    draws = [policy.backoff(retry) for retry in range(6) for _ in range(200)]

    assert all(0 <= d <= 0.4 for d in draws)
    assert min(draws) < 0.05 < max(draws)  # jittered, not a fixed delay
    assert all(policy.backoff(3, floor=2.0) >= 2.0 for _ in range(50))


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after-ms": "1500", "retry-after": "2"}, 1.5),
        ({"retry-after": "7"}, 7.0),
        ({"x-ratelimit-reset-requests": "1s", "x-ratelimit-reset-tokens": "6m0s"}, 1.0),
        (
            {
                "x-ratelimit-reset-requests": "1s",
                "x-ratelimit-reset-tokens": "1m30.5s",
                "x-ratelimit-remaining-tokens": "0",
            },
            90.5,
        ),
        ({"x-ratelimit-reset-requests": "20ms"}, 0.02),
        ({"x-ratelimit-reset-requests": "soon"}, None),
    ],
)
def test_retry_after_headers_are_read_from_either_provider(
    headers: dict[str, str], seconds: float | None
) -> None:
    assert retry_after(CIMultiDict(headers)) == seconds


# --- circuit breaker ---------------------------------------------------------------------------


async def test_breaker_opens_after_the_threshold_probes_once_and_two_workers_agree(
    settings: Settings, mock: MockProvider
) -> None:
    # Given a primary failing every call, a breaker opening at 3 failures, and a fallback
    cat = broken_primary(mock, breaker={"failures": 3, "cooldown": 0.5})
    async with (
        open_router(cat, ENV, settings) as one,
        open_router(cat, ENV, settings) as two,
    ):
        # When worker one serves three jobs, then worker two serves three more
        for _ in range(3):
            await one.complete(chat("primary"))
        opened = time.monotonic()
        skipped = [await two.complete(chat("primary")) for _ in range(3)]

        # Expect the circuit open for both: no more calls reach the broken deployment
        assert len(calls_to(mock, "broken")) == 3
        assert [len(routed.attempts) for routed in skipped] == [1, 1, 1]
        status = await two.health.status(cat.models["primary"].deployments[0])
        assert status.state == "open" and 0 < status.wait <= 0.5

        # When the cooldown has passed (a wait in time: no event marks it) and the deployment
        # is healthy but slow, and both workers send jobs at once
        mock.configure(MockConfig(models={"broken": Behavior(latency_ms=200)}))
        await asyncio.sleep(max(0.0, opened + 0.5 - time.monotonic()))
        probing = await asyncio.gather(
            *(router.complete(chat("primary")) for router in (one, two) for _ in range(4))
        )

        # Expect exactly one probe; the others served by the fallback meanwhile
        assert len(calls_to(mock, "broken")) == 4
        assert Counter(routed.deployment for routed in probing) == {
            "broken-dep": 1,
            "backup-dep": 7,
        }

        # And once the probe succeeded, both workers use the deployment again
        resumed = [await router.complete(chat("primary")) for router in (one, two)]
        assert {routed.deployment for routed in resumed} == {"broken-dep"}


async def test_429s_do_not_open_the_breaker(settings: Settings, mock: MockProvider) -> None:
    mock.configure(
        MockConfig(models={"busy": Behavior(error_rate=1.0, error_status=429, retry_after=0)})
    )
    cat = catalog(
        {
            "primary": {
                "fallbacks": ["backup"],
                "deployments": [dep("busy-dep", "busy", mock.url)],
            },
            "backup": {"deployments": [dep("backup-dep", "steady", mock.url)]},
        },
        retry={"attempts": 1},
        breaker={"failures": 2},
        rate_limit_pause=0,
    )

    async with open_router(cat, ENV, settings) as router:
        for _ in range(4):
            await router.complete(chat("primary"))
        status = await router.health.status(cat.models["primary"].deployments[0])

    assert status.state == "closed"
    assert len(calls_to(mock, "busy")) == 4


async def test_calls_cut_by_the_jobs_deadline_do_not_open_the_breaker_but_timeouts_do(
    settings: Settings, mock: MockProvider
) -> None:
    # Given a slow deployment (2 s) with a 1.5 s timeout, a fallback, and a breaker opening
    # at 2 failures
    mock.configure(MockConfig(models={"slow": Behavior(latency_ms=2000)}))
    cat = catalog(
        {
            "primary": {
                "fallbacks": ["backup"],
                "deployments": [dep("slow-dep", "slow", mock.url, timeout=1.5)],
            },
            "backup": {"deployments": [dep("backup-dep", "steady", mock.url)]},
        },
        retry={"attempts": 1},
        breaker={"failures": 2, "ratio": 0.5, "cooldown": 30},
    )
    [deployment] = cat.models["primary"].deployments

    async with open_router(cat, ENV, settings) as router:
        # When four jobs of one team end at their own 0.2 s deadline, mid-call
        cut = await asyncio.gather(
            *(router.complete(chat("primary"), deadline=time.monotonic() + 0.2) for _ in range(4)),
            return_exceptions=True,
        )
        after_cuts = await router.health.status(deployment)

        # Expect each ended deadline_exceeded with its call recorded as a timeout, and the
        # circuit that every team shares still closed
        assert {type(err).__name__ for err in cut} == {"DeadlineExceeded"}
        assert all(
            [a.error for a in err.attempts] == ["timeout"]  # type: ignore[union-attr]
            for err in cut
        )
        assert after_cuts.state == "closed"

        # When two jobs without a deadline meet the deployment's own timeout
        for _ in range(2):
            routed = await router.complete(chat("primary"))
            assert [(a.deployment, a.error) for a in routed.attempts] == [
                ("slow-dep", "timeout"),
                ("backup-dep", None),
            ]

        # Expect the circuit open: a provider's own timeout still counts against it
        assert (await router.health.status(deployment)).state == "open"


def slow_lone_deployment(mock: MockProvider, *, cooldown: float) -> tuple[Catalog, Deployment]:
    """One deployment answering in 2 s with a 1.5 s timeout, no retry, whose circuit two
    failures open for ``cooldown`` seconds."""
    mock.configure(MockConfig(models={"slow": Behavior(latency_ms=2000)}))
    cat = catalog(
        {"primary": {"deployments": [dep("slow-dep", "slow", mock.url, timeout=1.5)]}},
        retry={"attempts": 1},
        breaker={"failures": 2, "ratio": 0.5, "cooldown": cooldown},
    )
    [deployment] = cat.models["primary"].deployments
    return cat, deployment


async def test_calls_cut_by_the_jobs_deadline_on_a_busy_worker_loop_do_not_open_the_breaker(
    settings: Settings, mock: MockProvider
) -> None:
    # Given a slow deployment (2 s) with a breaker opening at 2 failures
    cat, deployment = slow_lone_deployment(mock, cooldown=30)

    async def busy(until: float) -> None:
        while time.monotonic() < until:
            time.sleep(0.02)  # noqa: ASYNC251  another job's CPU work, within one loop iteration
            await asyncio.sleep(0)

    async def cut_while_busy() -> tuple[set[str], str]:
        async with open_router(cat, ENV, settings) as router:
            ends = time.monotonic() + 0.8
            ended = await asyncio.gather(
                busy(ends),
                *(router.complete(chat("primary"), deadline=ends - 0.2) for _ in range(8)),
                return_exceptions=True,
            )
            state = (await router.health.status(deployment)).state
        return {type(err).__name__ for err in ended[1:]}, state

    # When jobs are cut at their deadline on the worker's loop (uvloop: its clock is read once
    # an iteration, so behind while the loop is busy, and time limits fire before the
    # deadline by the wall clock)
    ends, state = await asyncio.to_thread(uvloop.run, cut_while_busy())
    # Expect them cut, and the circuit every team shares still closed
    assert ends == {"DeadlineExceeded"}
    assert state == "closed"


async def test_a_probe_cut_by_its_jobs_deadline_lets_the_next_caller_probe_at_once(
    settings: Settings, mock: MockProvider
) -> None:
    # Given a slow deployment (2 s, timeout 1.5 s) whose circuit two timeouts open, and whose
    # cooldown (0.3 s) has passed
    cat, deployment = slow_lone_deployment(mock, cooldown=0.3)
    async with open_router(cat, ENV, settings) as router:
        await asyncio.gather(
            *(router.complete(chat("primary")) for _ in range(2)), return_exceptions=True
        )
        assert (await router.health.status(deployment)).state == "open"
        await asyncio.sleep(0.35)  # the cooldown: a span of time, no event to await

        # When the probe goes to a job whose own 0.2 s deadline cuts it
        with pytest.raises(DeadlineExceeded):
            await router.complete(chat("primary"), deadline=time.monotonic() + 0.2)

        # Expect the next caller to probe at once, not wait out the cut probe's 2.5 s
        verdict = await router.health.allow(deployment)
        assert verdict.state == "probe"


# --- error routing -----------------------------------------------------------------------------

CONTEXT_TOO_LONG = {
    "type": "error",
    "error": {"type": "invalid_request_error", "message": "prompt is too long: 9 > 8 maximum"},
}


async def test_context_length_goes_to_the_larger_context_fallback_without_retry(
    settings: Settings, mock: MockProvider
) -> None:
    # Given a small model refusing the prompt as too long, whose usual fallback comes first
    behavior = Behavior(error_rate=1.0, error_status=400, error_body=CONTEXT_TOO_LONG)
    mock.configure(MockConfig(models={"small": behavior}))
    cat = catalog(
        {
            "small": {
                "fallbacks": ["other"],
                "context_fallbacks": ["large"],
                "deployments": [dep("small-dep", "small", mock.url)],
            },
            "other": {"deployments": [dep("other-dep", "other", mock.url)]},
            "large": {"deployments": [dep("large-dep", "large", mock.url)]},
        }
    )

    async with open_router(cat, ENV, settings) as router:
        routed = await router.complete(chat("small"))

    assert [(a.deployment, a.status, a.error) for a in routed.attempts] == [
        ("small-dep", 400, "context_length"),
        ("large-dep", 200, None),
    ]
    assert routed.fallback_used


async def test_content_policy_refusal_fails_unless_a_fallback_is_configured(
    settings: Settings, mock: MockProvider
) -> None:
    refusal = {
        "error": {
            "message": "Your request was rejected as a result of our safety system.",
            "type": "invalid_request_error",
            "code": "content_policy_violation",
        }
    }
    behavior = Behavior(error_rate=1.0, error_status=400, error_body=refusal)
    mock.configure(MockConfig(models={"strict": behavior}))
    strict = [dep("strict-dep", "strict", mock.url)]
    cat = catalog(
        {
            "strict": {"fallbacks": ["other"], "deployments": strict},
            "lenient": {
                "content_policy_fallbacks": ["other"],
                "deployments": [dep("lenient-dep", "strict", mock.url)],
            },
            "other": {"deployments": [dep("other-dep", "other", mock.url)]},
        }
    )

    async with open_router(cat, ENV, settings) as router:
        with pytest.raises(InvalidRequest):
            await router.complete(chat("strict"))
        routed = await router.complete(chat("lenient"))

    assert routed.deployment == "other-dep"


# --- load balancing ----------------------------------------------------------------------------


async def test_weighted_routing_follows_the_weights(settings: Settings, mock: MockProvider) -> None:
    cat = catalog(
        {
            "lb": {
                "routing": "weighted",
                "deployments": [
                    dep("heavy", "heavy", mock.url, weight=3),
                    dep("light", "light", mock.url, weight=1),
                ],
            }
        }
    )

    async with open_router(cat, ENV, settings) as router:
        served = [await router.complete(chat("lb")) for _ in range(100)]

    heavy = sum(routed.deployment == "heavy" for routed in served)
    assert 55 <= heavy <= 95  # 75 expected; 20 is 4.6 standard deviations


async def test_least_in_flight_spreads_concurrent_calls_under_the_cap(
    settings: Settings, mock: MockProvider
) -> None:
    # Given two slow deployments, each capped at 2 calls at once
    mock.configure(MockConfig(default=Behavior(latency_ms=100)))
    cat = catalog(
        {
            "lb": {
                "routing": "least_in_flight",
                "deployments": [
                    dep("a", "model-a", mock.url, max_in_flight=2),
                    dep("b", "model-b", mock.url, max_in_flight=2),
                ],
            }
        }
    )

    # When 8 jobs arrive at once
    async with open_router(cat, ENV, settings) as router:
        started = time.monotonic()
        served = await asyncio.gather(*(router.complete(chat("lb")) for _ in range(8)))
        elapsed = time.monotonic() - started

    # Expect both used, never more than 2 calls at once on either (the mock saw each call
    # during the 100 ms before it answered), so at least two rounds of 100 ms
    assert all(n >= 2 for n in Counter(routed.deployment for routed in served).values())
    for model in ("model-a", "model-b"):
        answered = calls_to(mock, model)
        running = [sum(t - 0.1 < start + 0.01 <= t for t in answered) for start in answered]
        assert max(running) <= 2
    assert elapsed >= 0.2
    assert all(len(routed.attempts) == 1 for routed in served)


# --- timeouts ----------------------------------------------------------------------------------


async def test_first_byte_timeout_moves_on_before_the_total_timeout(
    settings: Settings, mock: MockProvider
) -> None:
    mock.configure(MockConfig(models={"slow": Behavior(timeout_rate=1.0, hang_s=5)}))
    cat = catalog(
        {
            "primary": {
                "fallbacks": ["backup"],
                "deployments": [
                    dep("slow-dep", "slow", mock.url, timeout=30, first_byte_timeout=0.2)
                ],
            },
            "backup": {"deployments": [dep("backup-dep", "steady", mock.url)]},
        },
        retry={"attempts": 1},
    )

    async with open_router(cat, ENV, settings) as router:
        routed = await router.complete(chat("primary"))

    first = routed.attempts[0]
    assert (first.deployment, first.error) == ("slow-dep", "timeout")
    assert 150 <= first.latency_ms < 1000
    assert routed.deployment == "backup-dep"


async def test_breaker_opens_once_enough_failures_are_also_enough_of_the_calls(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    health, deployment = lone_deployment(
        settings, redis_client, {"failures": 2, "ratio": 0.5, "cooldown": 30}
    )

    await health.failure(deployment)
    await health.success(deployment)
    await health.success(deployment)
    still_closed = (await health.status(deployment)).state
    await health.failure(deployment)  # 4 calls, 2 failed: half
    verdict = await health.allow(deployment)

    assert still_closed == "closed"
    assert (verdict.state, verdict.allowed) == ("open", False)
    assert 29 < verdict.wait <= 30


async def test_a_busy_deployment_with_a_few_failures_stays_closed(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given the default breaker: 5 failures that are also half of the window's calls
    health, deployment = lone_deployment(settings, redis_client)

    # When 100 calls fail one in ten, ten failures in all
    for call in range(100):
        await (health.failure if call % 10 == 0 else health.success)(deployment)

    # Expect the circuit closed: a count alone would have opened it at the fifth failure
    assert (await health.status(deployment)).state == "closed"


async def test_a_failed_probe_opens_the_circuit_again_and_only_one_caller_probes(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    health, deployment = lone_deployment(settings, redis_client, {"failures": 1, "cooldown": 0.05})
    await health.failure(deployment)
    await asyncio.sleep(0.06)  # the cooldown: a span of time, no event to await

    verdicts = await asyncio.gather(*(health.allow(deployment) for _ in range(5)))
    await health.failure(deployment)  # the probe fails
    after = await health.allow(deployment)

    assert sorted(v.state for v in verdicts) == ["half_open"] * 4 + ["probe"]
    assert after.state == "open"


# --- the catalog -------------------------------------------------------------------------------


def test_resilience_has_defaults_and_a_deployment_may_override_them() -> None:
    cat = Catalog.model_validate(
        {
            "models": {
                "m": {
                    "deployments": [
                        dep("plain", "m", "http://h"),
                        dep("patient", "m", "http://h", retry={"attempts": 5}),
                    ]
                }
            }
        }
    )
    plain, patient = cat.models["m"].deployments

    assert cat.retry(plain).attempts == 2 and cat.retry(patient).attempts == 5
    assert cat.breaker(plain).failures == 5
    assert cat.resilience.budget.attempts == 6
    assert cat.models["m"].routing == "ordered"


def test_context_fallbacks_must_name_known_aliases() -> None:
    with pytest.raises(ValueError, match=r"models\.m\.context_fallbacks: unknown alias 'big'"):
        Catalog.model_validate(
            {
                "models": {
                    "m": {"context_fallbacks": ["big"], "deployments": [dep("d", "m", "http://h")]}
                }
            }
        )


@pytest.mark.parametrize(
    ("status", "retries", "moves_on", "trips_breaker"),
    [
        (429, True, True, False),
        (500, True, True, True),
        (529, True, True, True),
        (408, True, True, True),
        (401, False, True, True),
        (400, False, False, False),
        (422, False, False, False),
    ],
)
def test_one_table_says_what_each_failure_does(
    status: int, retries: bool, moves_on: bool, trips_breaker: bool
) -> None:
    error = ProviderError(classify(status), status=status)

    assert (error.retries, error.moves_on, error.trips_breaker) == (
        retries,
        moves_on,
        trips_breaker,
    )


def test_content_policy_400_is_recognised_by_code_or_message() -> None:
    assert classify(400, "content_policy_violation", "rejected") == "content_policy"
    assert classify(400, None, "flagged by our safety system") == "content_policy"
    assert classify(400, "invalid_request_error", "temperature: too hot") == "bad_request"


def test_the_deployments_command_shows_every_deployment_and_its_circuit() -> None:
    from typer.testing import CliRunner

    from cli.main import app

    namespace = f"qgt-cli-{time.monotonic_ns()}"  # read only: nothing to clean up
    result = CliRunner().invoke(
        app, ["deployments"], env={"QUEUEGATE_NAMESPACE": namespace, "COLUMNS": "200"}
    )

    assert result.exit_code == 0, result.output
    for name in ("openai-main", "anthropic-main", "local-vllm", "openai-flaky"):
        assert name in result.output
    assert result.output.count("closed") == 4


async def test_jobs_are_served_while_redis_is_down_and_breakers_return_with_it(
    settings: Settings, mock: MockProvider
) -> None:
    # Given a router whose Redis is behind a proxy, and a primary failing every call
    cat = broken_primary(mock, breaker={"failures": 2, "cooldown": 30})
    async with TcpProxy(settings.redis_url) as proxy:
        behind = settings.model_copy(update={"redis_url": proxy.url})
        async with open_router(cat, ENV, behind) as router:
            # When Redis goes away
            await proxy.down()
            during = [await router.complete(chat("primary")) for _ in range(3)]

            # Expect every job served (no shared breaker: each still tries the primary)
            assert {routed.deployment for routed in during} == {"backup-dep"}
            assert len(calls_to(mock, "broken")) == 3

            # And once it is back, the breaker counts again and opens
            await proxy.up()
            after = [await router.complete(chat("primary")) for _ in range(4)]
            assert [len(routed.attempts) for routed in after] == [2, 2, 1, 1]


async def test_answered_calls_count_in_the_window_without_a_round_trip_each(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given a breaker that opens at 2 failures that are also half of the window's calls
    health, deployment = lone_deployment(
        settings, redis_client, {"failures": 2, "ratio": 0.5, "cooldown": 30}
    )
    key = Keys(settings.redis_prefix).breaker(deployment.name)

    # When three calls answer, then the next call is allowed and two calls fail
    for _ in range(3):
        await health.success(deployment)
    untouched = await redis_client.exists(key)
    await health.allow(deployment)
    counted = await redis_client.hget(key, "calls")
    await health.failure(deployment)
    await health.failure(deployment)

    # Expect the answers counted with the allow, and 2 failures of 5 calls leave it closed
    assert untouched == 0
    assert counted == b"3"
    assert (await health.status(deployment)).state == "closed"


async def test_a_worker_trusts_a_closed_verdict_briefly_and_its_own_failures_at_once(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given two workers' views of one deployment, each just told it is closed
    one, deployment = lone_deployment(settings, redis_client, {"failures": 1, "cooldown": 30})
    two, _ = lone_deployment(settings, redis_client, {"failures": 1, "cooldown": 30})
    assert (await one.allow(deployment)).state == "closed"
    assert (await two.allow(deployment)).state == "closed"

    # When worker one meets a 429 and then a failure that opens the circuit
    await one.rate_limited(deployment, 30)
    own = await one.allow(deployment)
    await one.failure(deployment)
    other_at_once = await two.allow(deployment)
    await asyncio.sleep(TRUST_CLOSED)  # the trust is a span of time: no event ends it
    other_later = await two.allow(deployment)

    # Expect worker one to see its own pause at once, and worker two within TRUST_CLOSED
    assert own.state == "paused"
    assert other_at_once.state == "closed"
    assert other_later.state == "paused" and not other_later.allowed


async def test_a_call_late_in_the_trust_does_not_wait_for_redis_which_renews_it_meanwhile(
    settings: Settings, redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a worker just told a deployment is closed, whose next ask is held on its way back
    # until the test lets it go
    health, deployment = lone_deployment(settings, redis_client)
    assert (await health.allow(deployment)).state == "closed"
    script, asked, release = health._script, asyncio.Event(), asyncio.Event()

    async def held(*args: Any, **kwargs: Any) -> Any:
        answer = await script(*args, **kwargs)
        asked.set()
        await release.wait()
        return answer

    monkeypatch.setattr(health, "_script", held)
    trusted_until = time.monotonic() + TRUST_CLOSED
    await asyncio.sleep(TRUST_CLOSED * 0.6)  # the trust is a span of time: no event ends it

    # When a call comes in the trust's second half, and the ask it started is answered
    async with asyncio.timeout(5):
        late = await health.allow(deployment)
        await asked.wait()
    refresh = health._asking[deployment.name].answer
    release.set()
    await refresh
    monkeypatch.setattr(health, "_script", script)
    await asyncio.sleep(max(0.0, trusted_until - time.monotonic()))
    asked_again = Counter[str]()

    async def counted(*args: Any, **kwargs: Any) -> Any:
        asked_again[kwargs["args"][0]] += 1
        return await script(*args, **kwargs)

    monkeypatch.setattr(health, "_script", counted)
    after = await health.allow(deployment)

    # Expect the call allowed at once while Redis was asked, and the trust renewed by that
    # answer: a call after the first trust's end asks nothing
    assert late.state == "closed"
    assert after.state == "closed"
    assert not asked_again


async def test_a_pause_reaches_a_worker_through_the_ask_late_in_its_trust(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given two workers just told a deployment is closed
    one, deployment = lone_deployment(settings, redis_client)
    two, _ = lone_deployment(settings, redis_client)
    assert (await one.allow(deployment)).state == "closed"
    assert (await two.allow(deployment)).state == "closed"

    # When worker one pauses it, and worker two calls in its trust's second half
    await one.rate_limited(deployment, 30)
    await asyncio.sleep(TRUST_CLOSED * 0.6)  # the trust is a span of time: no event ends it
    late = await two.allow(deployment)
    await two._asking[deployment.name].answer
    after = await two.allow(deployment)

    # Expect the late call allowed (its trust held), and the next one paused without waiting
    # for the trust to end
    assert late.state == "closed"
    assert after.state == "paused" and not after.allowed


async def test_a_closed_verdict_asked_for_before_a_failure_is_not_trusted(
    settings: Settings, redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a breaker that opens at the first failure, and a failure that opens it while an
    # allow's answer (closed) is on its way back
    health, deployment = lone_deployment(settings, redis_client, {"failures": 1})
    script = health._script

    async def answered_after_a_failure(*args: Any, **kwargs: Any) -> Any:
        answer = await script(*args, **kwargs)
        if kwargs["args"][0] == "allow":
            monkeypatch.setattr(health, "_script", script)
            await health.failure(deployment)
        return answer

    monkeypatch.setattr(health, "_script", answered_after_a_failure)

    # When that allow returns, and the next call asks
    stale = await health.allow(deployment)
    after = await health.allow(deployment)

    # Expect the stale verdict not trusted: the next call is refused
    assert stale.state == "closed"
    assert after.state == "open"


async def test_calls_that_find_the_trust_lapsed_together_ask_redis_once(
    settings: Settings, redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a worker's view of a closed deployment, counting its round trips to Redis
    health, deployment = lone_deployment(settings, redis_client)
    script, asked = health._script, Counter[str]()

    async def counted(*args: Any, **kwargs: Any) -> Any:
        asked[kwargs["args"][0]] += 1
        return await script(*args, **kwargs)

    monkeypatch.setattr(health, "_script", counted)

    # When twenty calls ask at once
    verdicts = await asyncio.gather(*(health.allow(deployment) for _ in range(20)))

    # Expect one round trip, whose answer all twenty share
    assert asked == {"allow": 1}
    assert {v.state for v in verdicts} == {"closed"}


async def test_a_call_after_a_failure_does_not_share_an_answer_asked_for_before_it(
    settings: Settings, redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a breaker that opens at the first failure, and an allow whose answer (closed) is
    # held on its way back until the test lets it go
    health, deployment = lone_deployment(settings, redis_client, {"failures": 1})
    script, asked, release = health._script, [asyncio.Event(), asyncio.Event()], asyncio.Event()

    async def held(*args: Any, **kwargs: Any) -> Any:
        answer = await script(*args, **kwargs)
        if kwargs["args"][0] == "allow":
            first = not asked[0].is_set()
            asked[0 if first else 1].set()
            if first:
                await release.wait()
        return answer

    monkeypatch.setattr(health, "_script", held)
    first = asyncio.create_task(health.allow(deployment))
    await asked[0].wait()

    # When a failure opens the circuit, and another call asks while the first is still out
    await health.failure(deployment)
    later = asyncio.create_task(health.allow(deployment))
    async with asyncio.timeout(5):  # it asks for itself, or it would wait for the first
        await asked[1].wait()
    release.set()

    # Expect the first told what it asked before the failure, the later call refused
    assert (await first).state == "closed"
    assert (await later).state == "open"
