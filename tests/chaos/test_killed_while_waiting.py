"""Chaos: a worker killed again and again while its jobs wait for admission dead-letters none
of them; a job that kills the worker on every call still ends in the dead letters."""

from __future__ import annotations

import asyncio
import signal

import aio_pika
import redis.asyncio as aioredis

from mockprovider import Behavior, MockConfig, MockProvider
from producer import GatewayClient
from queuegate import dlq
from queuegate.db import create_pool
from queuegate.keys import Keys
from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from queuegate.topology import Topology
from tests.chaos.harness import (
    Figures,
    chat_job,
    collect,
    dead_lettered,
    declare_teams,
    start_worker,
    submit_jobs,
    usage_rows,
    worker_env,
)
from tests.support import running_accountant
from tests.teams import register

JOBS = 40
RPM = 120
"""Two jobs a second: the worker holds all of them (its prefetch) long before it may call."""
KILLS = 5
DELIVERY_LIMIT = 3
"""Below KILLS: each kill returns every job the worker held, and the broker counts each return
as a delivery, so a job waiting through all the kills would pass a broker limit this low."""


async def _kill(worker: asyncio.subprocess.Process) -> None:
    worker.send_signal(signal.SIGKILL)
    await worker.wait()


async def _all_delivered(client: GatewayClient, settings: Settings) -> None:
    """Return once the team's queue has no job ready: the worker holds every one left."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        name = Topology(settings.namespace).team_queue(client.team)
        while True:
            queue = await channel.declare_queue(name, passive=True)
            if not queue.declaration_result.message_count:
                return
            await asyncio.sleep(0.05)


async def test_jobs_waiting_in_a_worker_killed_again_and_again_are_each_answered_once(
    settings: Settings,
) -> None:
    figures = Figures("worker SIGKILL x5 while jobs wait for admission")
    await register(settings, "gamma", TeamConfig(rpm=RPM))
    async with MockProvider(MockConfig(default=Behavior(latency_ms=20))) as mock:
        await declare_teams(settings, ["gamma"])
        env = worker_env(
            settings,
            mock,
            QUEUEGATE_PREFETCH=str(JOBS),
            QUEUEGATE_DELIVERY_LIMIT=str(DELIVERY_LIMIT),
            QUEUEGATE_CLAIM_LEASE="1",
        )
        worker = await start_worker(env, ["gamma"])
        pool = await create_pool(settings)
        try:
            async with running_accountant(settings), GatewayClient(settings, team="gamma") as gamma:
                # Given a team at 120 rpm whose 40 jobs all wait in one worker for admission
                jobs = [chat_job(gamma, f"job {i}") for i in range(JOBS)]
                handles = await submit_jobs(gamma, jobs)
                figures.sent = len(handles)
                # When the worker is SIGKILLed and restarted, more times than the delivery limit,
                # each time holding every job left and having called a few more
                for kill in range(1, KILLS + 1):
                    async with asyncio.timeout(60):
                        await mock.wait_for_calls(2 * kill)
                        await _all_delivered(gamma, settings)
                    await _kill(worker)
                    worker = await start_worker(env, ["gamma"])

                # Expect every job answered once, accounted once, none dead-lettered
                results = await collect(handles, timeout=120)
                figures.answered = len({r.job_id for r in results})
                figures.duplicates = gamma.duplicates
                rows, distinct = await usage_rows(pool, JOBS, timeout=30)
                figures.usage_rows = rows
                figures.provider_calls = mock.stats.calls
                figures.dead_lettered = await dead_lettered(settings)
                figures.done()
                assert all(r.status == "ok" for r in results)
                assert figures.answered == JOBS
                assert rows == distinct == JOBS
                assert figures.dead_lettered == 0
                # ... and no call made again but those a killed worker had in flight
                lost = await pool.fetchval(
                    "SELECT count(*) FROM usage_log, jsonb_array_elements(attempt_log) AS a"
                    " WHERE a->>'error' = 'lost'"
                )
                assert JOBS <= mock.stats.calls <= JOBS + lost
        finally:
            if worker.returncode is None:
                worker.send_signal(signal.SIGTERM)
            await asyncio.wait_for(worker.wait(), timeout=30)
            await pool.close()


async def test_a_job_that_kills_the_worker_on_every_call_is_dead_lettered_at_the_limit(
    settings: Settings,
) -> None:
    # Given a job whose every call hangs (llama-3.1-8b: local-llama, without fallbacks), and a
    # worker killed whenever that call is on its way, as a job crashing the worker would
    hanging = MockConfig(models={"llama-3.1-8b": Behavior(timeout_rate=1, hang_s=60)})
    redis = aioredis.from_url(settings.redis_url)
    async with MockProvider(hanging) as mock:
        await declare_teams(settings, ["alpha"])
        env = worker_env(
            settings,
            mock,
            QUEUEGATE_DELIVERY_LIMIT=str(DELIVERY_LIMIT),
            QUEUEGATE_CLAIM_LEASE="1",
        )
        worker = await start_worker(env, ["alpha"])
        try:
            async with GatewayClient(settings, team="alpha") as alpha:
                job = alpha.job("local-llama", [{"role": "user", "content": "crash"}])
                claim = Keys(settings.redis_prefix).claim("alpha", job.job_id)
                await alpha.submit(job)
                # When the worker dies in each of its calls, and comes back
                killed: bytes | None = None
                for _ in range(DELIVERY_LIMIT + 1):
                    async with asyncio.timeout(60):
                        while True:  # a new delivery holds the job, its call on its way
                            owner, attempt = await redis.hmget(claim, ["owner", "attempt"])
                            if owner not in (None, killed) and attempt is not None:
                                break
                            await asyncio.sleep(0.05)
                    await _kill(worker)
                    killed = owner
                    worker = await start_worker(env, ["alpha"])

                # Expect the job dead-lettered by the next delivery, saying why, uncalled
                assert await dead_lettered(settings, expected=1, timeout=60) == 1
                letters, _ = await dlq.peek(settings)
                assert [(x.message_id, x.reason) for x in letters] == [
                    (job.job_id, "delivery_limit")
                ]
                # ... the calls it cost billed on the outcome stored for it (its replay's
                # answer), in its usage and its result's attempts alike, its claim ended
                stored = await redis.get(Keys(settings.redis_prefix).result("alpha", job.job_id))
                assert not await redis.exists(claim)
                assert stored is not None
                assert stored.count(b'"error":"lost"') == 2 * (DELIVERY_LIMIT + 1)
                # ... and the worker still answers good jobs
                result = await alpha.chat("gpt-4o-mini", [{"role": "user", "content": "hi"}])
                assert result.status == "ok"
        finally:
            if worker.returncode is None:
                worker.send_signal(signal.SIGTERM)
            await asyncio.wait_for(worker.wait(), timeout=30)
            await redis.aclose()
