"""A team's budget unset, its spend going on, then a budget set again: the spend ledger the
first budget left in Redis, kept by nothing meanwhile, is believed by neither ``queuegate
status`` nor admission. For a team added the default way (its own broker user) and one with
an API key."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import NamedTuple

import pytest

from admin.status import registered
from admin.teams import configure, in_force
from producer import GatewayClient
from queuegate.keys import Keys
from queuegate.redis_client import redis_for
from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from queuegate.spend import current_month, from_nano, ledger_spent
from queuegate.status import StatusReader
from router import load_catalog
from tests.support import PRICED, PRICED_OUTPUT, Gateway, priced_catalog, running_gateway
from tests.teams import team_identities
from workers.admission.estimate import estimate

BUDGETED_JOBS = 3
UNBUDGETED_JOBS = 10
JOB_COST = Decimal("0.013")


class Spent(NamedTuple):
    gw: Gateway
    client: GatewayClient
    stale: Decimal
    """What the ledger the first budget left counts: its jobs alone."""


@asynccontextmanager
async def spent_over_an_unset_budget(
    settings: Settings, team: str, catalog: Path
) -> AsyncIterator[Spent]:
    """``team`` served under a $1 budget for ``BUDGETED_JOBS`` jobs, then, its budget unset,
    for ``UNBUDGETED_JOBS`` more, each job $0.013 and written by accounting."""
    async with team_identities(settings) as identities:
        identity = identities[team]
        await configure(settings, team, {"budget_usd": Decimal(1)})
        async with (
            running_gateway(settings, teams=(team,), catalog=catalog) as gw,
            GatewayClient(identity.settings, **identity.who) as client,  # type: ignore[arg-type]
        ):
            await _served(client, BUDGETED_JOBS)
            unset = await configure(settings, team, {"budget_usd": None})
            assert (await in_force(settings, unset.change, 5)).pending == []
            await _served(client, UNBUDGETED_JOBS)
            await gw.usage_rows(BUDGETED_JOBS + UNBUDGETED_JOBS)
            stale = await _ledger(settings, team)
            assert stale == BUDGETED_JOBS * JOB_COST
            yield Spent(gw, client, stale)


async def _served(client: GatewayClient, jobs: int) -> None:
    for _ in range(jobs):
        result = await client.chat("priced", PRICED, max_tokens=PRICED_OUTPUT, timeout=10)
        assert result.status == "ok", result.error


async def _ledger(settings: Settings, team: str) -> Decimal | None:
    client = redis_for(settings)
    try:
        return await ledger_spent(client, Keys(settings.redis_prefix), team, current_month())
    finally:
        await client.aclose()


@pytest.mark.parametrize("team", ["alpha", "beta"])
async def test_status_spend_of_a_team_whose_budget_was_unset_is_usage_logs_sum(
    settings: Settings, tmp_path: Path, team: str
) -> None:
    # Given a team whose budget was unset after 3 jobs, 10 more served since, all written
    async with spent_over_an_unset_budget(settings, team, priced_catalog(tmp_path)) as spent:
        # (the worker stopped: its live stats are all written)
        await spent.gw.stop_worker()
        rows = await spent.gw.pool.fetch("SELECT cost_usd FROM usage_log WHERE team = $1", team)

        # When the status is read as `queuegate status` and the Live page read it
        registry = await registered(spent.gw.pool, settings)
        async with StatusReader(settings) as reader:
            status = await reader.read([team], registry.budgets, stale=registry.unread)

    # Expect the month's spend, usage_log's sum, not the ledger the budget left behind
    [shown] = status.teams
    assert shown.budget_usd is None
    assert shown.spend_usd == sum(row["cost_usd"] for row in rows) == 13 * JOB_COST
    assert shown.spend_usd != spent.stale


@pytest.mark.parametrize("team", ["alpha", "beta"])
async def test_a_budget_set_again_over_the_stale_ledger_but_under_the_spend_refuses_jobs(
    settings: Settings, tmp_path: Path, team: str
) -> None:
    # Given a team whose budget was unset after 3 jobs, 10 more served since, all written
    catalog = priced_catalog(tmp_path)
    async with spent_over_an_unset_budget(settings, team, catalog) as (gw, client, stale):
        # When an operator sets a budget that the stale ledger leaves room for one more job
        # in, but the month's spend does not
        job = client.job("priced", PRICED, max_tokens=PRICED_OUTPUT)
        env = {"QUEUEGATE_MOCK_URL": gw.mock.url}
        needed = estimate(job, load_catalog(catalog, env), TeamConfig(), 0).cost_nano
        budget = stale + from_nano(needed)
        assert budget < (BUDGETED_JOBS + UNBUDGETED_JOBS) * JOB_COST
        again = await configure(settings, team, {"budget_usd": budget})
        assert (await in_force(settings, again.change, 5)).pending == []
        calls = gw.mock.stats.calls

        # Expect its jobs refused for the budget, the provider not called
        results = [
            await client.chat("priced", PRICED, max_tokens=PRICED_OUTPUT, timeout=10)
            for _ in range(3)
        ]
        assert [r.error.code if r.error else r.status for r in results] == ["budget_exhausted"] * 3
        assert gw.mock.stats.calls == calls
