"""A worker SIGKILLed mid-call leaves no reservation behind: Redis's spend equals PostgreSQL's;
and ``queuegate status``'s spend of a team without a budget equals PostgreSQL's too."""

from __future__ import annotations

import asyncio
import signal
from decimal import Decimal

import redis.asyncio as aioredis

from mockprovider import Behavior, MockConfig, MockProvider
from producer import GatewayClient
from queuegate.db import create_pool
from queuegate.keys import Keys
from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from queuegate.spend import current_month, spend_drift
from queuegate.status import StatusReader
from tests.chaos.harness import (
    chat_job,
    collect,
    declare_teams,
    jobs_flowing,
    start_worker,
    stop_workers,
    usage_rows,
    worker_env,
)
from tests.support import consumers, running_accountant
from tests.teams import register

JOBS = 120
KILL_AFTER_CALLS = 30
BUDGET = Decimal("0.05")
"""About ten times what the jobs really cost, and less than what their reservations (each
priced at the dearest fallback) would hold if the killed worker's stayed counted."""
KILL_AFTER_ANSWERS = 70
"""Past the first calls of both workers (2 x 20 at once): the worker killed has answered jobs
by then, and holds calls in flight."""


async def test_a_killed_workers_reservations_lapse_and_spend_matches_postgresql(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given two worker processes serving team alpha (claims leased for 1 s: the jobs the
    # killed one held are taken over a second after it died, not ten), whose budget holds
    # its jobs' real cost, and a provider taking 300 ms a call
    await register(settings, "alpha", TeamConfig(budget_usd=BUDGET))
    quick = settings.model_copy(update={"spend_reconcile_interval": 0.2})
    async with MockProvider(MockConfig(default=Behavior(latency_ms=300))) as mock:
        await declare_teams(settings, ("alpha",))
        env = worker_env(settings, mock, QUEUEGATE_PREFETCH="20", QUEUEGATE_CLAIM_LEASE="1")
        workers = [await start_worker(env, ("alpha",)), await start_worker(env, ("alpha",))]
        pool = await create_pool(settings)
        try:
            async with running_accountant(quick), GatewayClient(settings, team="alpha") as client:
                # When jobs flow and one worker is killed mid-call, then restarted
                submitting = await jobs_flowing([client], mock, JOBS, KILL_AFTER_CALLS, within=60)
                workers[0].send_signal(signal.SIGKILL)
                await workers[0].wait()
                workers[0] = await start_worker(env, ("alpha",))
                results = await collect(await submitting, timeout=120)
                rows, distinct = await usage_rows(pool, JOBS, timeout=30)

                # Expect every job served (none refused for the dead worker's reservations),
                # and Redis's spend equal to PostgreSQL's once reconciled
                assert [r.error for r in results if r.status != "ok"] == []
                assert rows == distinct == JOBS
                keys = Keys(settings.redis_prefix)
                async with asyncio.timeout(30):
                    # Polled: reconciliations run on accounting's schedule, unannounced.
                    while await spend_drift(  # noqa: ASYNC110
                        redis_client, pool, keys, "alpha", current_month()
                    ):
                        await asyncio.sleep(0.1)
        finally:
            await stop_workers(workers)
            await pool.close()


async def test_status_spend_of_a_team_without_a_budget_matches_postgresql_after_a_kill(
    settings: Settings,
) -> None:
    # Given two worker processes serving team alpha, which has no budget (status shows the
    # spend the workers saw), writing their live stats only as they stop, and a provider
    # taking 300 ms a call
    await register(settings, "alpha", TeamConfig())
    async with MockProvider(MockConfig(default=Behavior(latency_ms=300))) as mock:
        await declare_teams(settings, ("alpha",))
        env = worker_env(settings, mock, QUEUEGATE_PREFETCH="20", QUEUEGATE_STATS_INTERVAL="3600")
        workers = [await start_worker(env, ("alpha",)), await start_worker(env, ("alpha",))]
        pool = await create_pool(settings)
        try:
            await consumers(settings, ["alpha"], 2)
            async with (
                running_accountant(settings),
                GatewayClient(settings, team="alpha") as client,
            ):
                # (both answering first: on a loaded machine a worker just started may not
                # have called yet when the other made the calls the kill waits for)
                warmed = await _answered_by(client, 2)
                # When one worker is SIGKILLed mid-load, having answered jobs (their spend
                # unwritten in its live stats), then restarted
                calls = mock.stats.calls + KILL_AFTER_ANSWERS
                submitting = await jobs_flowing([client], mock, JOBS, calls, 60)
                workers[0].send_signal(signal.SIGKILL)
                await workers[0].wait()
                workers[0] = await start_worker(env, ("alpha",))
                results = await collect(await submitting, timeout=120)
                rows, distinct = await usage_rows(pool, JOBS + warmed, timeout=30)
                billed = await pool.fetchval("SELECT sum(cost_usd) FROM usage_log")
            await stop_workers(workers)  # their last live stats written
            async with StatusReader(settings) as reader:
                [alpha] = (await reader.read(["alpha"])).teams
        finally:
            await stop_workers(workers)
            await pool.close()

    # Expect every job served once, and status's spend PostgreSQL's, exactly (the killed
    # worker's answers included; lost calls a sweep bills: test_lost_call_billing)
    assert [r.error for r in results if r.status != "ok"] == []
    assert rows == distinct == JOBS + warmed
    assert alpha.budget_usd is None
    assert alpha.spend_usd == billed


async def _answered_by(client: GatewayClient, workers: int) -> int:
    """Submit jobs 20 at a time until ``workers`` workers have answered some: how many."""
    answered: set[str] = set()
    sent = 0
    async with asyncio.timeout(60):
        while len(answered) < workers:
            handles = [await client.submit(chat_job(client, "warm")) for _ in range(20)]
            sent += len(handles)
            answered |= {r.gateway.worker for r in await collect(handles, timeout=30)}
    return sent
