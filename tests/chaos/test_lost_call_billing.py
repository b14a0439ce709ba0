"""Chaos: the call a SIGKILLed worker had in flight is billed once, on the job's usage row and
in its budget ledger alike, whether its job is called again, refused before any cost, expires
in its queue with no delivery coming back (answered and billed by another worker's sweep,
its reply queue there or gone), or is dead-lettered past the delivery limit; and a call cut
off at the job's deadline once sent is billed as alike."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import timedelta
from decimal import Decimal

import asyncpg
import redis.asyncio as aioredis

from mockprovider import Behavior, MockConfig, MockProvider
from producer import GatewayClient
from producer.client import JobHandle
from queuegate import dlq
from queuegate.db import create_pool
from queuegate.keys import Keys
from queuegate.messages import ChatJob, ChatResult
from queuegate.registry import TeamConfig, set_team_config
from queuegate.settings import Settings
from queuegate.spend import current_month, from_nano, ledger_spent, spend_drift
from router import load_catalog
from tests.chaos.harness import (
    dead_lettered,
    declare_teams,
    start_worker,
    stop_workers,
    usage_rows,
    worker_env,
    workers_running,
)
from tests.support import running_accountant
from tests.teams import register
from workers.admission.estimate import estimate

HELLO = [{"role": "user", "content": "Hello there"}]


@asynccontextmanager
async def killed_mid_call(
    settings: Settings, deadline: timedelta | None = None
) -> AsyncIterator[tuple[MockProvider, AsyncExitStack, JobHandle, asyncpg.Pool, dict[str, str]]]:
    """A budgeted team's job (due within ``deadline``) whose worker is SIGKILLed while the
    mock provider yielded holds its call (as it holds every call until reconfigured);
    accounting runs without reconciling, so the ledger shows what the workers settled. The
    client closes with the stack yielded (early when the test closes it). Workers on the
    environment yielded sweep lapsed claims twice a second."""
    await register(settings, "alpha", TeamConfig(budget_usd=Decimal(5)))
    await declare_teams(settings, ("alpha",))
    pool = await create_pool(settings)
    unreconciled = settings.model_copy(update={"spend_reconcile_interval": 86400})
    try:
        async with MockProvider(MockConfig(default=Behavior(timeout_rate=1, hang_s=300))) as mock:
            env = worker_env(
                settings, mock, QUEUEGATE_CLAIM_LEASE="1", QUEUEGATE_TEAMS_REFRESH="0.5"
            )
            async with (
                workers_running(env, ("alpha",)) as [worker],
                running_accountant(unreconciled),
                AsyncExitStack() as stack,
            ):
                client = await stack.enter_async_context(GatewayClient(settings, team="alpha"))
                job = client.job("gpt-4o-mini", HELLO, max_tokens=50, deadline=deadline)
                handle = await client.submit(job)
                async with asyncio.timeout(60):
                    await mock.wait_for_calls(1)
                worker.send_signal(signal.SIGKILL)
                await worker.wait()
                yield mock, stack, handle, pool, env
    finally:
        await pool.close()


async def ledger_drift(
    redis_client: aioredis.Redis, pool: asyncpg.Pool, settings: Settings
) -> Decimal:
    """The team's ledger (never reconciled here) minus what usage_log holds."""
    keys = Keys(settings.redis_prefix)
    return await spend_drift(redis_client, pool, keys, "alpha", current_month())


async def claim_left(
    redis_client: aioredis.Redis, settings: Settings, job_id: str
) -> tuple[int, int]:
    """Lapsing claims, and whether the job's claim is there: what a sweep could still take."""
    keys = Keys(settings.redis_prefix)
    return await redis_client.zcard(keys.lapsing), await redis_client.exists(
        keys.claim("alpha", job_id)
    )


async def taken_over(pool: asyncpg.Pool, env: dict[str, str], handle: JobHandle) -> ChatResult:
    """The job's result once a worker of its team takes it over, and its one usage row."""
    async with workers_running(env, ("alpha",)):
        result = await handle.result(timeout=60)
        assert await usage_rows(pool, 1, timeout=30) == (1, 1)
    return result


@asynccontextmanager
async def swept(settings: Settings, env: dict[str, str], sweepers: int = 2) -> AsyncIterator[None]:
    """The job of ``killed_mid_call`` expired in its queue (dead-lettered by the broker, no
    delivery of it coming back), then ``sweepers`` workers of team beta, which holds no job,
    running on ``env`` while the body runs: the sweep of its lapsed claim is theirs."""
    await register(settings, "beta", TeamConfig())
    await declare_teams(settings, ("beta",))
    assert await dead_lettered(settings, expected=1, timeout=30) == 1
    async with workers_running(env, ("beta",), sweepers):
        yield


async def test_a_lost_call_whose_job_is_called_again_is_billed_alike_in_row_ledger_and_result(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given a job whose worker is killed mid-call
    async with killed_mid_call(settings) as (mock, _, handle, pool, env):
        # When another worker takes it over and the provider answers
        mock.configure(MockConfig())
        result = await taken_over(pool, env, handle)
        assert result.status == "ok", result.error
        row = await pool.fetchrow("SELECT * FROM usage_log")
        drift = await ledger_drift(redis_client, pool, settings)

    # Expect the row to count the lost call, the client told that call and its cost, and the
    # ledger charged it
    assert row["attempt_log"][0]["error"] == "lost"
    assert result.gateway is not None
    assert [a.error for a in result.gateway.attempts] == [a["error"] for a in row["attempt_log"]]
    assert result.gateway.cost_usd == Decimal(row["cost_usd"]) > 0
    assert drift == 0


async def test_a_lost_call_whose_job_is_refused_before_any_cost_is_on_the_jobs_row(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given a job whose worker is killed mid-call
    async with killed_mid_call(settings) as (mock, stack, handle, pool, env):
        # When its reply queue is gone (its client closed) before another worker takes
        # it over
        await stack.aclose()
        async with workers_running(env, ("alpha",)):
            assert (await usage_rows(pool, 1, timeout=60))[0] >= 1
        rows = await pool.fetch("SELECT * FROM usage_log")
        drift = await ledger_drift(redis_client, pool, settings)
        calls = mock.stats.calls

    # Expect it refused without a second call, and its one row, under its own id, to carry
    # the lost call at its estimate, which the ledger charges too
    assert calls == 1
    assert [(r["job_id"], r["error_code"]) for r in rows] == [(handle.job_id, "invalid_request")]
    assert rows[0]["attempt_log"][0]["error"] == "lost"
    assert Decimal(rows[0]["cost_usd"]) > 0
    assert drift == 0


async def test_a_lost_call_whose_job_is_refused_over_budget_is_charged_as_its_row_says(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given a job whose worker is killed mid-call
    async with killed_mid_call(settings) as (mock, _, handle, pool, env):
        # When its team's budget is cut below a call before another worker takes it over
        await set_team_config(pool, "alpha", TeamConfig(budget_usd=Decimal("0.000001")))
        result = await taken_over(pool, env, handle)
        row = await pool.fetchrow("SELECT * FROM usage_log")
        drift = await ledger_drift(redis_client, pool, settings)
        calls = mock.stats.calls

    # Expect it refused without a second call, its row carrying the lost call, and the client
    # and the ledger told that cost
    assert calls == 1
    assert result.error is not None and result.error.code == "budget_exhausted"
    assert row["attempt_log"][0]["error"] == "lost"
    assert result.gateway is not None
    assert [a.error for a in result.gateway.attempts] == ["lost"]
    assert result.gateway.cost_usd == Decimal(row["cost_usd"]) > 0
    assert drift == 0


async def test_a_lost_call_whose_job_the_budget_holds_once_but_not_twice_is_not_called_again(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given a job whose worker is killed mid-call: its ledger holds the lost call's estimate
    async with killed_mid_call(settings) as (mock, _, handle, pool, env):
        keys = Keys(settings.redis_prefix)
        reserved = await ledger_spent(redis_client, keys, "alpha", current_month())
        catalog = load_catalog(None, {"QUEUEGATE_MOCK_URL": mock.url})
        called = catalog.resolve("gpt-4o-mini").deployments[0]
        job = ChatJob.model_validate(
            {"job_id": handle.job_id, "team": "alpha", "model": "gpt-4o-mini", "messages": HELLO,
             "params": {"max_tokens": 50}}
        )  # fmt: skip
        lost = estimate(job, catalog, TeamConfig(), 256).usd_at(called)
        assert reserved is not None and 0 < lost <= reserved
        # When its team's budget holds another call's reservation but not the lost call as
        # well before a worker takes it over (a redelivery's reserve replaced the killed one's
        # entry: the lost call's cost was freed, and the job was called again past the budget)
        mock.configure(MockConfig())
        await set_team_config(pool, "alpha", TeamConfig(budget_usd=reserved + lost / 2))
        result = await taken_over(pool, env, handle)
        row = await pool.fetchrow("SELECT * FROM usage_log")
        calls = mock.stats.calls

    # Expect it refused over budget without a second call, its lost call charged
    assert calls == 1
    assert result.error is not None and result.error.code == "budget_exhausted"
    assert [a["error"] for a in row["attempt_log"]] == ["lost"]
    assert Decimal(row["cost_usd"]) == lost


async def test_a_lost_call_whose_job_expires_in_its_queue_is_billed_once_by_a_sweep_and_replay(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given a job due in 8 s whose worker is killed mid-call, and no other worker taking
    # its team's jobs
    async with killed_mid_call(settings, deadline=timedelta(seconds=8)) as (
        mock,
        _,
        handle,
        pool,
        env,
    ):
        # When it expires in its queue (dead-lettered by the broker) and a worker of
        # another team sweeps
        async with swept(settings, env):
            assert await usage_rows(pool, 1, timeout=30) == (1, 1)
            rows = await pool.fetch("SELECT * FROM usage_log")
        drift = await ledger_drift(redis_client, pool, settings)
        lapsing, claimed = await claim_left(redis_client, settings, handle.job_id)
        keys = Keys(settings.redis_prefix)
        stored = await redis_client.get(keys.result("alpha", handle.job_id))
        # ... and when it is then replayed from the dead letters to a worker of its team
        mock.configure(MockConfig())
        async with workers_running(env, ("alpha",)):
            replayed, _ = await dlq.replay(settings, {handle.job_id})
            result = await handle.result(timeout=60)
        replay_drift = await ledger_drift(redis_client, pool, settings)
        calls = mock.stats.calls
        # (the spend `queuegate status` shows for a team without a budget)
        live = await redis_client.get(keys.live_spend("alpha", current_month()))

    # Expect one row under the job's own id, for its team, carrying the lost call at its
    # estimate, which the ledger and the live spend count too (once: not again for the
    # replay); no second call
    assert calls == 1
    assert [(r["job_id"], r["team"], r["error_code"]) for r in rows] == [
        (handle.job_id, "alpha", "deadline_exceeded")
    ]
    assert [a["error"] for a in rows[0]["attempt_log"]] == ["lost"]
    assert Decimal(rows[0]["cost_usd"]) > 0
    assert drift == 0
    assert live is not None and from_nano(int(live)) == Decimal(rows[0]["cost_usd"])
    # ... and nothing left that a sweep or a late delivery could bill again: the claim is
    # gone, the job's outcome stored (a delivery still to come is answered from it)
    assert (lapsing, claimed) == (0, 0)
    assert stored is not None and b"deadline_exceeded" in stored
    # ... and the replay answered from that outcome, telling the client the row's cost,
    # without a call or a charge
    assert len(replayed) == 1
    assert result.error is not None and result.error.code == "deadline_exceeded"
    assert result.gateway is not None
    assert result.gateway.cost_usd == Decimal(rows[0]["cost_usd"])
    assert replay_drift == 0


async def test_a_job_that_expires_in_its_queue_after_its_worker_died_mid_call_is_answered_once(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given a job due in 8 s whose worker is killed mid-call, its client still waiting
    async with killed_mid_call(settings, deadline=timedelta(seconds=8)) as (
        _,
        _,
        handle,
        pool,
        env,
    ):
        # When it expires in its queue (no delivery of it comes back) and two workers of
        # another team sweep
        async with swept(settings, env):
            result = await handle.result(timeout=30)
            assert await usage_rows(pool, 1, timeout=30) == (1, 1)
        rows = await pool.fetch("SELECT * FROM usage_log")
        lapsing, claimed = await claim_left(redis_client, settings, handle.job_id)
        duplicates = handle._client.duplicates

    # Expect the client answered deadline_exceeded by the sweep that billed it, told the
    # cost its one row holds, and delivered that result once
    assert result.error is not None and result.error.code == "deadline_exceeded"
    assert [(r["job_id"], r["error_code"], r["reply_delivered"]) for r in rows] == [
        (handle.job_id, "deadline_exceeded", True)
    ]
    assert result.gateway is not None
    assert result.gateway.cost_usd == Decimal(rows[0]["cost_usd"]) > 0
    assert duplicates == 0
    # ... and nothing left for a later sweep to answer or bill again
    assert (lapsing, claimed) == (0, 0)


async def test_a_swept_job_whose_reply_queue_is_gone_is_still_billed_once(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given a job due in 8 s whose worker is killed mid-call
    async with killed_mid_call(settings, deadline=timedelta(seconds=8)) as (
        _,
        stack,
        handle,
        pool,
        env,
    ):
        # When its reply queue is gone (its client closed) and it expires in its queue
        # before a worker of another team sweeps
        await stack.aclose()
        async with swept(settings, env, sweepers=1):
            assert await usage_rows(pool, 1, timeout=30) == (1, 1)
        rows = await pool.fetch("SELECT * FROM usage_log")
        drift = await ledger_drift(redis_client, pool, settings)
        lapsing, claimed = await claim_left(redis_client, settings, handle.job_id)

    # Expect its one row, the result undelivered, the lost call billed alike in the ledger,
    # and the claim done with: the answer that reached nobody failed no sweep
    assert [(r["job_id"], r["error_code"], r["reply_delivered"]) for r in rows] == [
        (handle.job_id, "deadline_exceeded", False)
    ]
    assert Decimal(rows[0]["cost_usd"]) > 0
    assert drift == 0
    assert (lapsing, claimed) == (0, 0)


async def kill_takers_until_dead_lettered(
    settings: Settings, mock: MockProvider, env: dict[str, str], killed: int
) -> tuple[int, asyncio.subprocess.Process]:
    """SIGKILL each worker that takes the job over and calls it, after ``killed`` such
    kills, until one dead-letters it instead: the kills, and the worker that did."""
    while True:
        worker = await start_worker(env, ("alpha",))
        called = asyncio.ensure_future(mock.wait_for_calls(killed + 1))
        dead = asyncio.ensure_future(dead_lettered(settings, expected=1, timeout=60))
        done, _ = await asyncio.wait({called, dead}, return_when=asyncio.FIRST_COMPLETED)
        if called not in done:
            called.cancel()
            assert await dead == 1
            return killed, worker
        dead.cancel()
        worker.send_signal(signal.SIGKILL)
        await worker.wait()
        killed += 1


async def test_lost_calls_of_a_job_dead_lettered_past_the_delivery_limit_are_billed_once(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given a job with no deadline and a delivery limit of 2, whose owners are killed mid-call
    async with killed_mid_call(settings) as (mock, _, handle, pool, env):
        limited = {**env, "QUEUEGATE_DELIVERY_LIMIT": "2"}
        # When each worker taking it over is killed too, until one dead-letters it
        kills, last = await kill_takers_until_dead_lettered(settings, mock, limited, 1)
        try:
            assert await usage_rows(pool, 1, timeout=30) == (1, 1)
            rows = await pool.fetch("SELECT * FROM usage_log")
            drift = await ledger_drift(redis_client, pool, settings)
            # ... and when it is then replayed from the dead letters
            mock.configure(MockConfig())
            replayed, _ = await dlq.replay(settings, {handle.job_id})
            result = await handle.result(timeout=60)
        finally:
            await stop_workers([last])
        replay_rows = await pool.fetchval("SELECT count(*) FROM usage_log")
        replay_drift = await ledger_drift(redis_client, pool, settings)
        calls = mock.stats.calls

    # Expect one row under its id carrying each lost call at its estimate (one per kill,
    # past the limit), which the ledger charges too
    assert kills == 3
    assert [(r["job_id"], r["error_code"]) for r in rows] == [(handle.job_id, "provider_error")]
    assert [a["error"] for a in rows[0]["attempt_log"]] == ["lost"] * kills
    assert Decimal(rows[0]["cost_usd"]) > 0
    assert drift == 0
    # ... and the replay answered from its stored outcome with the row's cost, without a
    # call, a row or a charge more
    assert len(replayed) == 1
    assert result.error is not None and result.error.code == "provider_error"
    assert result.gateway is not None
    assert result.gateway.cost_usd == Decimal(rows[0]["cost_usd"])
    assert (calls, replay_rows, replay_drift) == (kills, 1, 0)


async def test_a_call_cut_off_at_the_jobs_deadline_once_sent_is_billed_at_its_estimate(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given a budgeted team's job due in 1.5 s, and a provider slower than that
    await register(settings, "alpha", TeamConfig(budget_usd=Decimal(5)))
    await declare_teams(settings, ("alpha",))
    unreconciled = settings.model_copy(update={"spend_reconcile_interval": 86400})
    pool = await create_pool(settings)
    async with MockProvider(MockConfig(default=Behavior(timeout_rate=1, hang_s=30))) as mock:
        try:
            async with workers_running(worker_env(settings, mock), ("alpha",)):
                async with (
                    running_accountant(unreconciled),
                    GatewayClient(settings, team="alpha") as client,
                ):
                    # When the worker calls it and the deadline cuts the call
                    job = client.job(
                        "gpt-4o-mini", HELLO, max_tokens=50, deadline=timedelta(seconds=1.5)
                    )
                    result = await (await client.submit(job)).result(timeout=60)
                    assert await usage_rows(pool, 1, timeout=30) == (1, 1)
                row = await pool.fetchrow("SELECT * FROM usage_log")
                drift = await ledger_drift(redis_client, pool, settings)
        finally:
            await pool.close()
        catalog = load_catalog(None, {"QUEUEGATE_MOCK_URL": mock.url})

    # Expect the call on its row, its result and in the ledger at a lost call's estimate,
    # and its message to say it was called
    call = row["attempt_log"][0]
    deployments = catalog.resolve(call["model"]).deployments
    deployment = next(d for d in deployments if d.name == call["deployment"])
    expected = estimate(job, catalog, TeamConfig(), 256).usd_at(deployment)
    assert [a["error"] for a in row["attempt_log"]] == ["timeout"]
    assert row["error_code"] == "deadline_exceeded"
    assert Decimal(row["cost_usd"]) == expected > 0
    assert result.gateway is not None and result.gateway.cost_usd == expected
    assert result.error is not None and "after calling" in result.error.message
    assert drift == 0
