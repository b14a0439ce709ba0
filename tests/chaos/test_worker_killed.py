"""Chaos 1: one of two worker processes is SIGKILLed mid-run and restarted."""

from __future__ import annotations

import asyncio
import signal

from mockprovider import Behavior, MockConfig, MockProvider
from producer import GatewayClient
from queuegate.db import create_pool
from queuegate.settings import Settings
from tests.chaos.harness import (
    TEAMS,
    Figures,
    collect,
    declare_teams,
    start_worker,
    submit_all,
    usage_rows,
    worker_env,
)
from tests.support import running_accountant

JOBS = 2000
KILL_AFTER_CALLS = 600
PREFETCH = 50


async def test_a_killed_worker_process_loses_nothing_and_doubles_nothing(
    settings: Settings,
) -> None:
    figures = Figures("worker SIGKILL")
    # Given two worker processes serving three teams against a provider taking 20 ms a call
    async with MockProvider(MockConfig(default=Behavior(latency_ms=20))) as mock:
        await declare_teams(settings)
        env = worker_env(settings, mock, QUEUEGATE_PREFETCH=str(PREFETCH))
        workers = [await start_worker(env, TEAMS), await start_worker(env, TEAMS)]
        pool = await create_pool(settings)
        try:
            async with (
                running_accountant(settings),
                GatewayClient(settings, team="alpha") as alpha,
                GatewayClient(settings, team="beta") as beta,
                GatewayClient(settings, team="gamma") as gamma,
            ):
                clients = [alpha, beta, gamma]
                # When 2,000 jobs are submitted and one worker is killed mid-run, then restarted
                submitting = asyncio.create_task(submit_all(clients, JOBS))
                async with asyncio.timeout(60):
                    await mock.wait_for_calls(KILL_AFTER_CALLS)
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
            for worker in workers:
                if worker.returncode is None:
                    worker.send_signal(signal.SIGTERM)
            await asyncio.wait_for(asyncio.gather(*(w.wait() for w in workers)), timeout=30)
            await pool.close()
