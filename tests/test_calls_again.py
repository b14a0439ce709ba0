"""A job called again under a second claim (Redis lost the first's outcome before its usage
row was written): each claim's calls are billed, each once, however often its event comes."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from accounting.store import insert_usage
from mockprovider import Behavior, MockConfig
from queuegate.errors import Billed, DeadlineExceeded
from queuegate.messages import Attempt, ChatJob, UsageEvent
from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from tests.proxy import TcpProxy
from tests.support import lose_redis_data, running_accountant, running_gateway, wait_until
from tests.teams import register
from workers.outcome import Timing, failed, outcome_of_late

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


@pytest.mark.parametrize(
    ("first", "later", "rows"),
    [
        (called("job-1", "w1/a"), called("job-1", "sweep/s", covers=["w1/a"]), 1),
        (called("job-1", "sweep/s", covers=["w1/a"]), called("job-1", "w1/a"), 1),
        (
            called("job-1", "w2/b", covers=["w1/a"]),
            called("job-1", "w3/c", covers=["w1/a", "w2/b"]),
            1,
        ),
        (called("job-1", "w1/a"), called("job-1", "w2/b", covers=["w9/z"]), 2),
    ],
    ids=["covers the row's", "the row covers its", "both cover one", "covers another"],
)
async def test_an_event_billing_a_call_the_row_may_bill_is_dropped(
    pool: asyncpg.Pool, first: UsageEvent, later: UsageEvent, rows: int
) -> None:
    # Given a job's row, under a claim and maybe billing the calls of others as lost
    await insert_usage(pool, [first])

    # When another of its events comes whose claims (its own, those it covers) meet the
    # row's: the same call may be in both, as a sweep's and a stalled owner's may be
    await insert_usage(pool, [later])

    # Expect it dropped; only an event whose claims the row does not know is a row more
    assert len(await _rows(pool)) == rows


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


async def test_a_job_in_flight_when_redis_lost_its_claim_is_billed_for_both_calls(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Long enough for the copy sent below to be claimed while the first call is out, on a
    # loaded machine too (with 1.5 s, the first stored its outcome first once, and the copy
    # was answered from it)
    slow = MockConfig(default=Behavior(latency_ms=4000))
    async with (
        running_gateway(settings, mock_config=slow) as gw,
        gw.client("alpha") as first_client,
        gw.client("alpha") as second_client,
    ):
        # Given a job mid-call
        job: ChatJob = first_client.job("gpt-4o-mini", HELLO, job_id="in-flight")
        first = await first_client.submit(job)
        await wait_until(lambda: gw.mock.arrived >= 1)

        # When Redis loses its data (the job's claim with it), and the job is sent again:
        # nothing says it is being answered, so it is called again
        await lose_redis_data(redis_client, settings)
        second = await second_client.submit(job)
        results = [await first.result(30), await second.result(30)]
        assert [r.status for r in results] == ["ok", "ok"]
        assert gw.mock.stats.calls == 2

        # Expect each call billed once: the delivery that stored the job's outcome second
        # announces it, and bills its own call on a row of its own
        rows = await gw.usage_rows(2)
    claims = [r["claim"] for r in rows]
    assert [r["job_id"] for r in rows] == ["in-flight", f"in-flight/again/{claims[1]}"]
    assert claims[0] != claims[1]
    assert rows[0]["cost_usd"] == rows[1]["cost_usd"] > 0


def test_a_late_delivery_whose_calls_another_billed_as_lost_bills_what_they_cost_past_it() -> None:
    # Given a job's stored outcome, billing as lost (at $0.002, with its estimated 10 prompt
    # and 256 output tokens) the call of a claim whose owner stalled
    timing = Timing(0.0, "w1")
    call = DeadlineExceeded("past its deadline", [CALL])
    stored = failed("job-1", "alpha", "gpt-mini", call, timing)
    stored = stored.model_copy(
        update={"usage": stored.usage.model_copy(update={"claim": "w2/b", "covers": ["w1/a"]})}
    )
    own = failed("job-1", "alpha", "gpt-mini", call, timing)
    counts = {"cost_usd": Decimal(5), "input_tokens": 12, "output_tokens": 4000}
    own = own.model_copy(update={"usage": own.usage.model_copy(update=counts)})
    lost = Billed("gpt-mini", "openai-main", "openai", 10, 256, 0, Decimal("0.002"), True)

    # Expect that owner, finishing after all (its call cost $5, for 12 and 4,000 tokens), to
    # announce the stored result and bill on a row of its own what its call cost past the
    # estimate, with its tokens past the estimated ones the stored row counts (before: whole,
    # the job's rows counting them twice); another delivery that called (Redis lost the claim
    # under it) bills its own call, under its claim; one that made no call, nothing
    stalled = outcome_of_late(stored, own, "w1/a", lost)
    assert stalled.result == stored.result
    assert (stalled.usage.job_id, stalled.usage.claim) == ("job-1/late/w1/a", "w1/a")
    assert stalled.usage.cost_usd == Decimal("4.998")
    assert (stalled.usage.input_tokens, stalled.usage.output_tokens) == (2, 3744)
    assert stalled.usage.tokens_estimated is True
    late = outcome_of_late(stored, own, "w3/c", None)
    assert (late.result, late.usage.claim, late.usage.attempts) == (stored.result, "w3/c", 1)
    assert (late.usage.job_id, late.usage.cost_usd) == ("job-1", Decimal(5))
    assert (late.usage.output_tokens, late.usage.tokens_estimated) == (4000, None)
    uncalled = failed("job-1", "alpha", "gpt-mini", DeadlineExceeded("past its deadline"), timing)
    assert outcome_of_late(stored, uncalled, "w3/c", None) is stored
    # ... and no job can take such a row's id (its call would be billed against the row)
    job = {"job_id": "job-1/late/w1/a", "team": "alpha", "model": "gpt-mini", "messages": []}
    with pytest.raises(ValueError, match="may not contain '/late/'"):
        ChatJob.model_validate(job)


async def _rows_once_accounted(
    settings: Settings, pool: asyncpg.Pool, *, events: int
) -> list[asyncpg.Record]:
    """The usage rows once an accountant, run until then, has written ``events`` events."""
    async with running_accountant(settings) as accountant:
        await wait_until(lambda: accountant.events_written >= events)
    return list(await pool.fetch("SELECT * FROM usage_log ORDER BY job_id"))
