"""The Redis spend ledger follows PostgreSQL: lost settles and lost ledgers are reconciled."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from accounting.store import insert_usage
from mockprovider import Behavior, MockConfig
from queuegate.keys import Keys
from queuegate.messages import UsageEvent
from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from queuegate.spend import (
    Scope,
    current_month,
    ledger_spent,
    reconcile,
    reconciler_token,
    spend_drift,
)
from queuegate.status import StatusReader
from tests.faults import behind_proxies
from tests.support import lose_redis_data, running_accountant, running_gateway
from tests.teams import register
from workers.admission.budgets import Budgets
from workers.admission.scripts import Scripts

MESSAGES = [{"role": "user", "content": "How much?"}]
MAX_TOKENS = 1000
"""Priced at the dearest fallback (claude-haiku, $4/M output): a ~$0.004 reservation, while
the mock's real answer costs ~$0.00001."""
BUDGET = Decimal("0.006")
"""Room for one reservation, not two: a job whose reservation is never settled leaves the
next one refused ``budget_exhausted`` until reconciliation."""
WAIT = 30.0
NANO_USD = 1_000_000_000
"""$1 in a ledger entry."""
DIME = NANO_USD // 10


async def _in_flight(redis_client: aioredis.Redis, settings: Settings, job_id: str) -> None:
    """Until the job's reservation is in its team's ledger (then it is at the provider)."""
    ledger = Keys(settings.redis_prefix).spend("alpha", current_month())
    async with asyncio.timeout(WAIT):
        # Polled: nothing announces a reservation.
        while not await redis_client.hexists(ledger, f"j:{job_id}"):  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def _reconciled(
    redis_client: aioredis.Redis, pool: asyncpg.Pool, settings: Settings
) -> Decimal:
    """Until accounting's reconciliation leaves Redis's spend equal to PostgreSQL's."""
    keys = Keys(settings.redis_prefix)
    async with asyncio.timeout(WAIT):
        # Polled: reconciliations run on accounting's schedule, unannounced.
        while drift := await spend_drift(redis_client, pool, keys, "alpha", current_month()):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    return drift


async def test_a_settle_lost_to_a_redis_error_is_reconciled_and_refuses_nothing(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given team alpha with room for one reservation, reaching Redis through a proxy, and a
    # provider that takes a second
    await register(settings, "alpha", TeamConfig(budget_usd=BUDGET))
    slow = MockConfig(default=Behavior(latency_ms=1000))
    quick = settings.model_copy(update={"spend_reconcile_interval": 0.1})
    async with (
        behind_proxies(quick, "redis") as (through, proxies),
        running_gateway(settings, components=through, mock_config=slow) as gw,
        gw.client("alpha") as client,
    ):
        corrected = {"team": "alpha", "model": "all"}
        before = REGISTRY.get_sample_value("queuegate_spend_corrected_usd_total", corrected) or 0
        # When Redis goes away while a job is at the provider, so its settle fails
        job = client.job("gpt-4o-mini", MESSAGES, max_tokens=MAX_TOKENS)
        handle = await client.submit(job)
        await _in_flight(redis_client, settings, job.job_id)
        await proxies["redis"].down()
        first = await handle.result(timeout=WAIT)
        await proxies["redis"].up()
        await gw.usage_rows(1)

        # Expect the ledger reconciled to PostgreSQL's spend, the reservation gone
        assert first.status == "ok", first.error
        assert await _reconciled(redis_client, gw.pool, settings) == 0
        spent = await ledger_spent(
            redis_client, Keys(settings.redis_prefix), "alpha", current_month()
        )
        assert spent is not None and spent < BUDGET / 100
        # ... the correction (the estimate the lost settle left, less the real cost) exported
        after = REGISTRY.get_sample_value("queuegate_spend_corrected_usd_total", corrected)
        assert after is not None and after - before > float(BUDGET) / 2

        # ... and the next job admitted, not refused for the lost settle's estimate
        second = await client.chat("gpt-4o-mini", MESSAGES, max_tokens=MAX_TOKENS)
        assert second.status == "ok", second.error


async def test_a_ledger_redis_lost_mid_run_is_rebuilt_and_reconciled(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given team alpha with a budget, three jobs served and one at the provider
    await register(settings, "alpha", TeamConfig(budget_usd=Decimal(10)))
    slow = MockConfig(default=Behavior(latency_ms=300))
    keys = Keys(settings.redis_prefix)
    quick = settings.model_copy(update={"spend_reconcile_interval": 0.1})
    async with running_gateway(quick, mock_config=slow) as gw, gw.client("alpha") as client:
        for _ in range(3):
            assert (await client.chat("gpt-4o-mini", MESSAGES)).status == "ok"
        job = client.job("gpt-4o-mini", MESSAGES)
        handle = await client.submit(job)
        await _in_flight(redis_client, settings, job.job_id)

        # When Redis loses the ledger (as a restart without persistence does), then two
        # more jobs come
        month = current_month()
        await redis_client.delete(keys.spend("alpha", month), keys.spend_expiry("alpha", month))
        assert (await handle.result(timeout=WAIT)).status == "ok"
        for _ in range(2):
            assert (await client.chat("gpt-4o-mini", MESSAGES)).status == "ok"
        await gw.usage_rows(6)

        # Expect Redis's spend equal to PostgreSQL's once reconciled: all six jobs, once each
        assert await _reconciled(redis_client, gw.pool, settings) == 0
        spent = await ledger_spent(redis_client, keys, "alpha", month)
        total = await gw.pool.fetchval("SELECT sum(cost_usd) FROM usage_log")
        assert spent is not None and total > 0
        assert abs(spent - total) < Decimal("0.000000001") * 6


async def test_a_ledger_lost_while_accounting_is_behind_keeps_the_jobs_it_had_settled(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given team alpha with a budget, and ten jobs answered while accounting is stopped
    await register(settings, "alpha", TeamConfig(budget_usd=Decimal(10)))
    keys, month = Keys(settings.redis_prefix), current_month()
    quick = settings.model_copy(update={"spend_reconcile_interval": 0.1})
    async with (
        running_gateway(quick, accounting=False) as gw,
        gw.client("alpha") as client,
    ):
        answered = [await client.chat("gpt-4o-mini", MESSAGES) for _ in range(10)]
        assert all(result.status == "ok" for result in answered)
        cost = sum(Decimal(str(r.gateway.cost_usd)) for r in answered if r.gateway)
        assert await ledger_spent(redis_client, keys, "alpha", month) == cost > 0

        # When Redis loses every key of the gateway, then one more job comes
        await lose_redis_data(redis_client, settings)
        last = await client.chat("gpt-4o-mini", MESSAGES)
        assert last.status == "ok" and last.gateway is not None

        # Expect the rebuilt ledger to count all eleven, though PostgreSQL holds none
        assert await gw.pool.fetchval("SELECT count(*) FROM usage_log") == 0
        spent = await ledger_spent(redis_client, keys, "alpha", month)
        assert spent == cost + Decimal(str(last.gateway.cost_usd))

        # And once accounting writes them, each counted once
        async with running_accountant(quick):
            await gw.usage_rows(11)
            assert await _reconciled(redis_client, gw.pool, settings) == 0
        assert await ledger_spent(redis_client, keys, "alpha", month) == spent


async def test_status_spend_recovers_from_a_redis_loss_once_reconciled(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given team alpha with a budget and three jobs answered and accounted
    await register(settings, "alpha", TeamConfig(budget_usd=Decimal(10)))
    quick = settings.model_copy(update={"spend_reconcile_interval": 0.1})
    async with (
        running_gateway(quick) as gw,
        gw.client("alpha") as client,
        StatusReader(settings) as reader,
    ):
        for _ in range(3):
            assert (await client.chat("gpt-4o-mini", MESSAGES)).status == "ok"
        await gw.usage_rows(3)
        # When Redis loses every key of the gateway, then one more job comes
        await lose_redis_data(redis_client, settings)
        assert (await client.chat("gpt-4o-mini", MESSAGES)).status == "ok"
        await gw.usage_rows(4)
        # Expect status's spend, once reconciled, to be all four jobs' (PostgreSQL's)
        await _reconciled(redis_client, gw.pool, settings)
        status = await reader.read(teams=["alpha"], budgets={"alpha": Decimal(10)})
        total = await gw.pool.fetchval("SELECT sum(cost_usd) FROM usage_log")
        assert status.teams[0].spend_usd == total  # both exact: Decimals


async def _spent(pool: asyncpg.Pool, team: str, job_id: str, usd: str) -> None:
    event = UsageEvent(
        job_id=job_id, team=team, model_requested="gpt-4o-mini", status="ok",
        cost_usd=Decimal(usd), ts=datetime.now(UTC),
    )  # fmt: skip
    await insert_usage(pool, [event])


async def test_a_job_id_postgresql_cannot_store_in_a_ledger_stops_no_reconciliation(
    settings: Settings, redis_client: aioredis.Redis, pool: asyncpg.Pool
) -> None:
    # Given alpha's ledger holding a job whose id has a NUL (published before jobs were
    # checked for one: it can have no usage row) beside a written one, and beta's ledger
    await _spent(pool, "alpha", "a-1", "0.5")
    await _spent(pool, "beta", "b-1", "0.25")
    keys, month = Keys(settings.redis_prefix), current_month()
    alpha, beta = Scope("alpha"), Scope("beta")
    entries = {
        alpha: {"nul\x00id": (NANO_USD, 600_000), "a-1": (NANO_USD, 600_000)},
        beta: {"b-1": (NANO_USD, 600_000)},
    }
    # When both are reconciled
    corrections = await reconcile(
        redis_client, pool, keys, [alpha, beta], month, token=reconciler_token(), restore=entries
    )
    # Expect each in line with usage_log: the written jobs' entries dropped, the NUL one kept
    # (it lapses as any reservation whose usage never comes)
    assert corrections is not None
    assert {c.scope: c.after for c in corrections} == {alpha: Decimal("1.5"), beta: Decimal("0.25")}
    assert await spend_drift(redis_client, pool, keys, "beta", month) == 0


async def test_a_ledger_postgresql_refuses_is_logged_and_the_others_are_reconciled(
    settings: Settings,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given beta's spend in usage_log, and a scope whose team PostgreSQL cannot even compare
    await _spent(pool, "beta", "b-1", "0.25")
    keys, month = Keys(settings.redis_prefix), current_month()
    bad, beta = Scope("bad\x00team"), Scope("beta")
    # When both are reconciled, the bad one first
    corrections = await reconcile(
        redis_client, pool, keys, [bad, beta], month, token=reconciler_token()
    )
    # Expect beta reconciled, and the one that could not be said in the log
    assert corrections is not None
    assert [(c.scope, c.after) for c in corrections] == [(beta, Decimal("0.25"))]
    assert await spend_drift(redis_client, pool, keys, "beta", month) == 0
    assert any("cannot reconcile team bad" in r.getMessage() for r in caplog.records)


class _Interleaved(aioredis.Redis):
    """The test's Redis as a reconciliation is given it: after each command named in
    ``between`` the test's step runs, before the reconciliation goes on (an interleaving of
    the test's own, against the real Redis and PostgreSQL)."""

    def __init__(
        self, client: aioredis.Redis, between: dict[str, Callable[[], Awaitable[None]]]
    ) -> None:
        super().__init__(connection_pool=client.connection_pool)
        self._between = between

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        reply = await super().execute_command(*args, **options)
        step = self._between.get(str(args[0]).upper())
        if step is not None:
            await step()
        return reply


async def _settled(
    settings: Settings, redis_client: aioredis.Redis, pool: asyncpg.Pool, budgets: Budgets, job: str
) -> None:
    """Job ``job`` of alpha's, reserved, settled at $0.10 and written, as a worker and
    accounting do it."""
    keys = Keys(settings.redis_prefix)
    config = TeamConfig(budget_usd=Decimal(1))
    held, _ = await budgets.reserve("alpha", "gpt-4o-mini", config, DIME, job)
    assert held is not None
    await Scripts(redis_client, keys).run(budgets.settle_call(held, DIME))
    await _spent(pool, "alpha", job, "0.1")


async def test_a_reconciliation_in_several_calls_counts_each_job_once_and_corrects_nothing(
    settings: Settings,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given alpha's $1 budget with three jobs settled and written at $0.10 each, and
    # reconciliations dropping one entry per script call (as they drop a thousand of many)
    keys, month = Keys(settings.redis_prefix), current_month()
    budgets = Budgets(redis_client, Scripts(redis_client, keys), keys, pool, lease=60, slack=60)
    for job in ("job-1", "job-2", "job-3"):
        await _settled(settings, redis_client, pool, budgets, job)
    monkeypatch.setattr("queuegate.spend.CHUNK", 1)
    seen: list[Decimal | None] = []

    async def meanwhile() -> None:
        # What a reserve would find; then a fourth job reserves $0.05, as workers go on
        seen.append(await ledger_spent(redis_client, keys, "alpha", month))
        if len(seen) == 1:
            config = TeamConfig(budget_usd=Decimal(1))
            await budgets.reserve("alpha", "gpt-4o-mini", config, NANO_USD // 20, "job-4")

    # When accounting reconciles the ledger, the fourth job reserving between its calls
    corrections = await reconcile(
        _Interleaved(redis_client, {"EVALSHA": meanwhile}),
        pool,
        keys,
        [Scope("alpha")],
        month,
        token=reconciler_token(),
    )

    # Expect the ledger to count each job once between the calls as after them (the three
    # written, then the fourth's reservation too: never a written job's entry beside its
    # row, which would refuse jobs a budget has room for), and no correction reported: the
    # fourth job's reservation is none
    assert seen == [Decimal("0.3"), Decimal("0.35"), Decimal("0.35")]
    assert await spend_drift(redis_client, pool, keys, "alpha", month) == Decimal("0.05")
    assert corrections is not None
    assert [c.drift for c in corrections] == [0]


async def test_a_job_written_just_after_its_ledger_is_listed_is_counted_once(
    settings: Settings, redis_client: aioredis.Redis, pool: asyncpg.Pool
) -> None:
    # Given alpha's $1 budget with a job settled and written at $0.10
    keys, month = Keys(settings.redis_prefix), current_month()
    budgets = Budgets(redis_client, Scripts(redis_client, keys), keys, pool, lease=60, slack=60)
    await _settled(settings, redis_client, pool, budgets, "job-1")

    async def meanwhile() -> None:
        await _settled(settings, redis_client, pool, budgets, "job-late")

    # When accounting reconciles the ledger, and another job is reserved, settled and
    # written just after the reconciliation listed the ledger's jobs
    corrections = await reconcile(
        _Interleaved(redis_client, {"ZRANGE": meanwhile}),
        pool,
        keys,
        [Scope("alpha")],
        month,
        token=reconciler_token(),
    )

    # Expect both counted once, none twice (the late one by its entry beside its row), and
    # no correction reported
    assert await ledger_spent(redis_client, keys, "alpha", month) == Decimal("0.2")
    assert await spend_drift(redis_client, pool, keys, "alpha", month) == 0
    assert corrections is not None
    assert [c.drift for c in corrections] == [0]


async def test_a_reconciled_ledger_finds_a_jobs_entry_without_a_scan_of_the_others(
    settings: Settings, redis_client: aioredis.Redis, pool: asyncpg.Pool
) -> None:
    # Given a month's ledger made by a reconciliation, with one entry put back
    keys, month, alpha = Keys(settings.redis_prefix), current_month(), Scope("alpha")
    restore = {alpha: {"a-1": (NANO_USD, 600_000)}}
    corrections = await reconcile(
        redis_client, pool, keys, [alpha], month, token=reconciler_token(), restore=restore
    )
    assert corrections is not None

    # When Redis is asked how it keeps it
    encoding = await redis_client.object("encoding", keys.spend("alpha", month))

    # Expect a hash table, not the compact list Redis keeps a small hash in, where each of a
    # job's reserve and settle would scan every entry for its own, eight times a job
    assert encoding == b"hashtable"
