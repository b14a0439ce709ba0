"""Chaos: a job whose worker went away while the job waited for admission (its claim held, no
call recorded) is taken over by its redelivery at once, not after the claim's lease, and is
called once: by the redelivery, never by the worker it was taken from, should that one live."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from decimal import Decimal

import asyncpg
import redis.asyncio as aioredis

from mockprovider import Behavior, MockConfig, MockProvider
from producer import GatewayClient, JobHandle
from queuegate.db import create_pool
from queuegate.keys import Keys
from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from tests.chaos.harness import (
    chat_job,
    declare_teams,
    start_worker,
    stop_workers,
    usage_rows,
    worker_env,
)
from tests.proxy import TcpProxy
from tests.support import running_accountant
from tests.teams import register

LEASE = "60"
"""Far longer than the takeover may take: a redelivery that waited for it would answer the job
past the test's wait for it."""
PROMPTLY = 45.0
"""Seconds from the worker's loss to the job's answer: the redelivery waits its turn in the
team's bucket (the next request after the one the lost worker had reserved, 24 s at most),
not the lease."""
TEAM = TeamConfig(rpm=5, burst=1)
"""A request every 12 s: the second job waits in its worker long enough to lose it there."""
QUICK = MockConfig(default=Behavior(latency_ms=20))


@contextlib.asynccontextmanager
async def _gamma(settings: Settings) -> AsyncIterator[tuple[aioredis.Redis, asyncpg.Pool]]:
    """Team gamma at ``TEAM``'s limits with its queue, and Redis and PostgreSQL to look in."""
    await register(settings, "gamma", TEAM)
    await declare_teams(settings, ["gamma"])
    redis = aioredis.from_url(settings.redis_url)
    pool = await create_pool(settings)
    try:
        yield redis, pool
    finally:
        await pool.close()
        await redis.aclose()


async def _waiting(redis: aioredis.Redis, claim: str) -> bytes:
    """The owner of ``claim`` once a delivery holds it with no call recorded: its job waits
    for admission."""
    while True:
        owner, attempt = await redis.hmget(claim, ["owner", "attempt"])
        if owner is not None and attempt is None:
            return bytes(owner)
        await asyncio.sleep(0.05)


async def _second_job_waiting(
    client: GatewayClient, redis: aioredis.Redis, mock: MockProvider, settings: Settings
) -> tuple[JobHandle, str]:
    """Submit a job that is called at once, then one that waits behind it for the team's
    next request; return the waiting one's handle and claim key once it waits."""
    first = await client.submit(chat_job(client, "first"))
    async with asyncio.timeout(60):
        await mock.wait_for_calls(1)
    assert (await first.result(timeout=30)).status == "ok"
    job = chat_job(client, "second")
    claim = Keys(settings.redis_prefix).claim(client.team, job.job_id)
    handle = await client.submit(job)
    async with asyncio.timeout(30):
        await _waiting(redis, claim)
    return handle, claim


async def _billed_once(pool: asyncpg.Pool, job_id: str, cost: Decimal | None) -> None:
    """Expect the job's one usage row, of one call, costing what its result said."""
    assert await usage_rows(pool, 2, timeout=30) == (2, 2)  # the first job's and its
    rows = await pool.fetch("SELECT * FROM usage_log WHERE job_id = $1", job_id)
    assert len(rows) == 1
    row = rows[0]
    assert row["attempts"] == 1
    assert all(a.get("error") != "lost" for a in row["attempt_log"])
    assert Decimal(row["cost_usd"]) == cost


async def test_a_job_whose_worker_dies_while_it_waits_is_served_by_another_at_once(
    settings: Settings,
) -> None:
    # Given a team at 5 rpm, and a worker with a 60 s claim lease holding its second job
    # waiting for the team's next request (its first job called)
    async with _gamma(settings) as (redis, pool), MockProvider(QUICK) as mock:
        env = worker_env(settings, mock, QUEUEGATE_CLAIM_LEASE=LEASE, QUEUEGATE_CLAIM_WAIT="90")
        worker = await start_worker(env, ["gamma"])
        workers = [worker]
        try:
            async with running_accountant(settings), GatewayClient(settings, team="gamma") as gamma:
                handle, claim = await _second_job_waiting(gamma, redis, mock, settings)
                owner = await redis.hget(claim, "owner")

                # When that worker is SIGKILLed, and another starts
                worker.send_signal(signal.SIGKILL)
                await worker.wait()
                workers.append(await start_worker(env, ["gamma"]))

                # Expect the job answered long before the lease could lapse, by one call
                result = await handle.result(timeout=PROMPTLY)
                assert result.status == "ok", result.error
                assert await redis.hget(claim, "owner") != owner
                assert mock.stats.calls == 2
                # ... one usage row for it, of that one call, billed once
                assert result.gateway is not None
                await _billed_once(pool, handle.job_id, result.gateway.cost_usd)
        finally:
            await stop_workers(workers)


async def test_a_worker_cut_off_while_its_job_waits_never_calls_the_job_served_elsewhere(
    settings: Settings,
) -> None:
    # Given a worker reaching the broker through a proxy, each worker calling its own mock
    # provider, and that worker holding a team's second job waiting for the team's next
    # request (its first job called), with 60 s claim leases
    async with (
        _gamma(settings) as (redis, pool),
        MockProvider(QUICK) as cut_mock,
        MockProvider(QUICK) as other_mock,
        TcpProxy(settings.amqp_url) as proxy,
    ):
        leases = {"QUEUEGATE_CLAIM_LEASE": LEASE, "QUEUEGATE_CLAIM_WAIT": "90"}
        cut_env = worker_env(settings, cut_mock, QUEUEGATE_AMQP_URL=proxy.url, **leases)
        workers = [await start_worker(cut_env, ["gamma"])]
        try:
            async with running_accountant(settings), GatewayClient(settings, team="gamma") as gamma:
                handle, _ = await _second_job_waiting(gamma, redis, cut_mock, settings)

                # When its broker connection is cut (the worker lives on, the job in its
                # wait), and another worker starts
                await proxy.down()
                workers.append(
                    await start_worker(worker_env(settings, other_mock, **leases), ["gamma"])
                )

                # Expect the job answered by the other worker's one call, long before the
                # lease could lapse
                result = await handle.result(timeout=PROMPTLY)
                assert result.status == "ok", result.error
                assert other_mock.stats.calls == 1
                assert result.gateway is not None
                await _billed_once(pool, handle.job_id, result.gateway.cost_usd)
                # ... and the worker it was taken from, past its turn in the team's bucket (12 s
                # after the first job, 12 s before the other worker's), never calling it
                assert cut_mock.stats.calls == 1  # the first job's alone
        finally:
            await proxy.up()
            await stop_workers(workers)
