"""A team whose budget is spent is refused by the front door itself: 402 before anything is
published, at no cost to the broker, the workers or any other team."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal

import anthropic
import asyncpg
import httpx
import openai
import pytest
import redis.asyncio as aioredis

from accounting.store import insert_usage
from admin.teams import configure
from frontdoor.budgets import BudgetGate, Fresh
from frontdoor.serve import serving
from queuegate.errors import BudgetExhausted
from queuegate.keys import Keys
from queuegate.messages import ChatJob, UsageEvent
from queuegate.registry import ModelLimits, TeamConfig
from queuegate.settings import Settings
from queuegate.spend import NANO, Scope, current_month, reconcile, reconciler_token
from router import load_catalog
from tests.frontdoor_support import HELLO, Door, issue_key
from tests.support import running_gateway
from tests.teams import register
from workers.admission.budgets import Budgets
from workers.admission.estimate import estimate
from workers.admission.scripts import Scripts


@pytest.fixture
async def door(settings: Settings, redis_client: aioredis.Redis) -> AsyncIterator[Door]:
    """Alpha with $0.01 a month, $0.02 spent (its ledger reconciled as accounting does), and
    beta; workers serve beta only, so an alpha job published would wait unanswered."""
    teams = {"alpha": TeamConfig(budget_usd=Decimal("0.01")), "beta": TeamConfig()}
    keys, key_ids = {}, {}
    for team, config in teams.items():
        await register(settings, team, config)
        key_ids[team], keys[team] = await issue_key(settings, team)
    async with running_gateway(settings, teams=["beta"]) as gateway:
        spent = UsageEvent(
            job_id="spent", team="alpha", model_requested="gpt-4o-mini", status="ok",
            cost_usd=Decimal("0.02"), ts=datetime.now(UTC),
        )  # fmt: skip
        await insert_usage(gateway.pool, [spent])
        month, scope = current_month(), Scope("alpha")
        prefix = Keys(settings.redis_prefix)
        token = reconciler_token()
        assert await reconcile(redis_client, gateway.pool, prefix, [scope], month, token=token)
        catalog = load_catalog(None, {"QUEUEGATE_MOCK_URL": gateway.mock.url})
        async with serving(settings, catalog) as url:
            yield Door(gateway, url, keys, key_ids)


async def test_a_spent_team_is_refused_before_anything_is_published(door: Door) -> None:
    async with door.client(timeout=20) as alpha, asyncio.timeout(20):
        # When alpha floods the front door, over both APIs, streamed, async and not
        async def ask(n: int) -> openai.APIStatusError:
            with pytest.raises(openai.APIStatusError) as refused:
                await alpha.chat.completions.create(
                    model="gpt-4o-mini", messages=HELLO, stream=n % 2 == 0
                )
            return refused.value

        refusals = await asyncio.gather(*(ask(n) for n in range(60)))
        messages = anthropic.AsyncAnthropic(
            base_url=door.url, api_key=door.keys["alpha"], max_retries=0
        )
        async with messages:
            with pytest.raises(anthropic.APIStatusError) as billing:
                await messages.messages.create(model="claude-haiku", max_tokens=10, messages=HELLO)
        async with httpx.AsyncClient(base_url=door.url) as http:
            later = await http.post(
                "/v1/chat/completions",
                json={"model": "gpt-4o-mini", "messages": HELLO},
                headers={
                    "Authorization": f"Bearer {door.keys['alpha']}",
                    "Prefer": "respond-async",
                },
            )
        # and beta asks meanwhile
        async with door.client("beta") as beta:
            answer = await beta.chat.completions.create(model="gpt-4o-mini", messages=HELLO)

    # Expect every alpha request 402 budget_exhausted in its API's shape, none published (no
    # worker serves alpha: a published one would have waited), beta served
    assert {(r.status_code, r.code) for r in refusals} == {(402, "budget_exhausted")}
    assert "raise the budget" in refusals[0].message
    assert billing.value.status_code == 402
    assert isinstance(billing.value.body, dict)
    assert billing.value.body["error"]["type"] == "billing_error"
    assert later.status_code == 402, later.text
    assert answer.choices[0].message.content
    # and nothing accounted for them: only the spend already there, and beta's job
    rows = await door.gateway.usage_rows(2)
    assert sorted((row["team"], row["job_id"] == "spent") for row in rows) == [
        ("alpha", True),
        ("beta", False),
    ]
    assert door.gateway.mock.stats.calls == 1


async def test_the_gate_reads_each_ledger_a_job_is_held_to(
    settings: Settings, redis_client: aioredis.Redis, pool: asyncpg.Pool
) -> None:
    # Given alpha with $1 a month and a $0.001 cap on claude-haiku, $0.002 of which is spent
    # (its ledgers reconciled as accounting does)
    config = TeamConfig(
        budget_usd=Decimal(1), models={"claude-haiku": ModelLimits(budget_usd=Decimal("0.001"))}
    )
    await register(settings, "alpha", config)
    spent = UsageEvent(
        job_id="spent", team="alpha", model_requested="claude-haiku", status="ok",
        cost_usd=Decimal("0.002"), ts=datetime.now(UTC),
    )  # fmt: skip
    await insert_usage(pool, [spent])
    keys, month = Keys(settings.redis_prefix), current_month()
    scopes = [Scope("alpha"), Scope("alpha", "claude-haiku")]
    assert await reconcile(redis_client, pool, keys, scopes, month, token=reconciler_token())
    catalog = load_catalog(None, {"QUEUEGATE_MOCK_URL": "http://127.0.0.1:9"})
    gate = BudgetGate(pool, redis_client, keys, catalog, settings)

    def job(model: str) -> ChatJob:
        return ChatJob(
            job_id=model, team="alpha", model=model, messages=[{"role": "user", "content": "hi"}]
        )

    # When jobs of the capped model and of two others ask, the capped one twice
    with pytest.raises(BudgetExhausted) as capped:
        await gate.refuse_spent("alpha", job("claude-haiku"))
    for model in ("gpt-4o-mini", "local-llama"):
        await gate.refuse_spent("alpha", job(model))
    with pytest.raises(BudgetExhausted):
        await gate.refuse_spent("alpha", job("claude-haiku"))

    # Expect the capped model refused on its cap, the others let through on the team's budget
    assert "claude-haiku" in str(capped.value)


async def test_the_refusal_shows_sums_of_a_tiny_budget_in_full(
    settings: Settings, redis_client: aioredis.Redis, pool: asyncpg.Pool
) -> None:
    # Given alpha with a $0.00005 budget, $0.000042 of it spent (reconciled as accounting does)
    config = TeamConfig(budget_usd=Decimal("0.00005"))
    await register(settings, "alpha", config)
    spent = UsageEvent(
        job_id="spent", team="alpha", model_requested="gpt-4o-mini", status="ok",
        cost_usd=Decimal("0.000042"), ts=datetime.now(UTC),
    )  # fmt: skip
    await insert_usage(pool, [spent])
    keys, month = Keys(settings.redis_prefix), current_month()
    assert await reconcile(
        redis_client, pool, keys, [Scope("alpha")], month, token=reconciler_token()
    )
    catalog = load_catalog(None, {"QUEUEGATE_MOCK_URL": "http://127.0.0.1:9"})
    gate = BudgetGate(pool, redis_client, keys, catalog, settings)

    # When a job asks for more than the $0.000008 left
    job = ChatJob(
        job_id="j", team="alpha", model="gpt-4o-mini", messages=HELLO, params={"max_tokens": 20}
    )
    with pytest.raises(BudgetExhausted) as refused:
        await gate.refuse_spent("alpha", job)

    # Expect each sum in the 402's message as it is, in plain notation: none rounded away
    message = str(refused.value)
    assert "has spent $0.000042 of its monthly budget ($0.00005)" in message
    needed = estimate(job, catalog, config, settings.expected_output_tokens).cost_nano
    shown = re.search(r"needs about \$([0-9.]+):", message)
    assert shown is not None and Decimal(shown[1]) == Decimal(needed) / NANO


async def test_a_job_only_other_jobs_reservations_keep_out_is_not_refused_at_the_door(
    settings: Settings, redis_client: aioredis.Redis, pool: asyncpg.Pool
) -> None:
    # Given alpha with a $0.001 budget held whole by the reservation of a job in flight
    config = TeamConfig(budget_usd=Decimal("0.001"))
    await register(settings, "alpha", config)
    keys = Keys(settings.redis_prefix)
    budgets = Budgets(redis_client, Scripts(redis_client, keys), keys, pool, lease=60, slack=60)
    flying, _ = await budgets.reserve("alpha", "gpt-4o-mini", config, int(NANO) // 1000, "flying")
    assert flying is not None
    catalog = load_catalog(None, {"QUEUEGATE_MOCK_URL": "http://127.0.0.1:9"})
    gate = BudgetGate(pool, redis_client, keys, catalog, settings)

    # When a job the settled spend (nothing) takes asks
    job = ChatJob(
        job_id="j", team="alpha", model="gpt-4o-mini", messages=HELLO, params={"max_tokens": 20}
    )

    # Expect it let through: a worker holds it until that reservation settles, as the door
    # cannot know whether it will fit then
    await gate.refuse_spent("alpha", job)


async def test_fresh_values_hold_only_what_was_read_within_their_ttl() -> None:
    # Given values kept 1 s, read by a counting reader, on a clock the test moves
    now = [0.0]
    reads: list[int] = []

    async def read(key: int) -> int:
        reads.append(key)
        return key * 2

    fresh: Fresh[int, int] = Fresh(1.0, read, clock=lambda: now[0])

    # When 1,000 keys are read, one of them again within the second, then one more later
    assert [await fresh.get(k) for k in range(1000)] == [2 * k for k in range(1000)]
    now[0] = 0.5
    assert await fresh.get(7) == 14
    now[0] = 1.6
    assert await fresh.get(1000) == 2000

    # Expect the repeat answered from what was kept, and the values read over a second
    # before the last one dropped, not kept for ever
    assert len(reads) == 1001
    assert len(fresh) == 1


async def _lowered_under_the_spend(
    settings: Settings, pool: asyncpg.Pool, budget: Decimal | None
) -> None:
    """Alpha with ``budget`` and $0.02 spent, its budget set to $0.01, then asked at once: a
    402 from the front door itself, nothing published, so no usage row for it (a worker's
    refusal is a 402 too, with a row)."""
    await register(settings, "alpha", TeamConfig(budget_usd=budget))
    _, key = await issue_key(settings, "alpha")
    spent = UsageEvent(
        job_id="spent", team="alpha", model_requested="gpt-4o-mini", status="ok",
        cost_usd=Decimal("0.02"), ts=datetime.now(UTC),
    )  # fmt: skip
    await insert_usage(pool, [spent])
    # The worker's and the front door's copies of the registry are not read again for ten
    # minutes: what a `teams set` changes reaches them at once only if they are told.
    slow = settings.model_copy(update={"teams_refresh": 600.0})
    async with running_gateway(slow) as gateway:
        catalog = load_catalog(None, {"QUEUEGATE_MOCK_URL": gateway.mock.url})
        async with serving(slow, catalog) as url:
            door = Door(gateway, url, {"alpha": key}, {})
            async with door.client(timeout=20) as alpha:
                # Given alpha served under its old budget, the front door's copy of it read
                first = await alpha.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
                assert first.choices[0].message.content

                # When an operator lowers the budget under the spend, and alpha asks at once
                await configure(settings, "alpha", {"budget_usd": Decimal("0.01")})
                refused, late = await _refused_once_heard(alpha)
                # (then, the budget raised again, a job served: the refused one's row, had it
                # been published, would be written by then)
                await configure(settings, "alpha", {"budget_usd": Decimal(500)})
                await _served_once_heard(alpha)

        # Expect the refusal 402, and nothing but the spend and the two served jobs accounted
        # (and a row for each request a worker refused before the door heard)
        assert (refused.status_code, refused.code) == (402, "budget_exhausted")
        rows = await gateway.usage_rows(3 + late)
        assert sorted(row["status"] for row in rows) == ["error"] * late + ["ok"] * 3
        assert gateway.mock.stats.calls == 2


async def _refused_once_heard(client: openai.AsyncOpenAI) -> tuple[openai.APIStatusError, int]:
    """The front door's own refusal of a request, once it has heard of a budget lowered, and
    how many requests a worker refused before (with a usage row each). The door hears by
    PostgreSQL's NOTIFY, a moment after the change commits: on a loaded machine a request
    sent within it is published, and a worker, told already, refuses it (its answer names
    the job; the door's, publishing nothing, names none)."""
    late = 0
    async with asyncio.timeout(10):
        while True:
            try:
                await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
            except openai.APIStatusError as refused:
                if "x-queuegate-job-id" not in refused.response.headers:
                    return refused, late
                late += 1
            else:
                raise AssertionError("served under a budget lowered under its spend")


async def _served_once_heard(client: openai.AsyncOpenAI) -> None:
    """A job served once the front door has heard of a raised budget. It hears by
    PostgreSQL's NOTIFY, sent as the change commits and read a moment later: a request sent
    within that moment, on a loaded machine, is still refused at the door by the budget
    before (and published by none)."""
    async with asyncio.timeout(10):
        while True:
            try:
                await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
                return
            except openai.APIStatusError as refused:
                if refused.status_code != 402:
                    raise
            await asyncio.sleep(0.05)


async def test_a_budget_lowered_under_the_spend_is_refused_at_the_door_at_once(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    await _lowered_under_the_spend(settings, pool, Decimal(500))


async def test_a_first_budget_under_the_spend_is_refused_at_the_door_at_once(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    # A team that had no budget has no spend ledger in Redis (a worker's first reserve makes
    # it): the door must not take a missing ledger for nothing spent
    await _lowered_under_the_spend(settings, pool, None)


async def test_a_forgotten_value_is_read_again_even_while_its_read_was_under_way() -> None:
    # Given values kept a minute, one read under way when the value is forgotten (a team's
    # config read as `teams set` commits)
    started, release = asyncio.Event(), asyncio.Event()
    reads: list[str] = []

    async def read(key: str) -> int:
        reads.append(key)
        started.set()
        await release.wait()
        return len(reads)

    fresh: Fresh[str, int] = Fresh(60.0, read)
    under_way = asyncio.create_task(fresh.get("alpha"))
    await started.wait()

    # When it is forgotten, then the read ends and the value is asked for again
    fresh.forget("alpha")
    release.set()
    assert await under_way == 1
    again = await fresh.get("alpha")

    # Expect it read again, not the answer of the read that began before it changed
    assert (again, reads) == (2, ["alpha", "alpha"])
