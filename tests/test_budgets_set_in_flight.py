"""A budget set on a team that had none while its jobs are in the provider's call: those
jobs, admitted reserving nothing, count against it from the moment ``teams set`` says it is
in force, so the jobs submitted then are refused once the spend cannot take them. For a team
added the default way (its own broker user) and one with an API key."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path

import pytest

from admin.status import registered
from admin.teams import configure, in_force
from mockprovider import Behavior, MockConfig
from producer import GatewayClient
from queuegate.keys import Keys
from queuegate.redis_client import redis_for
from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from queuegate.spend import current_month, from_nano
from queuegate.status import StatusReader
from router import load_catalog
from tests.support import PRICED, PRICED_OUTPUT, priced_catalog, running_gateway, wait_until
from tests.teams import team_identities
from workers.admission.estimate import estimate

SETTLED_JOBS = 2
IN_FLIGHT_JOBS = 6
JOB_COST = Decimal("0.013")
SLOW = MockConfig(default=Behavior(latency_ms=4000))
"""Calls long enough for the budget's set and the next jobs' admissions to happen during
them."""


@pytest.mark.parametrize("team", ["alpha", "beta"])
async def test_a_budget_set_while_unbudgeted_jobs_are_in_flight_counts_them(
    settings: Settings, tmp_path: Path, team: str
) -> None:
    catalog = priced_catalog(tmp_path)
    async with team_identities(settings) as identities:
        identity = identities[team]
        async with (
            running_gateway(settings, teams=(team,), catalog=catalog, mock_config=SLOW) as gw,
            GatewayClient(identity.settings, **identity.who) as client,  # type: ignore[arg-type]
        ):
            # Given a team without a budget, 2 of its jobs settled and written, 6 more in the
            # provider's call
            settled = [
                await client.submit(client.job("priced", PRICED, max_tokens=PRICED_OUTPUT))
                for _ in range(SETTLED_JOBS)
            ]
            assert all([(await h.result(timeout=30)).status == "ok" for h in settled])
            await gw.usage_rows(SETTLED_JOBS)
            in_flight = [
                await client.submit(client.job("priced", PRICED, max_tokens=PRICED_OUTPUT))
                for _ in range(IN_FLIGHT_JOBS)
            ]
            await wait_until(lambda: gw.mock.arrived == SETTLED_JOBS + IN_FLIGHT_JOBS)

            # When a budget is set that the settled spend leaves room for one more job in,
            # but not with the jobs in flight
            job = client.job("priced", PRICED, max_tokens=PRICED_OUTPUT)
            env = {"QUEUEGATE_MOCK_URL": gw.mock.url}
            needed = from_nano(estimate(job, load_catalog(catalog, env), TeamConfig(), 0).cost_nano)
            assert needed < IN_FLIGHT_JOBS * JOB_COST
            change = await configure(
                settings, team, {"budget_usd": SETTLED_JOBS * JOB_COST + needed}
            )
            assert (await in_force(settings, change.change, 5)).pending == []
            arrived = gw.mock.arrived
            assert arrived == SETTLED_JOBS + IN_FLIGHT_JOBS  # still in their calls

            # Expect the jobs submitted then refused for the budget, the provider not called
            after = await asyncio.gather(
                *(
                    client.chat("priced", PRICED, max_tokens=PRICED_OUTPUT, timeout=30)
                    for _ in range(3)
                )
            )
            assert [r.error.code if r.error else r.status for r in after] == [
                "budget_exhausted"
            ] * 3
            assert gw.mock.arrived == arrived

            # and, everything settled and written, the month's spend what usage_log holds, no
            # reservation left in the ledger
            for handle in in_flight:
                await handle.result(timeout=30)
            await gw.usage_rows(SETTLED_JOBS + IN_FLIGHT_JOBS)
            await gw.stop_worker()
            rows = await gw.pool.fetch("SELECT cost_usd FROM usage_log WHERE team = $1", team)
            registry = await registered(gw.pool, settings)
            async with StatusReader(settings) as reader:
                status = await reader.read([team], registry.budgets, stale=registry.unread)
            [shown] = status.teams
            assert shown.spend_usd == sum(row["cost_usd"] for row in rows)
            redis = redis_for(settings)
            try:
                ledger = Keys(settings.redis_prefix).spend(team, current_month(), None)
                assert int(await redis.hget(ledger, "reserved") or 0) == 0
                assert [f async for f in redis.hscan_iter(ledger, match="r:*")] == []
            finally:
                await redis.aclose()
