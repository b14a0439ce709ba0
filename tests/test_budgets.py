"""Monthly budgets in the real Redis, rebuilt from the real PostgreSQL when Redis lost them."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from types import SimpleNamespace

import asyncpg
import pytest
import redis.asyncio as aioredis

from accounting.store import insert_usage
from queuegate import spend
from queuegate.errors import BudgetExhausted
from queuegate.keys import Keys
from queuegate.messages import UsageEvent
from queuegate.registry import ModelLimits, TeamConfig
from queuegate.settings import Settings
from queuegate.spend import current_month, ledger_spent, ledgers_in_force, to_nano
from workers.admission import budgets as budgets_module
from workers.admission.buckets import Limit, take_call, taken
from workers.admission.budgets import BudgetHeld, Budgets
from workers.admission.scripts import Scripts

DOLLAR = to_nano(Decimal(1))


def _budgets(settings: Settings, client: aioredis.Redis, pool: asyncpg.Pool) -> Budgets:
    keys = Keys(settings.redis_prefix)
    return Budgets(client, Scripts(client, keys), keys, pool, lease=60, slack=60)


def _usage(job_id: str, cost: str, ts: datetime, model: str = "gpt-4o-mini") -> UsageEvent:
    return UsageEvent(
        job_id=job_id,
        team="alpha",
        model_requested=model,
        status="ok",
        cost_usd=Decimal(cost),
        ts=ts,
    )


async def test_a_lost_spend_counter_is_rebuilt_from_this_months_usage(
    settings: Settings, redis_client: aioredis.Redis, pool: asyncpg.Pool
) -> None:
    # Given $0.90 spent this month and $5 last month in PostgreSQL, and no counter in Redis
    now = datetime.now(UTC)
    last_month = now.replace(day=1) - timedelta(days=1)
    await insert_usage(pool, [_usage("a", "0.90", now), _usage("b", "5", last_month)])
    budgets = _budgets(settings, redis_client, pool)
    config = TeamConfig(budget_usd=Decimal(1))

    # When a $0.20 job and then a $0.05 job ask for the budget
    # Expect the first refused (0.90 + 0.20 > 1) and the second admitted
    with pytest.raises(BudgetExhausted, match=r"\$0\.9 of its monthly budget"):
        await budgets.reserve("alpha", "gpt-4o-mini", config, DOLLAR // 5, "job-1")
    reserved, _ = await budgets.reserve("alpha", "gpt-4o-mini", config, DOLLAR // 20, "job-2")
    assert reserved is not None


def test_the_month_is_named_right_on_both_sides_of_every_month_boundary(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given instants a microsecond either side of each month boundary of a leap year and the
    # next (the month is kept between calls), visited forwards, then backwards
    instants = []
    for year in (2028, 2029):
        for month in range(1, 13):
            start = datetime(year, month, 1, tzinfo=UTC).timestamp()
            instants += [start - 1e-6, start, start + 1e-6]
    for now in instants + instants[::-1]:
        # When the month is asked at that instant
        monkeypatch.setattr(spend, "time", SimpleNamespace(time=lambda now=now: now))

        # Expect the month that instant's date is in
        assert current_month() == datetime.fromtimestamp(now, UTC).strftime("%Y-%m")


async def test_settling_replaces_the_estimate_with_the_real_cost(
    settings: Settings, redis_client: aioredis.Redis, pool: asyncpg.Pool
) -> None:
    # Given a $1 budget with $0.60 reserved by a job
    budgets = _budgets(settings, redis_client, pool)
    config = TeamConfig(budget_usd=Decimal(1))
    reservation, _ = await budgets.reserve("alpha", "m", config, DOLLAR * 6 // 10, "job-3")
    assert reservation is not None

    # When the job really cost $0.10
    settle = budgets.settle_call(reservation, DOLLAR // 10)
    await Scripts(redis_client, Keys(settings.redis_prefix)).run(settle)

    # Expect $0.90 left: a $0.85 job fits
    reserved, _ = await budgets.reserve("alpha", "m", config, DOLLAR * 85 // 100, "job-4")
    assert reserved is not None


async def test_a_model_cap_refuses_that_model_only(
    settings: Settings, redis_client: aioredis.Redis, pool: asyncpg.Pool
) -> None:
    # Given a $10 budget with a $0.10 cap on gpt-4o
    budgets = _budgets(settings, redis_client, pool)
    config = TeamConfig(
        budget_usd=Decimal(10), models={"gpt-4o": ModelLimits(budget_usd=Decimal("0.1"))}
    )

    # When each model asks for $0.20, expect gpt-4o refused and the other admitted
    with pytest.raises(BudgetExhausted, match="its gpt-4o cap") as refused:
        await budgets.reserve("alpha", "gpt-4o", config, DOLLAR // 5, "job-5")
    # ... saying how to raise the cap, not the budget
    assert "raise the cap (queuegate teams set alpha --model gpt-4o:budget=...)" in str(
        refused.value
    )
    reserved, _ = await budgets.reserve("alpha", "gpt-4o-mini", config, DOLLAR // 5, "job-6")
    assert reserved is not None


async def test_a_call_riding_on_a_reservation_runs_only_once_the_budget_is_reserved(
    settings: Settings, redis_client: aioredis.Redis, pool: asyncpg.Pool
) -> None:
    # Given a $1 budget and a team bucket of 10 requests a minute
    budgets = _budgets(settings, redis_client, pool)
    config = TeamConfig(budget_usd=Decimal(1))
    bucket = Limit(Keys(settings.redis_prefix).team_bucket("alpha"), "team alpha", 10, None)

    # When a $2 job and then a $0.50 job reserve with a take of the bucket riding along
    with pytest.raises(BudgetExhausted):
        await budgets.reserve(
            "alpha", "m", config, 2 * DOLLAR, "job-big", then=take_call([bucket], 0)
        )
    reserved, took = await budgets.reserve(
        "alpha", "m", config, DOLLAR // 2, "job-small", then=take_call([bucket], 0)
    )

    # Expect the refused job to have taken nothing, the reserved one its request
    assert reserved is not None
    assert took is not None and taken([bucket], 0, took).taken
    left = await redis_client.hget(bucket.key, "r")
    assert left is not None and float(left) == pytest.approx(9, abs=0.01)


async def test_crossing_the_alert_threshold_alerts_once_a_month(
    settings: Settings, redis_client: aioredis.Redis, pool: asyncpg.Pool
) -> None:
    # Given a $1 budget alerting at 50 %
    keys = Keys(settings.redis_prefix)
    budgets, scripts = _budgets(settings, redis_client, pool), Scripts(redis_client, keys)
    config = TeamConfig(budget_usd=Decimal(1), alert_threshold=0.5)

    # When three jobs reserve $0.30 each, and the first two cost $0.01
    reserved = [
        (await budgets.reserve("alpha", "m", config, DOLLAR * 3 // 10, f"job-{i}"))[0]
        for i in range(3)
    ]
    for cheap in reserved[:2]:
        assert cheap is not None
        await scripts.run(budgets.settle_call(cheap, DOLLAR // 100))
    # Expect no alert: $0.92 was reserved at most, $0.02 spent (before: alerted on the
    # reservations, and the month's one alert was gone)
    assert await redis_client.xrange(keys.alerts) == []

    # When the third costs $0.60: spend crosses 50 % at its settle, with no job after it
    # (before, only a later reserve looked: the alert never came)
    assert reserved[2] is not None
    await scripts.run(budgets.settle_call(reserved[2], DOLLAR * 6 // 10))
    assert len(await redis_client.xrange(keys.alerts)) == 1
    # ... and when more jobs come
    more, _ = await budgets.reserve("alpha", "m", config, DOLLAR // 10, "job-3")
    assert more is not None
    await scripts.run(budgets.settle_call(more, DOLLAR // 10))

    # Expect exactly one alert on the stream, naming the team and the month
    entries = await redis_client.xrange(keys.alerts)
    assert len(entries) == 1
    _, fields = entries[0]
    assert fields[b"team"] == b"alpha"
    assert fields[b"month"] == datetime.now(UTC).strftime("%Y-%m").encode()
    assert int(fields[b"spent_nano_usd"]) == DOLLAR * 62 // 100
    assert int(fields[b"budget_nano_usd"]) == DOLLAR  # (written by a settle, it read 0)


async def test_the_spend_in_force_leaves_out_lapsed_reservations_as_a_reserve_would(
    settings: Settings, redis_client: aioredis.Redis, pool: asyncpg.Pool
) -> None:
    # Given a $1 budget with a $0.20 cap on gpt-4o, and $0.60 reserved by a job whose worker
    # died (its entry lapsed at once)
    keys = Keys(settings.redis_prefix)
    config = TeamConfig(
        budget_usd=Decimal(1), models={"gpt-4o": ModelLimits(budget_usd=Decimal("0.2"))}
    )
    dead = Budgets(redis_client, Scripts(redis_client, keys), keys, pool, lease=0, slack=0)
    await dead.reserve("alpha", "m", config, DOLLAR * 6 // 10, "job-dead")
    month = current_month()

    # When the ledgers are read as the front door reads them
    in_force = await ledgers_in_force(redis_client, keys, "alpha", month, [None, "gpt-4o"])

    # Expect the lapsed entry left out, though the ledger counts it until a reserve reaps
    # it, and no gpt-4o ledger yet
    assert in_force == [0, None]
    assert await ledger_spent(redis_client, keys, "alpha", month) == Decimal("0.6")
    # and a reserve agreeing: the whole $1 fits
    live = _budgets(settings, redis_client, pool)
    assert (await live.reserve("alpha", "m", config, DOLLAR, "job-all"))[0] is not None
    assert await ledgers_in_force(redis_client, keys, "alpha", month, [None]) == [DOLLAR]


async def test_the_spend_in_force_leaves_out_no_more_lapsed_entries_than_a_reserve_reaps(
    settings: Settings, redis_client: aioredis.Redis, pool: asyncpg.Pool
) -> None:
    # Given 150 reservations of $0.001 whose workers died long ago (their entries lapsed),
    # more than one reserve reaps (spend.lua's REAP, 100)
    keys, month = Keys(settings.redis_prefix), current_month()
    config = TeamConfig(budget_usd=Decimal(1))
    budgets = _budgets(settings, redis_client, pool)
    milli = DOLLAR // 1000
    for i in range(150):
        await budgets.reserve("alpha", "m", config, milli, f"job-dead-{i}")
    expiry = keys.spend_expiry("alpha", month)
    await redis_client.zadd(expiry, dict.fromkeys(await redis_client.zrange(expiry, 0, -1), 0))

    # When the ledger is read as the front door reads it, before and after a reserve
    before = await ledgers_in_force(redis_client, keys, "alpha", month, [None])
    await budgets.reserve("alpha", "m", config, milli, "job-live")
    after = await ledgers_in_force(redis_client, keys, "alpha", month, [None])

    # Expect each read to leave out the 100 entries the next reserve reaps, no more: what the
    # reserve found ($0.05 of dead entries left, plus its own $0.001) is what the read said
    assert before == [50 * milli]
    assert await ledger_spent(redis_client, keys, "alpha", month) == Decimal("0.051")
    assert after == [milli]


async def test_a_reserve_waits_for_other_jobs_reservations_and_is_refused_on_the_settled_spend(
    settings: Settings, redis_client: aioredis.Redis, pool: asyncpg.Pool
) -> None:
    # Given a $1 budget with $0.30 settled and $0.50 reserved by a job in flight
    keys, month = Keys(settings.redis_prefix), current_month()
    budgets = _budgets(settings, redis_client, pool)
    config = TeamConfig(budget_usd=Decimal(1))
    settled, _ = await budgets.reserve("alpha", "m", config, DOLLAR * 3 // 10, "job-settled")
    assert settled is not None
    await Scripts(redis_client, keys).run(budgets.settle_call(settled, DOLLAR * 3 // 10))
    flying, _ = await budgets.reserve("alpha", "m", config, DOLLAR // 2, "job-flying")
    assert flying is not None

    # When a $0.40 job asks (the settled spend takes it, the reservation does not leave room)
    # Expect it held back, holding nothing; and a $0.75 job refused on the settled spend
    with pytest.raises(BudgetHeld):
        await budgets.reserve("alpha", "m", config, DOLLAR * 4 // 10, "job-waiting")
    with pytest.raises(BudgetExhausted, match=r"has spent \$0\.3 of its monthly budget"):
        await budgets.reserve("alpha", "m", config, DOLLAR * 75 // 100, "job-too-big")
    # and the spend shown (status) still spent and reserved, the front door's settled only
    assert await ledger_spent(redis_client, keys, "alpha", month) == Decimal("0.8")
    in_force = await ledgers_in_force(redis_client, keys, "alpha", month, [None], settled=True)
    assert in_force == [DOLLAR * 3 // 10]

    # When the job in flight settles at $0.01, expect the $0.40 job to fit
    await Scripts(redis_client, keys).run(budgets.settle_call(flying, DOLLAR // 100))
    reserved, _ = await budgets.reserve("alpha", "m", config, DOLLAR * 4 // 10, "job-waiting")
    assert reserved is not None


async def test_a_lapsed_or_reconciled_reservation_stops_holding_the_budget_back(
    settings: Settings, redis_client: aioredis.Redis, pool: asyncpg.Pool
) -> None:
    # Given a $1 budget, $0.90 reserved by a job whose worker died (its entry lapsed at once),
    # and $0.50 by a job whose settle was lost (its usage row says it cost $0.10)
    keys, month = Keys(settings.redis_prefix), current_month()
    config = TeamConfig(budget_usd=Decimal(1))
    dead = Budgets(redis_client, Scripts(redis_client, keys), keys, pool, lease=0, slack=0)
    await dead.reserve("alpha", "m", config, DOLLAR * 9 // 10, "job-dead")
    budgets = _budgets(settings, redis_client, pool)
    await budgets.reserve("alpha", "m", config, DOLLAR // 2, "job-lost")
    await insert_usage(pool, [_usage("job-lost", "0.10", datetime.now(UTC), model="m")])

    # When accounting reconciles the ledger
    assert await spend.reconcile(
        redis_client, pool, keys, [spend.Scope("alpha")], month, token=spend.reconciler_token()
    )

    # Expect neither reservation counted any more: a $0.95 job refused on the $0.10 settled
    # (not held back for ever by reservations gone), a $0.85 job reserved
    with pytest.raises(BudgetExhausted):
        await budgets.reserve("alpha", "m", config, DOLLAR * 95 // 100, "job-big")
    reserved, _ = await budgets.reserve("alpha", "m", config, DOLLAR * 85 // 100, "job-fits")
    assert reserved is not None
    assert (
        await redis_client.hget(keys.spend("alpha", month), "reserved")
        == str(DOLLAR * 85 // 100).encode()
    )


async def test_only_the_reservations_of_jobs_whose_claims_lapsed_are_ended_as_spend(
    settings: Settings, redis_client: aioredis.Redis, pool: asyncpg.Pool
) -> None:
    # Given a $1 budget and a $1 cap on model m, each holding $0.30 reservations of a job
    # whose claim's owner is alive, one whose owner's lease lapsed (it died, or stalled), and
    # one with no claim (it missed it, and takes it up later)
    keys, month = Keys(settings.redis_prefix), current_month()
    budgets = _budgets(settings, redis_client, pool)
    config = TeamConfig(budget_usd=Decimal(1), models={"m": ModelLimits(budget_usd=Decimal(1))})
    now_ms = int(time.time() * 1000)
    leases = {"job-live": now_ms + 60_000, "job-dead": now_ms - 1}
    for job_id, lease in leases.items():
        await redis_client.hset(keys.claim("alpha", job_id), mapping={"owner": "w", "lease": lease})
    held = {}
    for job_id in ("job-live", "job-dead", "job-unclaimed"):
        held[job_id], _ = await budgets.reserve("alpha", "m", config, DOLLAR * 3 // 10, job_id)

    # When a $0.30 job is held back by them, and the dead one's reservation in that ledger
    # (the team's) is ended
    with pytest.raises(BudgetHeld) as caught:
        await budgets.reserve("alpha", "m", config, DOLLAR * 3 // 10, "job-waiting")
    assert caught.value.ledger == keys.spend("alpha", month)
    assert await budgets.drop_dead(caught.value) == 1

    # Expect it a reservation no more, but spent at its worst (its estimate, a bounded job's)
    # until its job settles, lapsing as it would have; the others kept, and the model's
    # ledger, which held no job, as it was
    team = await redis_client.hgetall(keys.spend("alpha", month))
    assert b"r:job-dead" not in team and team[b"j:job-dead"] == str(DOLLAR * 3 // 10).encode()
    assert (team[b"open"], team[b"reserved"]) == (
        str(DOLLAR * 9 // 10).encode(),
        str(DOLLAR * 6 // 10).encode(),
    )
    assert await redis_client.zscore(keys.spend_expiry("alpha", month), "job-dead") is not None
    capped = await redis_client.hgetall(keys.spend("alpha", month, "m"))
    assert capped[b"reserved"] == str(DOLLAR * 9 // 10).encode()
    # ... so the waiting job is held still, by the live reservations, and none is left to end
    with pytest.raises(BudgetHeld) as caught:
        await budgets.reserve("alpha", "m", config, DOLLAR * 3 // 10, "job-waiting")
    assert await budgets.drop_dead(caught.value) == 0

    # When the dead job settles after all (its owner had stalled), at $0.01
    dead = held["job-dead"]
    assert dead is not None
    await Scripts(redis_client, keys).run(budgets.settle_call(dead, DOLLAR // 100))

    # Expect its cost in both ledgers in place of its estimate, and the waiting job to fit
    for model in (None, "m"):
        ledger = await redis_client.hgetall(keys.spend("alpha", month, model))
        assert ledger[b"open"] == str(DOLLAR * 61 // 100).encode()
        assert ledger[b"reserved"] == str(DOLLAR * 6 // 10).encode()
    reserved, _ = await budgets.reserve("alpha", "m", config, DOLLAR * 3 // 10, "job-waiting")
    assert reserved is not None


async def test_a_stalled_owners_unbounded_job_holds_jobs_back_near_the_edge_until_it_settles(
    settings: Settings, redis_client: aioredis.Redis, pool: asyncpg.Pool
) -> None:
    # Given a $1 budget and an unbounded job reserving $0.05 that may cost $0.90, whose
    # owner's lease lapsed (it stalled) mid-call
    keys, month = Keys(settings.redis_prefix), current_month()
    budgets = _budgets(settings, redis_client, pool)
    config = TeamConfig(budget_usd=Decimal(1))
    cent = DOLLAR // 100
    stalled, _ = await budgets.reserve("alpha", "m", config, 5 * cent, "a", room=90 * cent)
    assert stalled is not None
    lapsed = int(time.time() * 1000) - 1
    await redis_client.hset(keys.claim("alpha", "a"), mapping={"owner": "w", "lease": lapsed})

    # When another unbounded job waits on it past a lease, and its reservation is ended
    with pytest.raises(BudgetHeld) as caught:
        await budgets.reserve("alpha", "m", config, 5 * cent, "b", room=90 * cent)
    assert await budgets.drop_dead(caught.value) == 1

    # Expect it spent at its estimate, its excess kept: the next unbounded job and a bounded
    # one that fits the settled spend but not the stalled job's worst held (dropped, it
    # counted nothing, and one unbounded job after another was admitted beside it), not
    # refused (counted as spent at its worst, a killed worker's jobs refused others while
    # their next deliveries were a moment away); one the settled spend cannot take refused
    ledger = await redis_client.hgetall(keys.spend("alpha", month))
    assert (ledger[b"open"], ledger[b"reserved"]) == (str(5 * cent).encode(), b"0")
    assert ledger[b"excess"] == str(85 * cent).encode()
    with pytest.raises(BudgetHeld):
        await budgets.reserve("alpha", "m", config, 5 * cent, "b", room=90 * cent)
    with pytest.raises(BudgetHeld):
        await budgets.reserve("alpha", "m", config, 15 * cent, "b")
    with pytest.raises(BudgetExhausted):
        await budgets.reserve("alpha", "m", config, 96 * cent, "b")

    # ... and, once it settles at $0.40 when its owner resumes, a job that fits beside that
    await Scripts(redis_client, keys).run(budgets.settle_call(stalled, 40 * cent))
    admitted, _ = await budgets.reserve("alpha", "m", config, 5 * cent, "b", room=50 * cent)
    assert admitted is not None
    ledger = await redis_client.hgetall(keys.spend("alpha", month))
    assert ledger[b"open"] == str(45 * cent).encode()
    assert ledger[b"excess"] == str(45 * cent).encode()  # b's own
    assert b"x:a" not in ledger


async def test_a_ledgers_sums_follow_its_entries_through_reserves_again_and_settles(
    settings: Settings, redis_client: aioredis.Redis, pool: asyncpg.Pool
) -> None:
    # Given a $1 budget, $0.30 reserved for job a and $0.20 for job b
    keys, month = Keys(settings.redis_prefix), current_month()
    budgets, scripts = _budgets(settings, redis_client, pool), Scripts(redis_client, keys)
    config = TeamConfig(budget_usd=Decimal(1))
    cent = DOLLAR // 100
    await budgets.reserve("alpha", "m", config, 30 * cent, "a")
    b, _ = await budgets.reserve("alpha", "m", config, 20 * cent, "b")
    assert b is not None

    async def sums() -> tuple[int, int]:
        ledger = await redis_client.hgetall(keys.spend("alpha", month))
        return int(ledger[b"open"]), int(ledger[b"reserved"])

    # When a is delivered again and reserves $0.25 (its entry replaced), then settles at
    # $0.10, and b settles at nothing
    a, _ = await budgets.reserve("alpha", "m", config, 25 * cent, "a")
    assert a is not None
    again = await sums()
    await scripts.run(budgets.settle_call(a, 10 * cent))
    settled_a = await sums()
    await scripts.run(budgets.settle_call(b, 0))

    # Expect the sums to hold exactly what the entries do at each step
    assert again == (45 * cent, 45 * cent)
    assert settled_a == (30 * cent, 20 * cent)
    assert await sums() == (10 * cent, 0)
    ledger = await redis_client.hgetall(keys.spend("alpha", month))
    assert ledger[b"j:a"] == str(10 * cent).encode()
    assert not {b"r:a", b"j:b", b"r:b"} & set(ledger)


async def test_a_reserve_holds_a_job_to_its_teams_config_and_month_as_they_are_now(
    settings: Settings,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a $1 budget a job of which reserved $0.50
    keys = Keys(settings.redis_prefix)
    budgets = _budgets(settings, redis_client, pool)
    await budgets.reserve("alpha", "m", TeamConfig(budget_usd=Decimal(1)), DOLLAR // 2, "a")

    # When the budget is lowered to $0.60, and another job asks for $0.20
    lowered = TeamConfig(budget_usd=Decimal("0.6"))
    with pytest.raises(BudgetHeld):
        await budgets.reserve("alpha", "m", lowered, DOLLAR // 5, "b")
    # ... and when a month has passed
    reserving = budgets.reserving("alpha", "m", lowered, DOLLAR // 5, "c")
    monkeypatch.setattr(budgets_module, "current_month", lambda: "2999-01")
    later = budgets.reserving("alpha", "m", lowered, DOLLAR // 5, "c")

    # Expect the lowered budget to hold the job back, and the new month's ledger asked
    assert reserving is not None and later is not None
    assert reserving.held.keys[0] == keys.spend("alpha", current_month())
    assert later.held.keys[0] == keys.spend("alpha", "2999-01")


async def test_a_worker_forgets_the_settled_jobs_of_quiet_teams_and_past_months(
    settings: Settings,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a worker that settled jobs of team quiet in October, and of team busy
    budgets = _budgets(settings, redis_client, pool)
    start = 1_790_000_000.0
    monkeypatch.setattr(budgets_module.time, "time", lambda: start)
    for n in range(50):
        budgets.remember("quiet", "2026-10", "gpt-4o-mini", f"q-{n}", 1_000)
    budgets.remember("busy", "2026-11", "gpt-4o-mini", "b-0", 1_000)

    # When an hour and more has passed (the entries would have lapsed from any ledger), and
    # only team busy settles a job
    later = start + budgets_module.SETTLED_TTL + budgets_module.SWEEP_SECONDS + 1
    monkeypatch.setattr(budgets_module.time, "time", lambda: later)
    budgets.remember("busy", "2026-11", "gpt-4o-mini", "b-1", 1_000)

    # Expect the worker to hold only busy's job of now: team quiet's month, which no job of
    # it would ever sweep again, and busy's lapsed job are forgotten
    assert {key: len(jobs) for key, jobs in budgets._settled.items()} == {("busy", "2026-11"): 1}
