"""A job waiting for its team's tokens goes once the jobs ahead give back what they did not
use, not only after the wait its take computed."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from mockprovider import Behavior, MockConfig
from queuegate.keys import Keys
from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from tests.support import running_gateway
from tests.teams import register
from tests.test_admission import limited_deployment
from workers.admission import gate
from workers.admission.buckets import Buckets, Limit, settle_call
from workers.admission.scripts import Scripts


def words(last: str) -> list[dict[str, str]]:
    """A prompt of 10 tokens, one of its own (the same prompt would wait for the first's
    answer in the response cache rather than for the bucket)."""
    return [{"role": "user", "content": "ab " * 13 + last}]


TPM = 1200
"""20 tokens a second."""
MAX_TOKENS = 787
"""Estimated 10 prompt tokens + 3 + 787 = 800: two such jobs need 400 tokens more than the
bucket holds, 20 s of its refill; each uses about 30."""
ESTIMATE = 800


async def reserved(redis_client: aioredis.Redis, bucket: str) -> None:
    """Until a job's reservation put the bucket's tokens in debt (polled: Redis announces
    nothing)."""
    debt = False
    while not debt:
        debt = float(await redis_client.hget(bucket, "t") or 0) < 0
        await asyncio.sleep(0.01)


async def in_line(redis_client: aioredis.Redis, line: str, team: str) -> None:
    """Until ``team`` waits its turn in a deployment's ``line`` (polled, as ``reserved``)."""
    waiting = False
    while not waiting:
        waiting = bool(await redis_client.hexists(line, team))
        await asyncio.sleep(0.01)


async def test_a_job_waiting_for_tokens_goes_when_the_job_ahead_in_its_worker_settles(
    settings: Settings, redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given team alpha allowed 1,200 tokens a minute, and two jobs of it estimated at 800
    # tokens each, whose calls take 3 s: one admitted and in its call, the other reserved
    # behind it, told to wait 20 s; its worker looking at the bucket on its own only every
    # minute, so that only its settle's wake can let the second go sooner
    monkeypatch.setattr(gate, "CHECK_SECONDS", 60.0)
    await register(settings, "alpha", TeamConfig(tpm=TPM))
    bucket = Keys(settings.redis_prefix).team_bucket("alpha")
    slow = MockConfig(default=Behavior(latency_ms=3000))
    async with running_gateway(settings, mock_config=slow) as gw, gw.client("alpha") as client:
        jobs = [client.job("gpt-4o-mini", words(last), max_tokens=MAX_TOKENS) for last in "ab"]
        handles = [await client.submit(job) for job in jobs]
        await asyncio.wait_for(reserved(redis_client, bucket), 10)
        assert gw.mock.stats.calls == 0  # the first still in its call

        # When the first job's call ends, having used a few dozen tokens, and it settles
        results = [await handle.result(timeout=30) for handle in handles]

    # Expect the second called right after the first's answer (the refund paid its debt),
    # not 20 s after its reservation
    assert [r.status for r in results] == ["ok", "ok"]
    assert all(r.response and r.response["usage"]["total_tokens"] < 50 for r in results)
    answered = [call.t for call in gw.mock.requests]
    assert answered[1] - answered[0] >= 2.9  # called after the first's answer, never before
    assert answered[1] - answered[0] < 10.0


async def test_a_job_waiting_for_tokens_goes_when_another_workers_job_settles(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given team alpha allowed 1,200 tokens a minute, another worker's job of it admitted
    # with an estimate of 800 tokens, and a job of it reserved behind in this gateway's
    # worker, told to wait 20 s
    await register(settings, "alpha", TeamConfig(tpm=TPM))
    bucket = Keys(settings.redis_prefix).team_bucket("alpha")
    limit = Limit(bucket, "team alpha", None, TPM, team="alpha")
    other = Scripts(redis_client, Keys(settings.redis_prefix))
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        assert (await Buckets(other).take([limit], ESTIMATE)).taken
        waiting = await client.submit(client.job("gpt-4o-mini", words("a"), max_tokens=MAX_TOKENS))
        await asyncio.wait_for(reserved(redis_client, bucket), 10)

        # When the other worker's job settles, having used 30 tokens
        refund = settle_call([limit], ESTIMATE - 30)
        assert refund is not None
        await other.run(refund)
        settled = time.monotonic()
        result = await waiting.result(timeout=30)

    # Expect the waiting job called within about a second (its worker looks again every
    # second while a reservation waits), not 20 s after its reservation
    assert result.status == "ok"
    assert gw.mock.requests[0].t - settled < 5.0


async def test_a_job_waiting_for_a_deployments_tokens_takes_again_when_the_job_ahead_settles(
    settings: Settings, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    # Given a deployment whose provider account allows 1,200 tokens a minute, and two jobs
    # estimated at 800 tokens each, whose calls take 3 s: one in its call, the other waiting
    # its team's turn in the deployment's line, told the tokens come in 20 s
    catalog = limited_deployment(tmp_path, f"tpm: {TPM}")
    line = Keys(settings.redis_prefix).deployment_line("small-1")
    slow = MockConfig(default=Behavior(latency_ms=3000))
    async with (
        running_gateway(settings, catalog=catalog, mock_config=slow) as gw,
        gw.client("alpha") as client,
    ):
        jobs = [client.job("small", words(last), max_tokens=MAX_TOKENS) for last in "ab"]
        handles = [await client.submit(job) for job in jobs]
        await asyncio.wait_for(in_line(redis_client, line, "alpha"), 10)
        assert gw.mock.stats.calls == 0  # the first still in its call

        # When the first job's call ends, having used a few dozen tokens, and it settles
        results = [await handle.result(timeout=30) for handle in handles]

    # Expect the second called right after the first's answer, not 20 s after its take
    assert [r.status for r in results] == ["ok", "ok"]
    answered = [call.t for call in gw.mock.requests]
    assert answered[1] - answered[0] >= 2.9
    assert answered[1] - answered[0] < 10.0
