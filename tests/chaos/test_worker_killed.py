"""Chaos 1: one of two worker processes is SIGKILLed mid-run and restarted; a worker is
SIGKILLed before its answered jobs are accounted (a job of them taken back, or expired in its
queue and swept), or before it published a job's stored result (the job expired and swept:
the sweep answers it)."""

from __future__ import annotations

import asyncio
import signal
from asyncio.subprocess import Process
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from decimal import Decimal
from typing import NamedTuple

import asyncpg
import redis.asyncio as aioredis

from mockprovider import Behavior, MockConfig, MockProvider
from producer import GatewayClient
from queuegate import dlq
from queuegate.broker import connect
from queuegate.db import create_pool
from queuegate.keys import Keys
from queuegate.messages import ChatResult
from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from queuegate.spend import current_month, ledger_spent, spend_drift
from queuegate.topology import Topology
from tests.chaos.harness import (
    TEAMS,
    Figures,
    collect,
    dead_lettered,
    declare_teams,
    jobs_flowing,
    start_worker,
    stop_workers,
    team_clients,
    usage_rows,
    worker_env,
)
from tests.proxy import TcpProxy
from tests.support import running_accountant
from tests.teams import register
from workers.claims import stored_outcome

JOBS = 2000
KILL_AFTER_CALLS = 600
PREFETCH = 50
HELLO = [{"role": "user", "content": "hi"}]


async def test_a_killed_worker_process_loses_nothing_and_doubles_nothing(
    settings: Settings,
) -> None:
    figures = Figures("worker SIGKILL")
    # Given two worker processes serving three teams against a provider taking 20 ms a call
    # (claims leased for 1 s: the jobs the killed one held are taken over a second after it
    # died, not ten)
    async with MockProvider(MockConfig(default=Behavior(latency_ms=20))) as mock:
        await declare_teams(settings)
        env = worker_env(
            settings, mock, QUEUEGATE_PREFETCH=str(PREFETCH), QUEUEGATE_CLAIM_LEASE="1"
        )
        workers = [await start_worker(env, TEAMS), await start_worker(env, TEAMS)]
        pool = await create_pool(settings)
        try:
            async with (
                running_accountant(settings),
                team_clients(lambda team: GatewayClient(settings, team=team)) as clients,
            ):
                # When 2,000 jobs are submitted and one worker is killed mid-run, then restarted
                submitting = await jobs_flowing(clients, mock, JOBS, KILL_AFTER_CALLS, within=60)
                workers[0].send_signal(signal.SIGKILL)
                await workers[0].wait()
                workers[0] = await start_worker(env, TEAMS)
                handles = await submitting
                figures.sent = len(handles)
                results = await collect(handles, timeout=60)

                # Expect one final result per job, and one usage row per job
                figures.answered = len({r.job_id for r in results})
                figures.duplicates = sum(c.duplicates for c in clients)
                rows, distinct = await usage_rows(pool, JOBS, timeout=30)
                figures.usage_rows = rows
                figures.provider_calls = mock.stats.calls
                figures.done()
                assert all(r.status == "ok" for r in results)
                assert figures.answered == JOBS
                assert rows == distinct == JOBS
                # ... and no call made again but those the killed worker had in flight (one
                # per job it held at most), each accounted as lost on its job's row
                lost = await pool.fetchval(
                    "SELECT count(*) FROM usage_log, jsonb_array_elements(attempt_log) AS a"
                    " WHERE a->>'error' = 'lost'"
                )
                assert JOBS <= mock.stats.calls <= JOBS + lost
                assert lost <= PREFETCH * len(TEAMS)
        finally:
            await stop_workers(workers)
            await pool.close()


async def test_a_worker_killed_with_a_usage_batch_unconfirmed_counts_each_job_once(
    settings: Settings,
) -> None:
    jobs = 30
    usage = Topology(settings.namespace).usage_exchange.encode()
    # Basic.Publish (class 60, method 40) to the usage exchange with routing key "": the
    # worker's usage batch, not its declaration of the exchange
    publish_usage = b"\x00\x3c\x00\x28\x00\x00" + bytes([len(usage)]) + usage + b"\x00"
    async with (
        MockProvider(MockConfig(default=Behavior(latency_ms=500))) as mock,
        TcpProxy(settings.amqp_url) as proxy,
    ):
        await declare_teams(settings, ["alpha"])
        pool = await create_pool(settings)
        # Given a worker whose broker connection passes nothing back once it publishes its
        # first usage batch: that batch reaches the broker, its confirm never reaches the
        # worker, so none of its jobs is acknowledged
        proxy.hold_replies_after(publish_usage)
        env = worker_env(settings, mock, QUEUEGATE_AMQP_URL=proxy.url)
        workers = [await start_worker(env, ["alpha"])]
        try:
            async with GatewayClient(settings, team="alpha") as alpha:
                # ... holding 30 jobs submitted at once (all delivered before the first is
                # answered, 500 ms later)
                job = alpha.job("gpt-4o-mini", [{"role": "user", "content": "hi"}])
                handles = await asyncio.gather(
                    *(alpha.submit(job.model_copy(update={"job_id": f"j{i}"})) for i in range(jobs))
                )
                # Every job called and answered (results reach the broker), none acknowledged:
                # the usage batch leaves after the results (an idle worker waits 20 ms for more)
                results = await collect(handles, timeout=30)
                async with asyncio.timeout(10):
                    await proxy.held.wait()
                assert mock.stats.calls == jobs

                # When that worker is killed and another takes its jobs back
                workers[0].send_signal(signal.SIGKILL)
                await workers[0].wait()
                workers.append(await start_worker(worker_env(settings, mock), ["alpha"]))

                # Expect each job answered from the outcome store, not called again, and
                # counted once though the unconfirmed batch's events arrive twice
                async with running_accountant(settings) as accountant:
                    await usage_rows(pool, jobs, timeout=30)
                    async with asyncio.timeout(30):
                        await accountant.wait_until(lambda: accountant.events_received > jobs)
                    rows, distinct = await usage_rows(pool, jobs, timeout=0)
                assert all(r.status == "ok" for r in results)
                assert rows == distinct == jobs
                assert mock.stats.calls == jobs
        finally:
            await stop_workers(workers)
            await pool.close()


def result_publish(reply_to: str) -> bytes:
    """Basic.Publish (class 60, method 40) to the default exchange, routing key ``reply_to``:
    a result sent to that reply queue, not a worker's check that the queue exists."""
    return b"\x00\x3c\x00\x28\x00\x00\x00" + bytes([len(reply_to)]) + reply_to.encode()


class Answered(NamedTuple):
    """A job answered by a worker killed before its usage event was sent."""

    result: ChatResult
    reply_to: str
    mock: MockProvider
    pool: asyncpg.Pool
    workers: list[Process]
    """The workers started: the test adds those it starts, stopped on exit."""


@asynccontextmanager
async def answered_by_a_killed_worker(
    settings: Settings, deadline: timedelta | None = None, **env: str
) -> AsyncIterator[Answered]:
    """A budgeted team's job (due within ``deadline``) answered by a worker (with ``env``)
    that is then SIGKILLed before its usage event is sent, its client gone. Accounting runs
    without reconciling, so the ledger shows what the workers settled."""
    await register(settings, "alpha", TeamConfig(budget_usd=Decimal(10)))
    unreconciled = settings.model_copy(update={"spend_reconcile_interval": 86400})
    async with (
        MockProvider(MockConfig(default=Behavior(latency_ms=20))) as mock,
        TcpProxy(settings.amqp_url) as proxy,
    ):
        await declare_teams(settings, ["alpha"])
        pool = await create_pool(settings)
        proxied = worker_env(settings, mock, QUEUEGATE_AMQP_URL=proxy.url, **env)
        workers = [await start_worker(proxied, ["alpha"])]
        try:
            async with running_accountant(unreconciled):
                async with GatewayClient(settings, team="alpha") as alpha:
                    # A worker whose broker connection passes nothing back once it publishes
                    # a result to the client's reply queue: the result reaches the client,
                    # its confirm never reaches the worker, so the job's usage event is never
                    # sent (its outcome is stored before the result is published)
                    reply_to = alpha.reply_to
                    proxy.hold_replies_after(result_publish(reply_to))
                    job = alpha.job("gpt-4o-mini", HELLO, deadline=deadline)
                    result = await (await alpha.submit(job)).result(timeout=30)
                    assert proxy.held.is_set()
                    workers[0].send_signal(signal.SIGKILL)
                    await workers[0].wait()
                yield Answered(result, reply_to, mock, pool, workers)
        finally:
            await stop_workers(workers)
            await pool.close()


async def expect_accounted_once(
    settings: Settings, redis_client: aioredis.Redis, answered: Answered
) -> None:
    """Expect the job accounted once, under its id, with what its call cost, not called
    again, and the team's spend ledger saying what usage_log says."""
    await usage_rows(answered.pool, 1, timeout=30)
    rows = await answered.pool.fetch("SELECT job_id, status, cost_usd FROM usage_log")
    month = current_month()
    keys = Keys(settings.redis_prefix)
    result = answered.result
    assert result.status == "ok"
    assert result.gateway is not None and result.gateway.cost_usd > 0
    assert [tuple(r) for r in rows] == [(result.job_id, "ok", result.gateway.cost_usd)]
    assert answered.mock.stats.calls == 1
    assert await ledger_spent(redis_client, keys, "alpha", month) == result.gateway.cost_usd
    assert await spend_drift(redis_client, answered.pool, keys, "alpha", month) == 0


async def test_a_job_answered_by_a_killed_worker_is_accounted_once_its_reply_queue_is_gone(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given a job answered by a worker killed before its usage event was sent, its client gone
    async with answered_by_a_killed_worker(settings) as answered:
        # When its reply queue is gone (deleted here: the client's own request to delete it
        # had no worker to answer it)
        async with (
            await connect(settings.amqp_url, name="test-admin") as admin,
            admin.channel() as channel,
        ):
            await channel.queue_delete(answered.reply_to)
        # ... and another worker takes the job back
        answered.workers.append(await start_worker(worker_env(settings, answered.mock), ["alpha"]))

        # Expect it accounted once, with what its call cost, in usage_log and the ledger
        # alike: not refused, not dead-lettered, not called again
        await expect_accounted_once(settings, redis_client, answered)
        assert await dead_lettered(settings) == 0


async def test_a_job_answered_by_a_killed_worker_that_then_expires_is_accounted_by_a_sweep(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given a job due in 3 s answered by a worker killed before its usage event was sent
    # (claims leased for 1 s, lapsed ones swept twice a second)
    short = {"QUEUEGATE_CLAIM_LEASE": "1", "QUEUEGATE_TEAMS_REFRESH": "0.5"}
    async with answered_by_a_killed_worker(settings, timedelta(seconds=3), **short) as answered:
        # When its deadline passes in its queue, no worker running (the broker dead-letters
        # it expired), and then a worker starts
        assert await dead_lettered(settings, expected=1, timeout=30) == 1
        letters, _ = await dlq.peek(settings)
        sweeper = await start_worker(worker_env(settings, answered.mock, **short), ["alpha"])
        answered.workers.append(sweeper)

        # Expect its sweep to account it once, with what its call cost, in usage_log and the
        # ledger alike, without calling it again
        await expect_accounted_once(settings, redis_client, answered)
    assert [(x.message_id, x.reason) for x in letters] == [(answered.result.job_id, "expired")]


async def test_a_job_stored_by_a_worker_killed_before_publishing_it_is_answered_by_a_sweep(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given a pipeline's job due in 3 s, its results going to a named queue, whose worker
    # stores its outcome and is killed before its result reaches the broker (claims leased
    # for 1 s)
    await register(settings, "alpha", TeamConfig())
    await declare_teams(settings, ["alpha"])
    keys = Keys(settings.redis_prefix)
    pool = await create_pool(settings)
    workers: list[Process] = []
    try:
        async with (
            MockProvider(MockConfig()) as mock,
            TcpProxy(settings.amqp_url) as proxy,
            running_accountant(settings),
        ):
            proxied = worker_env(
                settings, mock, QUEUEGATE_AMQP_URL=proxy.url, QUEUEGATE_CLAIM_LEASE="1"
            )
            workers.append(await start_worker(proxied, ["alpha"]))
            async with GatewayClient(settings, team="alpha", reply_queue="nightly") as pipeline:
                proxy.hang_at(result_publish(pipeline.reply_to))
                job = pipeline.job("gpt-4o-mini", HELLO, deadline=timedelta(seconds=3))
                handle = await pipeline.submit(job)
                async with asyncio.timeout(30):
                    await proxy.hung.wait()
                workers[0].send_signal(signal.SIGKILL)
                await workers[0].wait()
                stored = await redis_client.get(keys.result("alpha", job.job_id))
                # Its connections cut (held open by the proxy): the broker takes the job back
                await proxy.down()
                # When its deadline passes in its queue (the broker dead-letters it expired),
                # and a worker sweeping twice a second starts
                assert await dead_lettered(settings, expected=1, timeout=30) == 1
                sweeping = worker_env(settings, mock, QUEUEGATE_TEAMS_REFRESH="0.5")
                workers.append(await start_worker(sweeping, ["alpha"]))
                result = await handle.result(timeout=30)
                assert await usage_rows(pool, 1, timeout=30) == (1, 1)
                duplicates = pipeline.duplicates
            rows = await pool.fetch(
                "SELECT job_id, status, reply_delivered, cost_usd FROM usage_log"
            )
            calls = mock.stats.calls
    finally:
        await stop_workers(workers)
        await pool.close()

    # Expect the pipeline answered once, with the result the killed worker stored (as that
    # worker would have published it), accounted once with what its call cost, delivered,
    # and not called again
    outcome = None if stored is None else stored_outcome(stored)
    assert outcome is not None and outcome.result.response is not None
    # (its response under the gateway's id, which the client gives it, not the provider's)
    bare = {"response": None}
    assert result.model_copy(update=bare) == outcome.result.model_copy(update=bare)
    assert result.response is not None
    assert result.response["choices"] == outcome.result.response["choices"]
    assert result.status == "ok" and result.gateway is not None
    assert duplicates == 0
    assert [tuple(r) for r in rows] == [(job.job_id, "ok", True, result.gateway.cost_usd)]
    assert calls == 1
