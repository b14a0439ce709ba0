"""Redis failing over under load, through Sentinel: a primary, a replica, three Sentinels.

Jobs flow producer -> two worker processes -> mock provider -> accounting while the primary
is failed over (``SENTINEL FAILOVER``), killed, or killed while its replica is seconds behind
(what the primary took meanwhile is lost with it). Then the run is published again, as a
pipeline does after a crash. Counted: no job answered twice to a caller (a second, different
answer), no provider call beyond one per answered job, no usage row counted twice, and how far
the team's budget was overshot, against what the failover could have lost of its ledger.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest

from mockprovider import Behavior, MockConfig, MockProvider
from producer import GatewayClient
from queuegate.db import create_pool
from queuegate.messages import ChatJob, ChatResult
from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from queuegate.spend import NANO, current_month, month_spend
from router import load_catalog
from tests.chaos.harness import (
    Figures,
    collect,
    dead_lettered,
    declare_teams,
    start_worker,
    stop_workers,
    submit_jobs,
    usage_rows,
    worker_env,
)
from tests.chaos.private_sentinel import PrivateSentinels
from tests.support import running_accountant
from tests.teams import register
from workers.admission.estimate import estimate

JOBS = 400
WORKERS = 2
PREFETCH = 20
LATENCY_MS = 300
EXPECTED_OUTPUT = 8
"""Output tokens a job reserves, its max_tokens: a little more than the mock answers, so that
a reservation covers what its job costs (without it, a job could cost far more, and near the
budget's edge, all of this run, would be admitted only alone)."""
BUDGET_JOBS = 200
"""The team's budget in reservations: about three quarters of the run is served."""
FAULT_AFTER = 250
"""Provider calls before the fault: the budget is then close to spent, so that what a
failover loses of its ledger can show as overshoot."""
BEHIND = 2.0
"""Seconds the replica is paused before the primary is killed, in the lagging scenario."""


@dataclass
class FailoverFigures(Figures):
    refused: int = 0
    """Jobs answered ``budget_exhausted``."""
    differing: int = 0
    """Jobs whose answer in the run published again differs from their first."""
    answered_again: int = 0
    """Jobs of the second run answered with their stored outcome."""
    outcomes_lost: int = 0
    """Jobs of the second run refused ``already_answered``: the new primary never received
    their stored outcome, usage_log holds them."""
    double_counted: int = 0
    failovers: int = 0
    """As the Sentinels count them: more than one when they also failed a busy node over."""
    promotion_s: float = 0.0
    """Seconds from the fault until every Sentinel named the new primary."""
    budget_usd: str = ""
    overshoot_usd: str = ""
    """What usage_log holds of the team's spend once every job is accounted, past its budget."""
    overshoot_bound_usd: str = ""
    """The jobs that could have been admitted in the writes the failovers lost (those whose
    outcomes were lost, and those in flight as each failover struck) at the dearest job's cost."""


Fault = Callable[[PrivateSentinels], Awaitable[object]]


async def _failover(group: PrivateSentinels) -> None:
    await group.failover()


async def _kill(group: PrivateSentinels) -> None:
    await group.kill_primary()


async def _kill_behind(group: PrivateSentinels) -> None:
    await group.kill_primary(replica_behind=BEHIND)


FAULTS: dict[str, Fault] = {
    "sentinel failover": _failover,
    "primary SIGKILL": _kill,
    "primary SIGKILL, replica 2 s behind": _kill_behind,
}


@pytest.mark.parametrize("fault", list(FAULTS))
async def test_a_redis_failover_mid_run_answers_each_job_once_and_counts_it_once(
    settings: Settings, tmp_path: Path, fault: str
) -> None:
    figures = FailoverFigures(f"Redis {fault}")
    async with PrivateSentinels(tmp_path) as group:
        # Given Redis behind Sentinel, two workers, accounting reconciling budgets often,
        # and team alpha with a budget most of the run fits in, and buckets to take from
        s = group.settings(settings).model_copy(update={"spend_reconcile_interval": 0.2})
        first, second = GatewayClient(s, team="alpha"), GatewayClient(s, team="alpha")
        jobs = [_job(first, i) for i in range(JOBS)]
        budget = _reservation(jobs[0]) * BUDGET_JOBS
        team = TeamConfig(budget_usd=budget, rpm=10**6, expected_output_tokens=EXPECTED_OUTPUT)
        await register(s, "alpha", team)
        async with MockProvider(MockConfig(default=Behavior(latency_ms=LATENCY_MS))) as mock:
            await declare_teams(s, ("alpha",))
            env = worker_env(
                s,
                mock,
                QUEUEGATE_PREFETCH=str(PREFETCH),
                QUEUEGATE_REDIS_SENTINELS=s.redis_sentinels,
                QUEUEGATE_REDIS_MASTER_NAME=s.redis_master_name,
            )
            workers = [await start_worker(env, ("alpha",)) for _ in range(WORKERS)]
            pool = await create_pool(s)
            try:
                async with running_accountant(s), first, second:
                    # When the primary fails over mid-run
                    submitting = asyncio.create_task(submit_jobs(first, jobs))
                    async with asyncio.timeout(60):
                        await mock.wait_for_calls(FAULT_AFTER)
                    started = time.monotonic()
                    await FAULTS[fault](group)
                    figures.promotion_s = round(time.monotonic() - started, 1)
                    answers = await collect(await submitting, timeout=120)
                    rows, distinct = await usage_rows(pool, len(answers), timeout=60)
                    # ... and, once every answer is accounted, the run is published again
                    again = await collect(await submit_jobs(second, jobs), timeout=120)
                    figures.failovers = await group.failovers()
            finally:
                await stop_workers(workers)
            spent = await month_spend(pool, "alpha", current_month())
            dearest = await pool.fetchval("SELECT max(cost_usd) FROM usage_log")
            await pool.close()
            calls = mock.stats.calls
        figures.dead_lettered = await dead_lettered(s)

    firsts = {r.job_id: r for r in answers}
    figures.sent = JOBS
    figures.answered = len(firsts)
    figures.refused = sum(_code(r) == "budget_exhausted" for r in answers)
    figures.duplicates = first.duplicates + second.duplicates
    figures.answered_again = sum(_answer(r) == _answer(firsts[r.job_id]) for r in again)
    figures.outcomes_lost = sum(_code(r) == "already_answered" for r in again)
    figures.differing = JOBS - figures.answered_again - figures.outcomes_lost
    figures.usage_rows, figures.double_counted = rows, rows - distinct
    figures.provider_calls = calls
    overshoot = max(Decimal(0), spent - budget)
    in_flight = figures.failovers * WORKERS * PREFETCH
    bound = (figures.outcomes_lost + in_flight) * dearest
    figures.budget_usd = f"{budget:.6f}"
    figures.overshoot_usd, figures.overshoot_bound_usd = f"{overshoot:.6f}", f"{bound:.6f}"
    figures.done()

    # Expect every job answered once at its caller, and never answered anew when the run is
    # published again: with its stored outcome, or refused as answered before when the new
    # primary never received it
    assert figures.answered == JOBS
    assert figures.duplicates == figures.differing == figures.dead_lettered == 0
    # ... one provider call per job served, every job's usage counted once
    assert calls == sum(r.status == "ok" for r in answers)
    assert figures.double_counted == 0
    # ... and the budget overshot by no more than the jobs the lost writes could have held
    assert overshoot <= bound


def _job(client: GatewayClient, i: int) -> ChatJob:
    """A small job on gpt-4o-mini alone, so that what it reserves is what it could cost."""
    return client.job(
        "gpt-4o-mini",
        [{"role": "user", "content": f"job {i}"}],
        fallbacks=[],
        max_tokens=EXPECTED_OUTPUT,
    )


def _reservation(job: ChatJob) -> Decimal:
    """What a job of the run reserves of its budget, USD."""
    catalog = load_catalog(None, {"QUEUEGATE_MOCK_URL": "http://127.0.0.1:1"})
    return Decimal(estimate(job, catalog, TeamConfig(), EXPECTED_OUTPUT).cost_nano) / NANO


def _code(result: ChatResult) -> str | None:
    return result.error.code if result.error is not None else None


def _answer(result: ChatResult) -> tuple[str, str | None, str | None]:
    """What a caller reads of a result: its status, text, error."""
    return result.status, result.content, _code(result)
