"""Chaos: a worker stopped (SIGSTOP) mid-call past its claim lease, its job taken over by a
duplicate delivery, or answered past its deadline by another worker's sweep, either billing
the stopped call as lost at its estimate, bills that call's real cost once it resumes (its
answer read, though the job's deadline passed while it was stopped): its row (``<job
id>/late/<claim>``) carries what the call cost and its tokens past the estimate's, so the
job's rows sum to what the provider served, and the budget ledger and the live spend agree
with them, the ledger keeping the stopped call's excess until then."""

from __future__ import annotations

import asyncio
import signal
from datetime import timedelta
from decimal import Decimal

import asyncpg
import redis.asyncio as aioredis

from mockprovider import Behavior, MockConfig, MockProvider
from producer import GatewayClient
from queuegate.db import create_pool
from queuegate.keys import Keys
from queuegate.messages import ChatJob
from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from queuegate.spend import current_month, from_nano, spend_drift
from tests.chaos.harness import declare_teams, start_worker, stop_workers, usage_rows, worker_env
from tests.support import consumers, running_accountant
from tests.teams import register

HELLO = [{"role": "user", "content": "Tell me a long story about a lighthouse"}]


async def test_a_stalled_owners_call_billed_as_lost_is_billed_at_its_real_cost_once_it_resumes(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given a budgeted team, a provider taking 3 s a call, and a worker taking one job at a
    # time, its claims leased for 1 s
    await register(settings, "alpha", TeamConfig(budget_usd=Decimal(5)))
    await declare_teams(settings, ("alpha",))
    # No reconciliation in the test's time: the budget ledger must hold both deliveries'
    # calls as the workers settle them (the stopped one's replaced the taker's, found drifting
    # by the cost of one call until accounting's next reconciliation)
    unreconciled = settings.model_copy(update={"spend_reconcile_interval": 3600.0})
    pool = await create_pool(settings)
    workers = []
    try:
        async with MockProvider(MockConfig(default=Behavior(latency_ms=3000))) as mock:
            env = worker_env(settings, mock, QUEUEGATE_CLAIM_LEASE="1", QUEUEGATE_PREFETCH="1")
            workers.append(stalled := await start_worker(env, ("alpha",)))
            await consumers(settings, ["alpha"], 1)
            async with (
                running_accountant(unreconciled),
                GatewayClient(settings, team="alpha") as first,
                GatewayClient(settings, team="alpha") as second,
            ):
                # When a job without max_tokens is called, its worker is stopped mid-call, and
                # the job's duplicate goes to another worker, which takes its claim over once the
                # lease lapses (billing the stopped call as lost) and answers it
                job = first.job("gpt-4o-mini", HELLO)
                handle = await first.submit(job)
                async with asyncio.timeout(60):
                    await mock.wait_for_arrivals(1)
                stalled.send_signal(signal.SIGSTOP)
                workers.append(await start_worker(env, ("alpha",)))
                answered = await (await second.submit(job)).result(timeout=60)
                # ... then the stopped worker resumes, its call answered meanwhile
                stalled.send_signal(signal.SIGCONT)
                late = await handle.result(timeout=60)
                rows, distinct = await usage_rows(pool, 2, timeout=30)
                billed, single = await _alone_and_reconciled(
                    first, settings, redis_client, pool, job
                )
                keys = Keys(settings.redis_prefix)
                live = await redis_client.get(keys.live_spend("alpha", current_month()))
                total = await pool.fetchval("SELECT sum(cost_usd) FROM usage_log")
                calls = mock.stats.calls
    finally:
        await _resumed_and_stopped(workers)
        await pool.close()

    # Expect both callers told the taker's answer, which bills the stopped call as lost
    assert (rows, distinct) == (2, 2)
    assert answered.status == late.status == "ok"
    assert answered.response == late.response
    assert calls == 3
    taker, stopped = billed
    assert [a["error"] for a in taker["attempt_log"]] == ["lost", None]
    assert taker["covers"] == [stopped["claim"]]
    # ... and the stopped worker's row, under its claim, carrying what its call cost and its
    # tokens past that estimate (the taker's row counting the estimated tokens), so the job's
    # rows sum to two calls at what one costs alone, and to their tokens (before: the
    # stopped call's counted twice, estimated and whole)
    assert stopped["job_id"] == f"{job.job_id}/late/{stopped['claim']}"
    assert single["cost_usd"] > 0
    assert taker["output_tokens"] > single["output_tokens"] and taker["tokens_estimated"]
    assert taker["output_tokens"] + stopped["output_tokens"] == 2 * single["output_tokens"]
    assert taker["cost_usd"] + stopped["cost_usd"] == 2 * single["cost_usd"]
    # ... which the live spend (`queuegate status`'s, for a team without a budget) counts too
    assert live is not None and from_nano(int(live)) == total


async def test_a_stalled_owners_call_swept_past_its_deadline_is_billed_at_its_real_cost(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given a budgeted team, a provider taking 2 s a call, a worker of the team, its claims
    # leased for 1 s, and a worker of another team sweeping lapsed claims twice a second
    await register(settings, "alpha", TeamConfig(budget_usd=Decimal(5)))
    await register(settings, "beta", TeamConfig())
    await declare_teams(settings, ("alpha", "beta"))
    # No reconciliation in the test's time, which would drop the swept job's entry
    unreconciled = settings.model_copy(update={"spend_reconcile_interval": 3600.0})
    pool = await create_pool(settings)
    workers = []
    try:
        async with MockProvider(MockConfig(default=Behavior(latency_ms=2000))) as mock:
            env = worker_env(
                settings, mock, QUEUEGATE_CLAIM_LEASE="1", QUEUEGATE_TEAMS_REFRESH="0.5"
            )
            workers.append(stalled := await start_worker(env, ("alpha",)))
            await consumers(settings, ["alpha"], 1)
            async with (
                running_accountant(unreconciled),
                GatewayClient(settings, team="alpha") as client,
            ):
                # When a job without max_tokens, due in 4 s, is called and its worker stopped
                # mid-call, its answer coming meanwhile; the sweep answers it past its
                # deadline (billing the stopped call as lost); then the worker resumes
                job = client.job("gpt-4o-mini", HELLO, deadline=timedelta(seconds=4))
                handle = await client.submit(job)
                async with asyncio.timeout(60):
                    await mock.wait_for_arrivals(1)
                stalled.send_signal(signal.SIGSTOP)
                workers.append(await start_worker(env, ("beta",)))
                swept = await handle.result(timeout=60)
                keys = Keys(settings.redis_prefix)
                async with asyncio.timeout(30):
                    # Polled: the sweep stores the outcome unannounced, just after its result
                    # (a resume before that finds none, and the stopped worker's store is the
                    # job's: its usage event meets the sweep's row, which covers its claim).
                    while not await redis_client.exists(  # noqa: ASYNC110
                        keys.result("alpha", job.job_id)
                    ):
                        await asyncio.sleep(0.05)
                ledger = keys.spend("alpha", current_month())
                excess = f"x:{job.job_id}"
                kept = await redis_client.hget(ledger, excess)
                stalled.send_signal(signal.SIGCONT)
                rows, distinct = await usage_rows(pool, 2, timeout=30)
                billed, single = await _alone_and_reconciled(
                    client, settings, redis_client, pool, job
                )
                settled = await redis_client.hmget(ledger, excess, "excess")
    finally:
        await _resumed_and_stopped(workers)
        await pool.close()

    # Expect the client told the sweep's deadline_exceeded, its row billing the stopped call
    # as lost; and the stopped worker's own row carrying what the call cost past that, its
    # answer read: the job's rows sum to the one call at what it costs alone
    assert (rows, distinct) == (2, 2)
    assert swept.error is not None and swept.error.code == "deadline_exceeded"
    sweep, stopped = billed
    assert [a["error"] for a in sweep["attempt_log"]] == ["lost"]
    assert sweep["covers"] == [stopped["claim"]]
    assert stopped["job_id"] == f"{job.job_id}/late/{stopped['claim']}"
    assert [a["error"] for a in stopped["attempt_log"]] == [None]
    assert sweep["output_tokens"] > 0 and sweep["tokens_estimated"]
    assert sweep["output_tokens"] + stopped["output_tokens"] == single["output_tokens"]
    assert sweep["cost_usd"] + stopped["cost_usd"] == single["cost_usd"]
    # ... the budget ledger keeping the stopped call's excess (what it may cost past the
    # sweep's estimate) while its worker was stopped, so that the jobs beside it near the
    # edge waited for it as for a running one, until the worker settled what it cost
    assert kept is not None and int(kept) > 0
    assert settled == [None, b"0"]


async def _alone_and_reconciled(
    client: GatewayClient,
    settings: Settings,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
    job: ChatJob,
) -> tuple[list[asyncpg.Record], asyncpg.Record]:
    """Once the same request as ``job``, sent once more under an id of its own, is served
    alone and accounted, and team alpha's ledger agrees with usage_log (reconciled, or as the
    workers settled it): ``job``'s usage rows, and that request's cost and output tokens."""
    alone = await (await client.submit(client.job("gpt-4o-mini", HELLO))).result(60)
    assert alone.status == "ok"
    await usage_rows(pool, 3, timeout=30)
    single = await pool.fetchrow(
        "SELECT cost_usd, output_tokens FROM usage_log WHERE job_id = $1", alone.job_id
    )
    keys = Keys(settings.redis_prefix)
    async with asyncio.timeout(30):
        # Polled: settles and reconciliations come unannounced.
        while await spend_drift(redis_client, pool, keys, "alpha", current_month()):  # noqa: ASYNC110
            await asyncio.sleep(0.1)
    billed = await pool.fetch(
        "SELECT * FROM usage_log WHERE job_id LIKE $1 ORDER BY job_id", f"{job.job_id}%"
    )
    return list(billed), single


async def _resumed_and_stopped(workers: list[asyncio.subprocess.Process]) -> None:
    """Stop the worker processes, resuming first any left stopped (SIGSTOP)."""
    for worker in workers:
        if worker.returncode is None:
            worker.send_signal(signal.SIGCONT)
    await stop_workers(workers)
