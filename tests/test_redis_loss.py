"""Redis losing its data: a job answered before is never called again, however the loss
meets PostgreSQL (behind, unreachable, or holding nothing yet)."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from decimal import Decimal

import asyncpg
import pytest
import redis.asyncio as aioredis

from admin.usage import team_month
from queuegate import dlq
from queuegate.keys import Keys
from queuegate.messages import ChatJob
from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from queuegate.topology import HEADER_DEAD_REASON
from tests.proxy import TcpProxy
from tests.support import Gateway, logged, lose_redis_data, running_gateway, wait_until
from tests.teams import register
from workers.claims import SETTLE

HELLO = [{"role": "user", "content": "Hello there"}]


async def _answered(gw: Gateway, job_id: str) -> ChatJob:
    """A job of team alpha's, answered and accounted."""
    async with gw.client("alpha") as client:
        job = client.job("gpt-4o-mini", HELLO, job_id=job_id)
        assert (await (await client.submit(job)).result(10)).status == "ok"
    await gw.usage_rows(1)
    return job


async def test_after_redis_loses_its_data_an_accounted_job_is_not_called_again(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    await register(settings, "alpha", TeamConfig())
    async with running_gateway(settings) as gw:
        # Given a job answered and accounted
        job = await _answered(gw, "kept")
        # When Redis loses every key of the gateway, and the job is published again
        await lose_redis_data(redis_client, settings)
        async with gw.client("alpha") as second:
            result = await (await second.submit(job)).result(10)
            # ... then another job, accounted after anything the duplicate left
            other = second.job("gpt-4o-mini", HELLO, job_id="other")
            assert (await (await second.submit(other)).result(10)).status == "ok"
        # Expect it refused as already answered, the provider not called again, and no row
        # for the refusal: the team's report counts two requests, no error
        assert result.error is not None and result.error.code == "already_answered"
        assert gw.mock.stats.calls == 2
        rows = await gw.usage_rows(2)
        assert [r["job_id"] for r in rows] == ["kept", "other"]
        today = datetime.now(UTC).date()
        report = await team_month(gw.pool, "alpha", today, today=today)
        assert (report.requests, report.errors) == (2, 0)


async def test_an_accounted_job_sent_again_to_a_gone_reply_queue_is_not_accounted_again(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    async with running_gateway(settings) as gw:
        # Given a job answered and accounted, and Redis then losing every key of the gateway
        job = await _answered(gw, "kept")
        await lose_redis_data(redis_client, settings)
        # When the job is published again naming a reply queue that no longer exists
        with logged("workers.processor", "job 'kept' for team alpha refused (") as refused:
            await gw.publish(
                job.model_dump_json().encode(),
                message_id=job.job_id,
                reply_to=f"{settings.namespace}.nobody",
            )
            async with asyncio.timeout(10):
                await refused.wait()
        # ... then another job, accounted after anything the duplicate left
        async with gw.client("alpha") as second:
            other = second.job("gpt-4o-mini", HELLO, job_id="other")
            assert (await (await second.submit(other)).result(10)).status == "ok"
        # Expect it refused as already answered, not as unreceivable: no row of its own, not
        # dead-lettered (it was served), the provider not called again
        rows = await gw.usage_rows(2)
        assert [r["job_id"] for r in rows] == ["kept", "other"]
        assert (await dlq.peek(settings))[1] == 0
        assert gw.mock.stats.calls == 2


async def test_a_redis_restarted_empty_under_a_running_worker_calls_no_accounted_job_again(
    settings: Settings, redis_client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a worker reaching Redis through a proxy, and three jobs answered and accounted
    async with TcpProxy(settings.redis_url) as proxy:
        s = settings.model_copy(update={"redis_url": proxy.url})
        async with running_gateway(s) as gw:
            async with gw.client("alpha") as first:
                jobs = [first.job("gpt-4o-mini", HELLO, job_id=f"kept-{i}") for i in range(3)]
                handles = [await first.submit(job) for job in jobs]
                assert {(await h.result(10)).status for h in handles} == {"ok"}
            await gw.usage_rows(3)
            # When Redis restarts empty: every key gone, every pooled connection closed
            await lose_redis_data(redis_client, settings)
            await proxy.down()
            await proxy.up()
            # and the jobs are published again at once
            caplog.clear()
            async with gw.client("alpha") as second:
                again = [await second.submit(job) for job in jobs]
                results = [await h.result(10) for h in again]
    # Expect each refused as already answered, none called again, and no delivery served
    # unclaimed because of a connection the restart closed
    assert [r.error.code if r.error else r.status for r in results] == ["already_answered"] * 3
    assert gw.mock.stats.calls == 3
    assert "wait to be claimed" not in caplog.text


async def test_after_a_failover_lost_a_jobs_outcome_it_is_not_called_again(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    keys = Keys(settings.redis_prefix)
    async with running_gateway(settings) as gw:
        # Given a job answered and accounted, and nothing Redis could have forgotten
        async with gw.client("alpha") as first:
            job = first.job("gpt-4o-mini", HELLO, job_id="replicated-late")
            assert (await (await first.submit(job)).result(10)).status == "ok"
        await gw.usage_rows(1)
        await redis_client.set(keys.memory_epoch, 0)
        # When a replica that had not yet received the job's outcome becomes the primary:
        # the outcome gone, the primary's replication id not the one the claims ran on
        await redis_client.delete(keys.result("alpha", job.job_id))
        await redis_client.set(keys.replication, "0" * 40)
        # ... and the job is published again
        async with gw.client("alpha") as second:
            result = await (await second.submit(job)).result(10)
    # Expect it refused as already answered (found in usage_log), not called again
    assert result.error is not None and result.error.code == "already_answered"
    assert gw.mock.stats.calls == 1


async def test_jobs_answered_just_before_redis_lost_its_data_are_not_called_again(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    async with running_gateway(settings) as gw:
        # Given accounting unable to write (usage_log locked against writes, not reads)
        conn = await asyncpg.connect(
            settings.database_url, server_settings={"search_path": settings.database_schema}
        )
        try:
            async with conn.transaction():
                await conn.execute("LOCK TABLE usage_log IN SHARE MODE")
                # ... three jobs answered, their usage events on their way
                async with gw.client("alpha") as first:
                    jobs = [first.job("gpt-4o-mini", HELLO, job_id=f"late-{i}") for i in range(3)]
                    handles = [await first.submit(job) for job in jobs]
                    assert {(await h.result(10)).status for h in handles} == {"ok"}
                # When Redis loses its data, and another job finds it so while PostgreSQL
                # holds no usage row at all
                await lose_redis_data(redis_client, settings)
                async with gw.client("alpha") as other:
                    assert (await other.chat("gpt-4o-mini", HELLO, timeout=10)).status == "ok"
        finally:
            await conn.close()
        # ... and once accounting caught up, the three are published again
        await gw.usage_rows(4)
        async with gw.client("alpha") as second:
            again = [await second.submit(job) for job in jobs]
            results = [await h.result(10) for h in again]
    # Expect each refused as already answered, none called again
    assert [r.error.code if r.error else r.status for r in results] == ["already_answered"] * 3
    assert gw.mock.stats.calls == 4


@pytest.mark.parametrize("budget", [None, Decimal("1")], ids=["no budget", "budget"])
async def test_a_job_resent_after_redis_lost_its_data_while_accounting_is_stopped_is_not_called(
    settings: Settings, redis_client: aioredis.Redis, budget: Decimal | None
) -> None:
    # Given team alpha (with a budget, or none), accounting stopped, and two jobs answered
    await register(settings, "alpha", TeamConfig(budget_usd=budget))
    async with running_gateway(settings, accounting=False) as gw, gw.client("alpha") as first:
        jobs = [first.job("gpt-4o-mini", HELLO, job_id=f"sent-{i}") for i in range(2)]
        handles = [await first.submit(job) for job in jobs]
        assert {(await h.result(10)).status for h in handles} == {"ok"}

        # When Redis loses its data, and both are sent again under their ids
        await lose_redis_data(redis_client, settings)
        async with gw.client("alpha") as second:
            again = [await second.submit(job) for job in jobs]
            results = [await h.result(10) for h in again]

    # Expect each refused as already answered, from the worker's memory of settling it (no
    # usage row says so yet), and the provider not called again: its second call's cost
    # would be in no ledger and no usage row
    assert [r.error.code if r.error else r.status for r in results] == ["already_answered"] * 2
    assert gw.mock.stats.calls == 2


async def test_a_refused_job_resent_after_redis_lost_its_data_is_told_to_take_a_new_id(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        # Given a job refused (a model the catalog lacks) and accounted, and Redis then
        # losing every key of the gateway
        bad = client.job("no-such-model", HELLO, job_id="refused-1")
        first = await (await client.submit(bad)).result(10)
        assert first.error is not None and first.error.code == "unknown_model"
        await gw.usage_rows(1)
        await lose_redis_data(redis_client, settings)

        # When it is sent again under its id, corrected
        good = client.job("gpt-4o-mini", HELLO, job_id="refused-1")
        again = await (await client.submit(good)).result(10)

    # Expect it refused, uncalled, as the README says, saying what happened and what to do
    # (it was never answered: "already answered" alone misled)
    assert again.error is not None and again.error.code == "already_answered"
    assert "answered or refused" in again.error.message
    assert "new job id" in again.error.message
    assert gw.mock.stats.calls == 0


async def test_while_postgresql_cannot_tell_a_job_redis_may_have_forgotten_waits_uncalled(
    settings: Settings, redis_client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a worker and accounting reaching PostgreSQL through a proxy, three jobs
    # answered and accounted, and a worker started since (it remembers settling none)
    async with TcpProxy(settings.database_url) as proxy:
        through = settings.model_copy(update={"database_url": proxy.url})
        async with (
            running_gateway(settings, components=through) as gw,
            gw.client("alpha") as first,
        ):
            jobs = [first.job("gpt-4o-mini", HELLO, job_id=f"kept-{i}") for i in range(3)]
            handles = [await first.submit(job) for job in jobs]
            assert {(await h.result(10)).status for h in handles} == {"ok"}
            await gw.usage_rows(3)
        async with (
            running_gateway(settings, components=through) as gw,
            gw.client("alpha") as second,
        ):
            # When PostgreSQL becomes unreachable, Redis loses its data, and the jobs are
            # published again
            caplog.set_level(logging.WARNING, logger="workers.usage_record")
            await proxy.down()
            await lose_redis_data(redis_client, settings)
            again = [await second.submit(job) for job in jobs]

            # Expect them held uncalled while PostgreSQL cannot tell whether they were answered
            await wait_until(
                lambda: gw.worker.in_flight == 3 and "usage_log) unavailable" in caplog.text
            )
            assert gw.mock.stats.calls == 0
            # ... and, once it can, refused as already answered, never called again
            await proxy.up()
            results = [await h.result(30) for h in again]
    assert [r.error.code if r.error else r.status for r in results] == ["already_answered"] * 3
    assert gw.mock.stats.calls == 0


async def test_a_job_held_for_postgresql_past_its_time_limit_goes_back_uncalled(
    settings: Settings,
) -> None:
    # Given jobs that must be checked in usage_log (Redis is new: the worker cannot yet
    # tell it forgot nothing), a short time limit and one redelivery allowed
    settings = settings.model_copy(update={"job_time_limit": 0.5, "delivery_limit": 1})
    async with TcpProxy(settings.database_url) as proxy:
        through = settings.model_copy(update={"database_url": proxy.url})
        async with (
            running_gateway(settings, components=through) as gw,
            gw.client("alpha") as client,
        ):
            # When PostgreSQL stays unreachable while a job waits for it
            await proxy.down()
            await client.submit(client.job("gpt-4o-mini", HELLO, job_id="held"))

            # Expect it back in its queue after each time limit, dead-lettered at the
            # delivery limit, and never called
            [dead] = await gw.dead_letters(1)
            assert dead.headers[HEADER_DEAD_REASON] == "delivery_limit"
            assert dead.message_id == "held"
            assert gw.mock.stats.calls == 0


@pytest.mark.parametrize("accounted_before", [False, True], ids=["nothing", "accounted"])
async def test_a_provisional_memory_epoch_settles_on_what_postgresql_holds_by_then(
    settings: Settings, redis_client: aioredis.Redis, accounted_before: bool
) -> None:
    async with running_gateway(settings) as gw:
        # Given Redis found empty over SETTLE ago with nothing accounted before it then,
        found = round(time.time() * 1000 - (SETTLE + 1) * 1000)
        epoch = Keys(settings.redis_prefix).memory_epoch
        await redis_client.set(epoch, f"-{found}")
        # ... and a job answered before it whose usage row is there now (or none)
        if accounted_before:
            await gw.pool.execute(
                "INSERT INTO usage_log (job_id, team, model_requested, status, ts)"
                " VALUES ('old', 'alpha', 'gpt-4o-mini', 'ok', to_timestamp($1))",
                (found - 60_000) / 1000,
            )
        # When the next jobs arrive, one of them the old one again
        async with gw.client("alpha") as client:
            new = await client.chat("gpt-4o-mini", HELLO, timeout=10)
            old = await client.chat("gpt-4o-mini", HELLO, job_id="old", timeout=10)

        # Expect the epoch settled: to the time it was found empty when a job answered
        # before it is accounted (the old job refused, not called), else to 0
        assert new.status == "ok"
        if accounted_before:
            assert await redis_client.get(epoch) == str(found).encode()
            assert old.error is not None and old.error.code == "already_answered"
            assert gw.mock.stats.calls == 1
        else:
            assert await redis_client.get(epoch) == b"0"
            assert old.status == "ok"
            assert gw.mock.stats.calls == 2
