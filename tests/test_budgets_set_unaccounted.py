"""A budget (or a model cap) set on a team that had none while accounting is down: the jobs
its workers settled meanwhile, which usage_log does not hold yet, count against it from the
moment ``teams set`` says it is in force, not from when accounting writes them. For a team
added the default way (its own broker user) and one with an API key."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from admin.teams import configure, in_force
from producer import GatewayClient
from queuegate.keys import Keys
from queuegate.redis_client import redis_for
from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from queuegate.spend import current_month, from_nano, ledger_spent
from router import load_catalog
from tests.support import PRICED, PRICED_OUTPUT, priced_catalog, running_gateway
from tests.teams import team_identities
from workers.admission.estimate import estimate

SETTLED_JOBS = 4
JOB_COST = Decimal("0.013")


@pytest.mark.parametrize("scope", ["budget", "cap"])
@pytest.mark.parametrize("team", ["alpha", "beta"])
async def test_a_budget_set_while_accounting_is_down_counts_the_jobs_it_has_not_written(
    settings: Settings, tmp_path: Path, team: str, scope: str
) -> None:
    catalog = priced_catalog(tmp_path)
    async with (
        team_identities(settings) as identities,
        running_gateway(settings, teams=(team,), catalog=catalog, accounting=False) as gw,
    ):
        identity = identities[team]
        async with GatewayClient(identity.settings, **identity.who) as client:  # type: ignore[arg-type]
            # Given a team without a budget, 4 of its jobs settled that accounting (down) has
            # not written: usage_log holds nothing of the team
            for _ in range(SETTLED_JOBS):
                result = await client.chat("priced", PRICED, max_tokens=PRICED_OUTPUT, timeout=10)
                assert result.status == "ok", result.error
            written = await gw.pool.fetchval("SELECT count(*) FROM usage_log WHERE team = $1", team)
            assert written == 0

            # When a budget (or a cap on the model) is set that usage_log's spend leaves room
            # for one more job in, but not the jobs settled
            job = client.job("priced", PRICED, max_tokens=PRICED_OUTPUT)
            env = {"QUEUEGATE_MOCK_URL": gw.mock.url}
            needed = from_nano(estimate(job, load_catalog(catalog, env), TeamConfig(), 0).cost_nano)
            assert needed < SETTLED_JOBS * JOB_COST
            limit: dict[str, Any] = {"budget_usd": needed}
            change = await configure(
                settings, team, limit if scope == "budget" else {"models": {"priced": limit}}
            )
            assert (await in_force(settings, change.change, 5)).pending == []
            calls = gw.mock.stats.calls

            # Expect the ledger to count the jobs settled, and the next job refused for the
            # budget, the provider not called
            redis = redis_for(settings)
            try:
                model = None if scope == "budget" else "priced"
                month = current_month()
                spent = await ledger_spent(
                    redis, Keys(settings.redis_prefix), team, month, model=model
                )
            finally:
                await redis.aclose()
            assert spent == SETTLED_JOBS * JOB_COST
            result = await client.chat("priced", PRICED, max_tokens=PRICED_OUTPUT, timeout=10)
            assert result.error is not None and result.error.code == "budget_exhausted"
            assert gw.mock.stats.calls == calls
