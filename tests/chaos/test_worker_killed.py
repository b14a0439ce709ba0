"""Chaos 1: one of two worker processes is SIGKILLed mid-run and restarted."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator

from accounting import Accountant
from mockprovider import Behavior, MockConfig, MockProvider
from producer import GatewayClient
from queuegate.db import create_pool
from queuegate.settings import Settings
from tests.chaos.harness import (
    TEAMS,
    Figures,
    collect,
    declare_teams,
    submit_all,
    usage_rows,
)

JOBS = 2000
KILL_AFTER_CALLS = 600
PREFETCH = 50


@contextlib.asynccontextmanager
async def accounting(settings: Settings) -> AsyncIterator[Accountant]:
    stop = asyncio.Event()
    async with Accountant(settings) as accountant:
        task = asyncio.create_task(accountant.run(stop))
        try:
            yield accountant
        finally:
            stop.set()
            await task


async def test_a_killed_worker_process_loses_nothing_and_doubles_nothing(
    settings: Settings,
) -> None:
    figures = Figures("worker SIGKILL")
    # Given two worker processes serving three teams against a provider taking 20 ms a call
    async with MockProvider(MockConfig(default=Behavior(latency_ms=20))) as mock:
        await declare_teams(settings)
        env = {
            **os.environ,
            "QUEUEGATE_NAMESPACE": settings.namespace,
            "QUEUEGATE_METRICS_PORT": "0",  # any free port: several workers share the host
            "QUEUEGATE_DATABASE_SCHEMA": settings.database_schema,
            "QUEUEGATE_PREFETCH": str(PREFETCH),
            "QUEUEGATE_MOCK_URL": mock.url,
            "QUEUEGATE_MOCK_KEY": "sk-test",
        }

        async def start_worker() -> asyncio.subprocess.Process:
            return await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "cli", "worker", "--teams", ",".join(TEAMS)),
                *("--log-level", "warning"),
                env=env,
                stderr=asyncio.subprocess.DEVNULL,
            )

        workers = [await start_worker(), await start_worker()]
        pool = await create_pool(settings)
        try:
            async with (
                accounting(settings),
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
                workers[0] = await start_worker()
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
