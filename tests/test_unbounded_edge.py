"""Near a budget's edge, jobs without an output limit (unbounded) run one at a time per ledger:
their real output may pass their estimate many times over (README, Admission control)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import asyncpg
import pytest
import redis.asyncio as aioredis

from accounting.store import insert_usage
from admin.teams import configure, in_force
from mockprovider import Behavior, MockConfig
from producer import GatewayClient
from queuegate.errors import BudgetExhausted
from queuegate.keys import Keys
from queuegate.messages import UsageEvent
from queuegate.registry import ModelLimits, TeamConfig, set_team_config
from queuegate.settings import Settings
from queuegate.spend import Scope, current_month, reconcile, reconciler_token, to_nano
from tests.support import running_gateway, wait_until
from tests.teams import register, team_identities
from workers.admission.budgets import BudgetHeld, Budgets
from workers.admission.scripts import Scripts

DOLLAR = to_nano(Decimal(1))
DIME = DOLLAR // 10
CENT = DOLLAR // 100
MINI = "gpt-4o-mini"
MESSAGES = [{"role": "user", "content": "Think hard."}]
"""Estimated at 6 prompt tokens and, with no ``max_tokens``, the default 256 output tokens:
$0.000154 at gpt-4o-mini's prices ($0.15 and $0.60 a million). The mock thinks 4,096 tokens
at ``reasoning_effort`` max and answers 5 words: billed 4,101, $0.00246, 16 times that."""
JOB_USD = (6 * Decimal("0.15") + 4101 * Decimal("0.60")) / 1_000_000
"""About what one such job costs (its prompt billed by the mock's own count, a token or two
off)."""
SMALL_BUDGET = Decimal("0.002")
"""Less than one such job's cost: near the edge from the first job on, while seven of their
estimates ($0.00108) fit it."""
SEVERAL_BUDGET = Decimal("0.006")
"""Room for two such jobs at their worst beside each other: the third goes alone after them."""
LATENCY_MS = 500
"""Long enough that every job of a burst is in flight at once, unless it waits."""
WAIT = 30.0


def _budgets(settings: Settings, client: aioredis.Redis, pool: asyncpg.Pool) -> Budgets:
    keys = Keys(settings.redis_prefix)
    return Budgets(client, Scripts(client, keys), keys, pool, lease=60, slack=60)


async def test_an_unbounded_job_near_the_edge_waits_for_the_open_reservations_then_goes_alone(
    settings: Settings, redis_client: aioredis.Redis, pool: asyncpg.Pool
) -> None:
    # Given a $1 budget with a $0.10 job's reservation open
    budgets = _budgets(settings, redis_client, pool)
    config = TeamConfig(budget_usd=Decimal(1))
    first, _ = await budgets.reserve("alpha", MINI, config, DIME, "job-1")
    assert first is not None

    # When an unbounded job estimated at $0.05 that may cost $0.95 asks for it
    # Expect it held: the budget has no room for its worst beside the open reservation
    with pytest.raises(BudgetHeld):
        await budgets.reserve("alpha", MINI, config, CENT * 5, "job-u", room=CENT * 95)
    # ... while one that may cost $0.80 (room beside it), or whose room is its estimate (a
    # bounded job), is admitted beside it
    far, _ = await budgets.reserve("alpha", MINI, config, CENT * 5, "job-f", room=DIME * 8)
    same, _ = await budgets.reserve("alpha", MINI, config, CENT * 5, "job-b", room=CENT * 5)
    assert far is not None and same is not None

    # When the others settle (nothing reserved any more: $0.20 spent)
    for held in (first, far, same):
        await Scripts(redis_client, Keys(settings.redis_prefix)).run(
            budgets.settle_call(held, held.nano)
        )
    # Expect the unbounded job admitted alone, though its worst passes the budget
    alone, _ = await budgets.reserve("alpha", MINI, config, CENT * 5, "job-u", room=CENT * 95)
    assert alone is not None
    # ... a second one held by its reservation, and refusal as before: on the settled spend
    with pytest.raises(BudgetHeld):
        await budgets.reserve("alpha", MINI, config, CENT * 5, "job-v", room=CENT * 95)
    with pytest.raises(BudgetExhausted):
        await budgets.reserve("alpha", MINI, config, DIME * 8 + 1, "job-w", room=DOLLAR)


async def test_unbounded_jobs_in_flight_count_at_their_worst_for_the_jobs_after_them(
    settings: Settings, redis_client: aioredis.Redis, pool: asyncpg.Pool
) -> None:
    # Given a $1 budget, and two unbounded jobs estimated at $0.05 that may cost $0.40
    # admitted (room for both at their worst)
    budgets = _budgets(settings, redis_client, pool)
    config = TeamConfig(budget_usd=Decimal(1))
    for job in ("job-1", "job-2"):
        held, _ = await budgets.reserve("alpha", MINI, config, CENT * 5, job, room=DIME * 4)
        assert held is not None

    # When a third such job asks, and bounded jobs of $0.30 and $0.10
    # Expect the third held (the three at their worst pass the budget, though their estimates
    # fit it), the $0.30 job held too (it would take what the two may still cost: $0.70),
    # the $0.10 one admitted
    with pytest.raises(BudgetHeld):
        await budgets.reserve("alpha", MINI, config, CENT * 5, "job-3", room=DIME * 4)
    with pytest.raises(BudgetHeld):
        await budgets.reserve("alpha", MINI, config, DIME * 3, "job-b")
    small, _ = await budgets.reserve("alpha", MINI, config, DIME, "job-s")
    assert small is not None


async def test_a_ledgers_excess_follows_its_unbounded_reservations_until_each_ends(
    settings: Settings, redis_client: aioredis.Redis, pool: asyncpg.Pool
) -> None:
    # Given a $1 budget and its ledger's sum of what open reservations may cost past them
    keys, month = Keys(settings.redis_prefix), current_month()
    budgets, scripts = _budgets(settings, redis_client, pool), Scripts(redis_client, keys)
    config = TeamConfig(budget_usd=Decimal(1))

    async def excess() -> int:
        ledger = await redis_client.hgetall(keys.spend("alpha", month))
        return int(ledger.get(b"excess", 0))

    # When job a reserves unbounded ($0.05, room $0.45), again bounded, again unbounded, then
    # settles
    steps = []
    for room in (CENT * 45, None, CENT * 35):
        a, _ = await budgets.reserve("alpha", MINI, config, CENT * 5, "a", room=room)
        assert a is not None
        steps.append(await excess())
    await scripts.run(budgets.settle_call(a, CENT * 20))
    steps.append(await excess())
    # ... and job b's unbounded reservation lapses (its worker died), reaped by c's reserve,
    # and job d's, whose claim lapsed, is ended as it holds a job back (its excess kept: its
    # owner may only have stalled), then settled as its owner resumes
    lapsing = Budgets(redis_client, scripts, keys, pool, lease=0, slack=0)
    await lapsing.reserve("alpha", MINI, config, CENT * 5, "b", room=CENT * 45)
    await budgets.reserve("alpha", MINI, config, CENT * 5, "c")
    steps.append(await excess())
    await redis_client.hset(keys.claim("alpha", "d"), mapping={"owner": "w", "lease": 1})
    d, _ = await budgets.reserve("alpha", MINI, config, CENT * 5, "d", room=DIME * 7)
    assert d is not None
    with pytest.raises(BudgetHeld) as caught:
        await budgets.reserve("alpha", MINI, config, CENT * 5, "e", room=DIME * 7)
    assert await budgets.drop_dead(caught.value) == 1
    steps.append(await excess())
    await scripts.run(budgets.settle_call(d, CENT * 5))
    # ... and job f's, whose settle was lost, is reconciled once its usage row is written
    await budgets.reserve("alpha", MINI, config, CENT * 5, "f", room=DIME * 3)
    steps.append(await excess())
    await insert_usage(pool, [UsageEvent(
        job_id="f", team="alpha", model_requested=MINI, status="ok", cost_usd=Decimal("0.2"),
        ts=datetime.now(UTC),
    )])  # fmt: skip
    await reconcile(redis_client, pool, keys, [Scope("alpha")], month, token=reconciler_token())

    # Expect the excess at each step what the open (or ended) reservations may cost past them
    ledger = await redis_client.hgetall(keys.spend("alpha", month))
    assert steps == [CENT * 40, 0, CENT * 30, 0, 0, CENT * 65, CENT * 25]
    assert int(ledger[b"excess"]) == 0
    assert not [field for field in ledger if field.startswith(b"x:")]


async def test_an_unbounded_job_near_a_models_cap_goes_alone_there_too(
    settings: Settings, redis_client: aioredis.Redis, pool: asyncpg.Pool
) -> None:
    # Given a $10 budget with a $0.20 cap on gpt-4o, and a gpt-4o job's reservation open
    budgets = _budgets(settings, redis_client, pool)
    config = TeamConfig(
        budget_usd=Decimal(10), models={"gpt-4o": ModelLimits(budget_usd=Decimal("0.2"))}
    )
    await budgets.reserve("alpha", "gpt-4o", config, CENT, "job-1")

    # When an unbounded gpt-4o job that may cost $0.50 asks for it, expect it held by the
    # cap's ledger (the team's has room), and an unbounded job of another model admitted
    with pytest.raises(BudgetHeld) as caught:
        await budgets.reserve("alpha", "gpt-4o", config, CENT, "job-u", room=CENT * 50)
    assert caught.value.ledger.endswith("gpt-4o")
    other, _ = await budgets.reserve("alpha", MINI, config, CENT, "job-m", room=DOLLAR)
    assert other is not None


@pytest.mark.parametrize(
    ("team", "budget", "served"),
    [("alpha", SMALL_BUDGET, 1), ("beta", SMALL_BUDGET, 1), ("alpha", SEVERAL_BUDGET, 3)],
)
async def test_unbounded_jobs_near_the_edge_overshoot_by_one_jobs_cost_at_most(
    settings: Settings, pool: asyncpg.Pool, team: str, budget: Decimal, served: int
) -> None:
    # Given team alpha (its own broker user) or beta (an API key) with a $0.002 budget, less
    # than one job's real cost, or $0.006, two jobs' and a half, and a provider slow enough
    # that a burst is in flight at once
    slow = MockConfig(models={"gpt-4o-mini": Behavior(latency_ms=LATENCY_MS)})
    async with team_identities(settings) as identities:
        identity = identities[team]
        await set_team_config(pool, team, TeamConfig(budget_usd=budget))
        async with (
            running_gateway(settings, teams=(team,), mock_config=slow) as gw,
            GatewayClient(identity.settings, **identity.who) as client,  # type: ignore[arg-type]
        ):
            # When seven jobs without max_tokens, each billed 16 times its estimate, come at
            # once (their estimates together fit the budget)
            handles = [
                await client.submit(
                    client.job("gpt-4o-mini", MESSAGES, fallbacks=[], reasoning_effort="max")
                )
                for _ in range(7)
            ]
            results = [await handle.result(timeout=WAIT) for handle in handles]
            await gw.usage_rows(7)
            spent = await gw.pool.fetchval("SELECT sum(cost_usd) FROM usage_log")

    # Expect as many served as the budget had room for at their worst, then one alone, the
    # others refused once those settled, and the spend past the budget by one job's cost at
    # most (all seven ran at once before: $0.0172, 8.6 and 2.9 budgets)
    assert sum(r.status == "ok" for r in results) == served
    assert {r.error.code for r in results if r.error} == {"budget_exhausted"}
    assert gw.mock.stats.calls == served
    assert spent <= budget + JOB_USD * Decimal("1.01")


async def test_unbounded_jobs_far_from_the_edge_run_at_once(settings: Settings) -> None:
    # Given a $10 budget, room for hundreds of jobs at their worst
    await register(settings, "alpha", TeamConfig(budget_usd=Decimal(10)))
    slow = MockConfig(models={"gpt-4o-mini": Behavior(latency_ms=LATENCY_MS)})
    async with running_gateway(settings, mock_config=slow) as gw, gw.client("alpha") as client:
        # When six unbounded jobs come at once
        handles = [
            await client.submit(
                client.job("gpt-4o-mini", MESSAGES, fallbacks=[], reasoning_effort="max")
            )
            for _ in range(6)
        ]
        results = [await handle.result(timeout=WAIT) for handle in handles]
        calls = sorted(call.t for call in gw.mock.requests)

    # Expect all served, every call made before the first was answered: none waited
    assert [r.error for r in results] == [None] * 6
    assert len(calls) == 6 and calls[-1] - calls[0] < LATENCY_MS / 1000


async def test_bounded_jobs_near_the_edge_still_run_at_once(settings: Settings) -> None:
    # Given the $0.002 budget, where an unbounded job would go alone
    await register(settings, "alpha", TeamConfig(budget_usd=SMALL_BUDGET))
    slow = MockConfig(models={"gpt-4o-mini": Behavior(latency_ms=LATENCY_MS)})
    async with running_gateway(settings, mock_config=slow) as gw, gw.client("alpha") as client:
        # When six jobs asking for up to 500 tokens come at once ($0.0003 each: together
        # $0.0018, within the budget)
        handles = [
            await client.submit(
                client.job(
                    "gpt-4o-mini", MESSAGES, fallbacks=[], max_tokens=500, reasoning_effort="max"
                )
            )
            for _ in range(6)
        ]
        results = [await handle.result(timeout=WAIT) for handle in handles]
        calls = sorted(call.t for call in gw.mock.requests)

    # Expect all served at once, as before
    assert [r.error for r in results] == [None] * 6
    assert len(calls) == 6 and calls[-1] - calls[0] < LATENCY_MS / 1000


async def test_an_unbounded_job_in_flight_as_its_team_gains_a_budget_counts_at_its_worst(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given team alpha without a budget, and an unbounded job of its in the provider's call
    await register(settings, "alpha", TeamConfig())
    slow = MockConfig(models={MINI: Behavior(latency_ms=3000)})
    async with running_gateway(settings, mock_config=slow) as gw, gw.client("alpha") as client:
        job = client.job(MINI, MESSAGES, fallbacks=[], reasoning_effort="max")
        handle = await client.submit(job)
        await wait_until(lambda: gw.mock.arrived == 1)

        # When a budget is set, in force once every worker reserved its jobs in flight
        change = await configure(settings, "alpha", {"budget_usd": 1})
        assert (await in_force(settings, change.change, 5)).pending == []

        # Expect its reservation in the new ledger with what it may cost past it, as a job
        # admitted under the budget holds, so the jobs admitted beside it count it
        ledger = await redis_client.hgetall(
            Keys(settings.redis_prefix).spend("alpha", current_month())
        )
        past = int(ledger[f"x:{job.job_id}".encode()])
        assert past == int(ledger[b"excess"]) > 10 * int(ledger[f"r:{job.job_id}".encode()])
        assert (await handle.result(timeout=WAIT)).status == "ok"
