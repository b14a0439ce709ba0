"""A job called again under a second claim (Redis lost the first's outcome before its usage
row was written): each claim's calls are billed, each once, however often its event comes."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from accounting.store import insert_usage
from queuegate.messages import Attempt, ChatJob, UsageEvent
from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from tests.proxy import TcpProxy
from tests.support import lose_redis_data, running_accountant, running_gateway, wait_until
from tests.teams import register

HELLO = [{"role": "user", "content": "Hello there"}]
CALL = Attempt(model="gpt-mini", deployment="openai-main", provider="openai", latency_ms=5.0)


def called(job_id: str, claim: str | None, **fields: Any) -> UsageEvent:
    """The usage event of a job whose delivery under ``claim`` made one call."""
    values: dict[str, Any] = {
        "team": "alpha",
        "model_requested": "gpt-mini",
        "cost_usd": Decimal("0.25"),
        "status": "ok",
        "attempts": 1,
        "attempt_log": [CALL],
        "claim": claim,
    }
    return UsageEvent(job_id=job_id, **(values | fields))


async def _rows(pool: asyncpg.Pool) -> list[tuple[str, Decimal, str | None]]:
    rows = await pool.fetch("SELECT job_id, cost_usd, claim FROM usage_log ORDER BY job_id")
    return [(r["job_id"], r["cost_usd"], r["claim"]) for r in rows]


async def test_a_jobs_calls_under_a_second_claim_are_billed_on_a_row_of_their_own(
    pool: asyncpg.Pool,
) -> None:
    # Given a job's row, billed under claim w1/a
    assert await insert_usage(pool, [called("job-1", "w1/a")]) == 1

    # When its event comes again, then the event of the same job called again under claim
    # w2/b, twice in one batch, then once more on its own
    assert await insert_usage(pool, [called("job-1", "w1/a")]) == 0
    again = called("job-1", "w2/b", cost_usd=Decimal("0.5"))
    assert await insert_usage(pool, [again, again]) == 1
    assert await insert_usage(pool, [again]) == 0

    # Expect the second claim's calls on a row of their own, each claim's once
    assert await _rows(pool) == [
        ("job-1", Decimal("0.25"), "w1/a"),
        ("job-1/again/w2/b", Decimal("0.5"), "w2/b"),
    ]


async def test_two_claims_of_a_job_in_one_batch_are_two_rows(pool: asyncpg.Pool) -> None:
    # When one batch holds a job's event under two claims, and another job's event
    await insert_usage(
        pool, [called("job-1", "w1/a"), called("job-2", "w1/c"), called("job-1", "w2/b")]
    )

    # Expect each claim's calls billed once
    assert [job for job, _, _ in await _rows(pool)] == ["job-1", "job-1/again/w2/b", "job-2"]


@pytest.mark.parametrize(
    ("first", "later"),
    [
        (called("job-1", "w1/a"), called("job-1", None)),
        (called("job-1", None), called("job-1", "w2/b")),
        (called("job-1", "w1/a"), called("job-1", "w2/b", attempts=0, attempt_log=[])),
    ],
    ids=["event without a claim", "row without a claim", "no call"],
)
async def test_an_event_that_cannot_be_told_a_second_call_is_dropped(
    pool: asyncpg.Pool, first: UsageEvent, later: UsageEvent
) -> None:
    # Given a job's row
    await insert_usage(pool, [first])

    # When another of its events comes that cannot be told a call made again: without a
    # claim (from a worker before claims were named), against a row without one (written
    # before), or one that made no call (refused by another delivery)
    assert await insert_usage(pool, [later]) == 0

    # Expect the job's one row
    assert [job for job, _, _ in await _rows(pool)] == ["job-1"]


@pytest.mark.parametrize("budget", [None, Decimal("1")], ids=["no budget", "budget"])
async def test_a_job_called_again_after_redis_lost_its_outcome_is_billed_for_both_calls(
    settings: Settings, redis_client: aioredis.Redis, pool: asyncpg.Pool, budget: Decimal | None
) -> None:
    await register(settings, "alpha", TeamConfig(budget_usd=budget))
    # Given a job answered by one worker while accounting is stopped, that worker gone
    async with running_gateway(settings, accounting=False) as gw, gw.client("alpha") as client:
        job: ChatJob = client.job("gpt-4o-mini", HELLO, job_id="twice")
        first = await (await client.submit(job)).result(10)
        assert first.status == "ok"

    # When Redis loses its data, and the job is sent again to another worker, which cannot
    # know it was answered (no usage row yet, no memory of it) and calls it again
    await lose_redis_data(redis_client, settings)
    async with running_gateway(settings, accounting=False) as gw, gw.client("alpha") as client:
        second = await (await client.submit(job)).result(10)
        assert second.status == "ok"
        assert gw.mock.stats.calls == 1

    # ... and accounting then catches up
    rows = await _rows_once_accounted(settings, pool, events=2)

    # Expect both calls billed, each once: the second on a row of its own, naming the claim
    # it was made under
    assert first.gateway is not None and second.gateway is not None
    cost = first.gateway.cost_usd
    assert cost > 0 and second.gateway.cost_usd == cost
    assert [(r["job_id"], r["cost_usd"]) for r in rows] == [
        ("twice", cost),
        (f"twice/again/{rows[1]['claim']}", cost),
    ]
    assert rows[0]["claim"] != rows[1]["claim"]


async def test_a_job_served_unclaimed_then_called_again_is_billed_for_both_calls(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    # Given a job served unclaimed by a fail-open worker while Redis is away (its outcome
    # not stored), accounting stopped
    async with TcpProxy(settings.redis_url) as proxy:
        s = settings.model_copy(update={"redis_url": proxy.url, "redis_outage": "fail_open"})
        async with running_gateway(s, accounting=False) as gw, gw.client("alpha") as client:
            job: ChatJob = client.job("gpt-4o-mini", HELLO, job_id="unclaimed")
            await proxy.down()
            assert (await (await client.submit(job)).result(30)).status == "ok"
            await proxy.up()

    # When it is sent again under its id to another worker, which finds no outcome and
    # calls it again
    async with running_gateway(settings, accounting=False) as gw, gw.client("alpha") as client:
        assert (await (await client.submit(job)).result(30)).status == "ok"
        assert gw.mock.stats.calls == 1

    # Expect both calls billed once accounting writes them: the unclaimed delivery named as
    # a claim would be
    rows = await _rows_once_accounted(settings, pool, events=2)
    assert [r["job_id"] for r in rows] == ["unclaimed", f"unclaimed/again/{rows[1]['claim']}"]


async def _rows_once_accounted(
    settings: Settings, pool: asyncpg.Pool, *, events: int
) -> list[asyncpg.Record]:
    """The usage rows once an accountant, run until then, has written ``events`` events."""
    async with running_accountant(settings) as accountant:
        await wait_until(lambda: accountant.events_written >= events)
    return list(await pool.fetch("SELECT * FROM usage_log ORDER BY job_id"))
