"""A reservation dropped as a dead worker's (its claim's lease lapsed) still counts its job's
cost when that worker had only stalled and settles on resuming: once, whether the job's next
delivery or accounting got there first, and its mark in the ledger goes with its entry's
lapse."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from decimal import Decimal

import asyncpg
import pytest
import redis.asyncio as aioredis

from accounting.store import insert_usage
from queuegate.keys import Keys
from queuegate.messages import UsageEvent
from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from queuegate.spend import Scope, current_month, reconcile, reconciler_token, to_nano
from workers.admission.budgets import BudgetHeld, Budgets, Reservation
from workers.admission.scripts import Scripts

CENT = to_nano(Decimal("0.01"))
CONFIG = TeamConfig(budget_usd=Decimal(1))


class Ledger:
    """Team alpha's ledger for the month, its jobs reserved and settled as workers do."""

    def __init__(self, settings: Settings, client: aioredis.Redis, pool: asyncpg.Pool) -> None:
        self.keys, self.month = Keys(settings.redis_prefix), current_month()
        self.client, self.pool = client, pool
        self.scripts = Scripts(client, self.keys)
        self.budgets = Budgets(client, self.scripts, self.keys, pool, lease=60, slack=60)
        self.key = self.keys.spend("alpha", self.month)
        self.expiry = self.keys.spend_expiry("alpha", self.month)

    async def reserve(self, job_id: str, cents: int) -> Reservation:
        reservation, _ = await self.budgets.reserve("alpha", "m", CONFIG, cents * CENT, job_id)
        assert reservation is not None
        return reservation

    async def settle(self, reservation: Reservation, cents: int) -> None:
        await self.scripts.run(self.budgets.settle_call(reservation, cents * CENT))

    async def stall(self, *job_ids: str) -> dict[str, Reservation]:
        """Reserve $0.40 for each job, whose claim's owner then lets its lease lapse (SIGSTOPped
        past it), and drop their reservations as a $0.70 job they hold back does: the
        stalled owners' reservations."""
        lapsed = int(time.time() * 1000) - 1
        stalled = {}
        for job_id in job_ids:
            await self.client.hset(
                self.keys.claim("alpha", job_id), mapping={"owner": "w", "lease": lapsed}
            )
            stalled[job_id] = await self.reserve(job_id, 40)
        with pytest.raises(BudgetHeld) as caught:
            await self.reserve("job-waiting", 70)
        assert await self.budgets.drop_dead(caught.value) == len(job_ids)
        # Each marked dropped, counted nowhere.
        assert await self.jobs() == {f"d:{job_id}": "1" for job_id in job_ids}
        return stalled

    async def fields(self) -> dict[str, str]:
        return {
            key.decode(): value.decode()
            for key, value in (await self.client.hgetall(self.key)).items()
        }

    async def jobs(self) -> dict[str, str]:
        """Each field of a job (``j:``, ``r:``, ``x:``, ``d:``) and its value."""
        return {key: value for key, value in (await self.fields()).items() if key[1:2] == ":"}


@pytest.fixture
def ledger(settings: Settings, redis_client: aioredis.Redis, pool: asyncpg.Pool) -> Ledger:
    return Ledger(settings, redis_client, pool)


async def test_a_stalled_owners_settle_counts_its_dropped_reservations_cost(
    ledger: Ledger,
) -> None:
    # Given a $1 budget and job a's $0.40 reservation dropped, its claim's lease lapsed
    stalled = await ledger.stall("a")

    # When its owner, only stalled, resumes and settles what its call cost, $0.33
    await ledger.settle(stalled["a"], 33)

    # Expect the cost counted as the job's settled entry, not left to the next reconciliation
    fields = await ledger.fields()
    assert int(fields["open"]) == 33 * CENT and int(fields["reserved"]) == 0
    assert await ledger.jobs() == {"j:a": str(33 * CENT)}
    assert await ledger.client.zscore(ledger.expiry, "a") is not None


async def test_the_next_delivery_reserving_afresh_clears_the_mark_and_counts_once(
    ledger: Ledger,
) -> None:
    # Given job a's $0.40 reservation dropped, its claim's lease lapsed
    await ledger.stall("a")

    # When its next delivery takes the claim over and reserves afresh
    again = await ledger.reserve("a", 40)

    # Expect the mark gone with it, and its settle of $0.33 counted once
    assert await ledger.jobs() == {"j:a": str(40 * CENT), "r:a": str(40 * CENT)}
    await ledger.settle(again, 33)
    assert int((await ledger.fields())["open"]) == 33 * CENT
    assert await ledger.jobs() == {"j:a": str(33 * CENT)}


async def test_a_settle_after_the_jobs_row_is_reconciled_does_not_count_it_twice(
    ledger: Ledger,
) -> None:
    # Given jobs a and b's reservations dropped, their claims' leases lapsed, and b's usage
    # row ($0.25) written and reconciled into the ledger's base before its owner settles
    stalled = await ledger.stall("a", "b")
    await insert_usage(
        ledger.pool,
        [
            UsageEvent(
                job_id="b",
                team="alpha",
                model_requested="m",
                status="ok",
                cost_usd=Decimal("0.25"),
                ts=datetime.now(UTC),
            )
        ],
    )
    assert await reconcile(
        ledger.client,
        ledger.pool,
        ledger.keys,
        [Scope("alpha")],
        ledger.month,
        token=reconciler_token(),
    )
    assert await ledger.jobs() == {"d:a": "1"}

    # When both owners resume and settle: a for $0.33, b for its $0.25
    await ledger.settle(stalled["a"], 33)
    await ledger.settle(stalled["b"], 25)

    # Expect each counted once: a by its entry, b by its row in base
    fields = await ledger.fields()
    assert int(fields["base"]) == 25 * CENT and int(fields["open"]) == 33 * CENT
    assert await ledger.jobs() == {"j:a": str(33 * CENT)}
    assert await ledger.client.zscore(ledger.expiry, "b") is None


async def test_a_dropped_reservations_mark_is_reaped_when_its_entry_would_have_lapsed(
    ledger: Ledger,
) -> None:
    # Given job a's reservation dropped, its claim's lease lapsed, leaving its mark
    await ledger.stall("a")

    # When the time its entry would have lapsed at passes (its owner never came back), and
    # another job reserves
    assert await ledger.client.zadd(ledger.expiry, {"a": 1}, xx=True, ch=True) == 1
    await ledger.reserve("b", 10)

    # Expect the mark reaped with it: nothing of job a left
    assert await ledger.jobs() == {"j:b": str(10 * CENT), "r:b": str(10 * CENT)}
    assert await ledger.client.zscore(ledger.expiry, "a") is None
