"""An accountant SIGKILLed with two batches in flight: one committed but not acknowledged (it
waits for the one before), the other held mid-insert. Nothing is lost or written twice."""

from __future__ import annotations

import asyncio
import os
import sys

import aio_pika
import asyncpg

from accounting import migrate
from queuegate.db import create_pool
from queuegate.settings import Settings
from queuegate.topology import Topology
from tests.support import running_accountant
from tests.test_accounting import send_batch, usage

WAIT = 30.0
BATCH = 20
"""Events per batch, and per message: the prefetch (four batches' worth) holds both."""


async def test_a_killed_accountant_with_two_batches_in_flight_loses_and_repeats_nothing(
    settings: Settings,
) -> None:
    pool = await create_pool(settings)
    locker = await asyncpg.connect(
        settings.database_url, server_settings={"search_path": settings.database_schema}
    )
    connection = await aio_pika.connect(settings.amqp_url)
    accountant: asyncio.subprocess.Process | None = None
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await Topology(settings.namespace).declare_usage(channel)
        # Given an accountant writing batches of 20, one per message, and consuming (its
        # first event written, so it has migrated: a migration would wait on the lock below)
        await migrate(pool, settings.database_schema)
        accountant = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "cli", "accounting", "--log-level", "warning"),
            env=_env(settings),
            stderr=asyncio.subprocess.DEVNULL,
        )
        await send_batch(exchange, usage("job-warm"))
        await _until_rows(pool, 1)
        # ... whose next batch's insert is held by an uncommitted row of one of its jobs (as
        # a racing redelivery's would hold it)
        tx = locker.transaction()
        await tx.start()
        await locker.execute(
            "INSERT INTO usage_log (job_id, team, model_requested, status, ts)"
            " VALUES ('job-0', 'alpha', 'gpt-mini', 'ok', now())"
        )
        first = [usage(f"job-{i}") for i in range(BATCH)]
        # Another team's: the held row holds alpha's daily rollup too (usage_daily_add)
        second = [usage(f"job-{i}", team="beta") for i in range(BATCH, 2 * BATCH)]
        await send_batch(exchange, *first)
        await send_batch(exchange, *second)
        # When the second batch has committed behind the held first, and it is SIGKILLed
        await _until_rows(pool, 1 + BATCH)
        async with asyncio.timeout(WAIT):
            # Polled: PostgreSQL announces no wait on a row lock.
            held = "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))"
            while not await locker.fetchval(held, locker.get_server_pid()):  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        accountant.kill()
        await accountant.wait()
        assert await _rows(pool) == 1 + BATCH  # the second batch's, committed; the first's not
        await tx.rollback()

        # Expect both batches back in the queue (neither was acknowledged) and each job
        # written once: the first batch by the successor, or by the killed process's
        # statement, which PostgreSQL finishes once the row is let go (the client's death
        # goes unnoticed while it waits), the successor then skipping it as a redelivery
        async with running_accountant(settings) as successor:
            async with asyncio.timeout(WAIT):
                await successor.wait_until(lambda: successor.events_written == 2 * BATCH)
        rows = await pool.fetch("SELECT job_id, worker FROM usage_log ORDER BY job_id")
        assert [r["job_id"] for r in rows] == sorted(
            ["job-warm"] + [e.job_id for e in first + second]
        )
        assert {r["worker"] for r in rows} == {"w1"}  # job-0 is the event's, not the lock's
    finally:
        if accountant is not None and accountant.returncode is None:
            accountant.kill()
            await accountant.wait()
        await connection.close()
        await locker.close()
        await pool.close()


def _env(settings: Settings) -> dict[str, str]:
    return {
        **os.environ,
        "QUEUEGATE_NAMESPACE": settings.namespace,
        "QUEUEGATE_DATABASE_SCHEMA": settings.database_schema,
        "QUEUEGATE_METRICS_PORT": "0",
        "QUEUEGATE_ACCOUNTING_BATCH": str(BATCH),
    }


async def _until_rows(pool: asyncpg.Pool, count: int) -> None:
    async with asyncio.timeout(WAIT):
        # Polled: PostgreSQL announces no commit.
        while await _rows(pool) < count:  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def _rows(pool: asyncpg.Pool) -> int:
    count: int = await pool.fetchval("SELECT count(*) FROM usage_log")
    return count
