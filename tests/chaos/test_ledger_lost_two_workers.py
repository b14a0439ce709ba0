"""A budget ledger Redis lost while accounting is down, with two worker processes serving the
team: the ledger made again holds its reserves back until the other worker has put back the
jobs it settled, so no job is called past the budget. For a team added the default way (its
own broker user) and one with an API key."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from admin.teams import configure
from mockprovider import MockConfig, MockProvider
from producer import GatewayClient
from queuegate.keys import Keys
from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from queuegate.spend import current_month, from_nano
from router import load_catalog
from tests.chaos.harness import start_worker, stop_workers, worker_env
from tests.support import PRICED, PRICED_OUTPUT, consumers, priced_catalog
from tests.teams import team_identities
from workers.admission.estimate import estimate

JOB_COST = Decimal("0.013")
"""What a job of ``PRICED`` costs (tests.support)."""
ADMITTED = 6
"""Jobs the budget admits one after the other: the last leaves it no room for another."""


@pytest.mark.parametrize("team", ["alpha", "beta"])
async def test_a_ledger_lost_with_two_workers_calls_no_job_past_the_budget(
    settings: Settings, redis_client: aioredis.Redis, tmp_path: Path, team: str
) -> None:
    catalog = priced_catalog(tmp_path)
    async with (
        team_identities(settings) as identities,
        MockProvider(MockConfig()) as mock,
    ):
        # Given a team whose budget admits 6 jobs one after the other, not a 7th
        job_env = {"QUEUEGATE_MOCK_URL": mock.url}
        identity = identities[team]
        # (a job built, not sent: no worker runs yet)
        job = GatewayClient(identity.settings, **identity.who).job(  # type: ignore[arg-type]
            "priced", PRICED, max_tokens=PRICED_OUTPUT
        )
        needed = from_nano(estimate(job, load_catalog(catalog, job_env), TeamConfig(), 0).cost_nano)
        budget = needed + (ADMITTED - 1) * JOB_COST
        await configure(settings, team, {"budget_usd": budget})
        # ... served by two worker processes, accounting not running
        env = worker_env(settings, mock, QUEUEGATE_CATALOG=str(catalog))
        logs = tmp_path / "workers.log"
        workers = [await start_worker(env, (team,), log=logs) for _ in range(2)]
        try:
            await consumers(settings, [team], 2)
            async with GatewayClient(identity.settings, **identity.who) as client:  # type: ignore[arg-type]

                async def send() -> str:
                    result = await client.chat(
                        "priced", PRICED, max_tokens=PRICED_OUTPUT, timeout=30
                    )
                    if result.error is not None:
                        return result.error.code
                    assert result.status == "ok" and result.gateway is not None
                    return result.gateway.worker

                # ... each worker having settled some of the 6 jobs the budget admitted
                answered = [await send() for _ in range(ADMITTED)]
                assert len(set(answered)) == 2, answered
                assert await send() == "budget_exhausted"

                # When Redis loses the team's ledger, no job in flight, and jobs come one
                # after the other (the first taken by one worker, which makes the ledger again
                # from PostgreSQL, holding none of them, and its own jobs alone)
                ledger = Keys(settings.redis_prefix).spend(team, current_month())
                async for key in redis_client.scan_iter(match=f"{ledger}*"):
                    await redis_client.delete(key)
                calls = mock.stats.calls
                after = [await send() for _ in range(2)]

                # Expect every one refused for the budget, none called
                assert after == ["budget_exhausted", "budget_exhausted"], logs.read_text()
                assert mock.stats.calls == calls
        finally:
            await stop_workers(workers)
