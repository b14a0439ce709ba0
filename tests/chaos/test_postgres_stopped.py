"""PostgreSQL itself stopped, mid-batch, mid-query and mid-connect: every process lives on.

A private cluster (tests/chaos/private_postgres.py) is stopped as an operator or a crash
would stop it, while accounting writes a steady flow of usage events and while a worker
looks up an API key; nothing else shares it.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path

import aio_pika
import asyncpg
import pytest
import redis.asyncio as aioredis

from accounting import Accountant
from admin.teams import add
from queuegate.db import UNREACHABLE, create_pool, is_unreachable
from queuegate.keys import Keys
from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from queuegate.spend import current_month
from queuegate.topology import Topology
from tests.chaos.harness import dead_lettered
from tests.chaos.private_postgres import PrivatePostgres
from tests.support import logged, running_accountant, running_gateway
from tests.teams import register
from tests.test_accounting import send_usage, usage

WAIT = 60.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[PrivatePostgres]:
    """One cluster for the module: its initdb takes 3-4 s. Each test still has a schema of
    its own on it (its settings'), as on the shared PostgreSQL."""
    with PrivatePostgres(Path(tempfile.mkdtemp(prefix="qg-pg-"))) as pg:
        yield pg


@pytest.fixture
def postgres(cluster: PrivatePostgres) -> Iterator[PrivatePostgres]:
    """The module's cluster, running as each test starts: a test that failed while it was
    stopped leaves it stopped."""
    if not cluster.is_running():
        cluster.start()
    yield cluster


def on(settings: Settings, pg: PrivatePostgres) -> Settings:
    return settings.model_copy(update={"database_url": pg.url})


@contextlib.asynccontextmanager
async def blocked_insert(pg: PrivatePostgres, settings: Settings) -> AsyncIterator[None]:
    """Hold usage_log locked until accounting's next insert waits on it: it is mid-batch."""
    conn = await asyncpg.connect(pg.url, server_settings={"search_path": settings.database_schema})
    try:
        tx = conn.transaction()
        await tx.start()
        await conn.execute("LOCK TABLE usage_log IN ACCESS EXCLUSIVE MODE")
        async with asyncio.timeout(WAIT):
            # Polled: PostgreSQL announces no event when a statement starts waiting on a lock.
            # Its text is not matched: a statement still being prepared shows the previous one.
            waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            while not await conn.fetchval(waiting):  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        yield
    finally:
        conn.terminate()


async def test_accounting_lives_through_stops_mid_batch_and_mid_connect_and_writes_once(
    settings: Settings, postgres: PrivatePostgres
) -> None:
    # Given accounting on a PostgreSQL of its own and a steady flow of usage events
    through = on(settings, postgres)
    sent: list[str] = []
    stop_sending = asyncio.Event()

    async def send() -> None:
        connection = await aio_pika.connect(settings.amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await Topology(settings.namespace).declare_usage(channel)
            while not stop_sending.is_set():
                batch = [f"job-{len(sent) + i}" for i in range(20)]
                await send_usage(exchange, *(usage(job_id) for job_id in batch))
                sent.extend(batch)
                await asyncio.sleep(0.02)

    stop = asyncio.Event()
    async with Accountant(through) as accountant:
        running = asyncio.create_task(accountant.run(stop))
        sender = asyncio.create_task(send())
        try:
            await _written_more(accountant, running)
            # When PostgreSQL crashes while a batch insert is in flight
            async with blocked_insert(postgres, through):
                await asyncio.to_thread(postgres.stop, "immediate")
            await asyncio.to_thread(postgres.start)
            await _written_more(accountant, running)
            # ... is shut down by its operator mid-query
            async with blocked_insert(postgres, through):
                await asyncio.to_thread(postgres.stop, "fast")
            await asyncio.to_thread(postgres.start)
            await _written_more(accountant, running)
            # ... and restarts again and again, accounting meeting it mid-connect and mid-batch
            for mode in ("immediate", "fast", "immediate", "fast"):
                await asyncio.to_thread(postgres.stop, mode)
                await asyncio.to_thread(postgres.start)
            await _written_more(accountant, running)
        finally:
            stop_sending.set()
            await sender

        # Expect it alive and every event written exactly once
        async with asyncio.timeout(WAIT):
            await accountant.wait_until(lambda: accountant.events_written >= len(sent))
        assert not running.done()
        stop.set()
        await running
    pool = await create_pool(through)
    try:
        rows = await pool.fetch("SELECT job_id FROM usage_log")
    finally:
        await pool.close()
    assert len(rows) == len(sent) == len({row["job_id"] for row in rows})


async def _written_more(accountant: Accountant, running: asyncio.Task[None]) -> None:
    """Until accounting has committed another batch; fails at once if it died."""
    written = accountant.batches
    async with asyncio.timeout(WAIT):
        waiting = asyncio.create_task(accountant.wait_until(lambda: accountant.batches > written))
        await asyncio.wait((waiting, running), return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
    if running.done():
        running.result()  # its exception, if it died of one
        pytest.fail("accounting stopped during a PostgreSQL outage")


async def test_a_worker_holds_a_job_while_the_registry_is_away_and_serves_it_once(
    settings: Settings, postgres: PrivatePostgres
) -> None:
    # Given a gateway whose registry lives in a PostgreSQL of its own, and an api_key team
    through = on(settings, postgres).model_copy(update={"security_cache_ttl": 0.1})
    credentials = await add(through, "alpha", identity="api_key")
    assert credentials.api_key is not None
    async with (
        running_gateway(through) as gw,
        gw.client("alpha", api_key=credentials.api_key) as client,
    ):
        first = await client.chat("gpt-4o-mini", [{"role": "user", "content": "a"}])
        assert first.status == "ok", first.error
        # When PostgreSQL stops (longer than the cache's 0.1 s) and the team's key, no longer
        # cached, must be looked up for the next job, which meets the outage
        await asyncio.to_thread(postgres.stop, "fast")
        with logged("workers.identity", "PostgreSQL (team registry) unavailable") as met:
            handle = await client.submit(
                client.job("gpt-4o-mini", [{"role": "user", "content": "during"}])
            )
            await asyncio.wait_for(met.wait(), WAIT)
        await asyncio.to_thread(postgres.start)
        result = await handle.result(timeout=WAIT)

    # Expect the job answered once, never given back to its queue (nor dead-lettered)
    assert result.status == "ok", result.error
    assert gw.mock.stats.calls == 2
    assert await dead_lettered(settings) == 0


def test_every_error_of_a_server_gone_mid_operation_means_unreachable() -> None:
    # asyncpg's own failures when the server goes away mid-operation; the second and third
    # were met under load (tests above), the last killed accounting before.
    for exc in (
        ConnectionRefusedError(111, "refused"),
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        asyncpg.CannotConnectNowError("the database system is starting up"),
        asyncpg.AdminShutdownError("terminating connection due to administrator command"),
        asyncpg.InterfaceError("connection is closed"),
        asyncpg.InternalClientError("cannot switch to state 12; another operation is in progress"),
    ):
        assert is_unreachable(exc), exc
        assert isinstance(exc, UNREACHABLE)
    assert not is_unreachable(asyncpg.UndefinedTableError("no usage_log"))


async def test_a_job_whose_budget_ledger_is_lost_waits_for_postgresql_and_is_served_once(
    settings: Settings, postgres: PrivatePostgres, redis_client: aioredis.Redis
) -> None:
    # Given a budgeted team on a PostgreSQL of its own (reconciled only at start), one job in
    through = on(settings, postgres).model_copy(update={"spend_reconcile_interval": 3600})
    await register(through, "alpha", TeamConfig(budget_usd=Decimal(10)))
    async with running_gateway(through) as gw, gw.client("alpha") as client:
        first = await client.chat("gpt-4o-mini", [{"role": "user", "content": "a"}])
        assert first.status == "ok", first.error

        # When PostgreSQL stops and Redis loses the team's ledger, which the next job needs
        # rebuilt from PostgreSQL (Redis's memory of answered jobs settled as "nothing to
        # forget", or the job would first wait for its lookup in usage_log, not the rebuild)
        await asyncio.to_thread(postgres.stop, "fast")
        keys, month = Keys(settings.redis_prefix), current_month()
        await redis_client.set(keys.memory_epoch, "0")
        await redis_client.delete(keys.spend("alpha", month), keys.spend_expiry("alpha", month))
        with logged("workers.admission", "PostgreSQL (budget ledger rebuild) unavailable") as met:
            handle = await client.submit(
                client.job("gpt-4o-mini", [{"role": "user", "content": "b"}])
            )
            await asyncio.wait_for(met.wait(), WAIT)  # the job meets the outage
        await asyncio.to_thread(postgres.start)
        result = await handle.result(timeout=WAIT)

    # Expect the job held until PostgreSQL returned and served once, never requeued in a loop
    assert result.status == "ok", result.error
    assert gw.mock.stats.calls == 2
    assert await dead_lettered(settings) == 0


async def test_a_worker_and_accounting_started_before_postgresql_wait_for_it_then_run(
    settings: Settings, postgres: PrivatePostgres, caplog: pytest.LogCaptureFixture
) -> None:
    # Given PostgreSQL down when a worker and accounting start
    through = on(settings, postgres)
    await asyncio.to_thread(postgres.stop, "fast")
    async with contextlib.AsyncExitStack() as stack:
        accounting = asyncio.create_task(stack.enter_async_context(running_accountant(through)))
        gateway = asyncio.create_task(
            stack.enter_async_context(running_gateway(through, accounting=False))
        )
        waiting = "PostgreSQL is not reachable"
        async with asyncio.timeout(WAIT):
            # Polled: the only sign of a process waiting is its log line.
            while sum(waiting in r.getMessage() for r in caplog.records) < 2:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        # When it starts a few seconds later
        await asyncio.sleep(1)  # the processes keep waiting, not exiting, meanwhile
        assert not accounting.done() and not gateway.done()
        await asyncio.to_thread(postgres.start)
        await asyncio.wait_for(accounting, WAIT)
        gw = await asyncio.wait_for(gateway, WAIT)
        # Expect both to run: a job answered and accounted
        async with gw.client("alpha") as client:
            assert (
                await client.chat("gpt-4o-mini", [{"role": "user", "content": "a"}])
            ).status == "ok"
        assert len(await gw.usage_rows(1, timeout=WAIT)) == 1
    assert sum(waiting in r.getMessage() for r in caplog.records) == 2
