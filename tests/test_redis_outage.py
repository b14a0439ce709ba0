"""Admission and claims while Redis is cut off (by a proxy; the shared Redis keeps running)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from datetime import timedelta
from decimal import Decimal

import redis.asyncio as aioredis

from accounting.store import insert_usage
from producer import GatewayClient
from queuegate.keys import Keys
from queuegate.messages import Attempt, ChatJob
from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from router import Routed
from tests.faults import behind_proxies
from tests.proxy import TcpProxy
from tests.support import logged, running_gateway, wait_until
from tests.teams import register
from workers.admission.policy import RETRY_SECONDS
from workers.outcome import Outcome, Timing, served

HELLO = [{"role": "user", "content": "Hello"}]
HELD = 5
"""Jobs held through an outage, waiting for their claims."""


async def test_fail_closed_holds_jobs_until_redis_returns_and_loses_none(
    settings: Settings,
) -> None:
    # Given a limited team and a fail-closed worker reaching Redis through a proxy
    await register(settings, "alpha", TeamConfig(rpm=1000))
    async with TcpProxy(settings.redis_url) as proxy:
        s = settings.model_copy(update={"redis_url": proxy.url, "redis_outage": "fail_closed"})
        async with running_gateway(s) as gw, gw.client("alpha") as client:
            admission = gw.worker.admission
            assert admission is not None

            # When Redis goes away while jobs arrive
            await proxy.down()
            handles = [await client.submit(client.job("gpt-4o-mini", HELLO)) for _ in range(3)]
            await wait_until(lambda: admission.outage.down, timeout=30)

            # Expect no provider called while it is away
            assert gw.mock.stats.calls == 0

            # and, once it is back, every job served
            await proxy.up()
            results = await asyncio.gather(*(h.result(timeout=30) for h in handles))
            assert {r.status for r in results} == {"ok"}
            assert gw.mock.stats.calls == 3
            assert not admission.outage.down


async def test_fail_open_serves_from_a_local_bucket_while_redis_is_away(
    settings: Settings,
) -> None:
    # Given a team of 4 requests per minute, all 4 at once, and a fail-open worker with a
    # half share of it
    await register(settings, "alpha", TeamConfig(rpm=4, burst=4))
    async with TcpProxy(settings.redis_url) as proxy:
        s = settings.model_copy(
            update={"redis_url": proxy.url, "redis_outage": "fail_open", "admission_workers": 2}
        )
        async with running_gateway(s) as gw, gw.client("alpha") as client:
            admission = gw.worker.admission
            assert admission is not None

            # When Redis goes away and three jobs with a short deadline arrive
            await proxy.down()
            results = await asyncio.gather(
                *[
                    client.chat("gpt-4o-mini", HELLO, timeout=30, deadline=timedelta(seconds=5))
                    for _ in range(3)
                ]
            )

            # Expect two served from the worker's share (2 a minute), the third rate limited
            codes = sorted(r.error.code if r.error else "ok" for r in results)
            assert codes == ["ok", "ok", "rate_limited"]
            assert admission.outage.down

            # and the shared buckets used again once Redis is back
            await proxy.up()
            assert (await client.chat("gpt-4o-mini", HELLO, timeout=30)).status == "ok"
            assert not admission.outage.down


async def test_jobs_held_for_their_claims_ask_postgresql_once_not_at_every_try(
    settings: Settings,
) -> None:
    # Given a team without limits (its jobs held by their missed claims alone) and a
    # fail-closed worker reaching Redis and PostgreSQL through proxies, the latter watching
    # for the jobs' ids
    await register(settings, "alpha", TeamConfig())
    tag = uuid.uuid4().hex[:12]
    async with behind_proxies(settings, "redis", "database") as (through, proxies):
        closed = through.model_copy(update={"redis_outage": "fail_closed"})
        async with (
            running_gateway(settings, components=closed) as gw,
            GatewayClient(settings, team="alpha") as client,
        ):
            # When Redis goes away while jobs arrive, each looked up in usage_log once
            # (every delivery's first miss)
            await proxies["redis"].down()
            proxies["database"].watch(tag.encode())
            jobs = [client.job("gpt-4o-mini", HELLO, job_id=f"{tag}-{i}") for i in range(HELD)]
            handles = [await client.submit(job) for job in jobs]
            await wait_until(lambda: proxies["database"].seen >= HELD, timeout=30)
            # ... and they wait for their claims
            await wait_until(lambda: gw.worker.in_flight == HELD, timeout=30)
            proxies["database"].watch(tag.encode())

            # Expect PostgreSQL not asked of them again while Redis is away (tries every
            # RETRY_SECONDS: the old code asked at each)
            with contextlib.suppress(TimeoutError):
                await wait_until(lambda: proxies["database"].seen > 0, timeout=4 * RETRY_SECONDS)
            assert proxies["database"].seen == 0
            assert gw.mock.stats.calls == 0

            # ... and, once it is back, each job claimed and called once
            await proxies["redis"].up()
            results = await asyncio.gather(*(h.result(timeout=30) for h in handles))
            assert {r.status for r in results} == {"ok"}
            assert gw.mock.stats.calls == HELD


async def test_a_job_held_for_its_claim_and_answered_elsewhere_meanwhile_is_not_called(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given a team without limits and a fail-closed worker reaching Redis through a proxy,
    # and nothing Redis could have forgotten (no job is looked up in usage_log for that)
    await register(settings, "alpha", TeamConfig())
    async with behind_proxies(settings, "redis") as (through, proxies):
        closed = through.model_copy(update={"redis_outage": "fail_closed"})
        async with (
            running_gateway(settings, components=closed) as gw,
            GatewayClient(settings, team="alpha") as client,
        ):
            await redis_client.set(Keys(settings.redis_prefix).memory_epoch, "0")
            # When Redis goes away while a job arrives, and, while it waits for its claim
            # (looked up in usage_log already), a delivery that did not claim it (a fail_open
            # worker's) answers it: its usage row is written
            await proxies["redis"].down()
            job = client.job("gpt-4o-mini", HELLO)
            with logged("router.health", "Redis unavailable") as uncalled:
                handle = await client.submit(job)
                await asyncio.wait_for(uncalled.wait(), 30)
            await insert_usage(gw.pool, [_served_elsewhere(job).usage])
            # ... and Redis returns
            await proxies["redis"].up()

            # Expect it refused as answered already, the provider never called
            result = await handle.result(timeout=30)
            assert result.error is not None and result.error.code == "already_answered"
            assert gw.mock.stats.calls == 0


def _served_elsewhere(job: ChatJob) -> Outcome:
    """The job as another worker answered it."""
    routed = Routed(
        response={"id": "elsewhere", "object": "chat.completion", "choices": []},
        model_used=job.model,
        deployment="elsewhere",
        provider="openai",
        fallback_used=False,
        attempts=[Attempt(model=job.model, deployment="elsewhere", provider="openai")],
        input_tokens=1,
        output_tokens=1,
        cached_tokens=0,
        cost_usd=Decimal("0.001"),
        latency_ms=1.0,
    )
    return served(job, routed, Timing(0, "elsewhere"))
