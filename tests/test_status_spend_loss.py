"""``queuegate status`` after Redis loses its data (a restart without persistence, FLUSHALL):
each team's spend is still the month's in PostgreSQL, not the $0.00 of the ledger and live
spend Redis lost, nor the few jobs a live spend counted again since holds. For a team with a
budget added the default way (its own broker user) and one without, with an API key."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from pathlib import Path

import redis.asyncio as aioredis

from admin.teams import configure
from producer import GatewayClient
from queuegate.settings import Settings
from queuegate.status import StatusReader
from tests.support import (
    PRICED,
    PRICED_OUTPUT,
    lose_redis_data,
    priced_catalog,
    queuegate_cli,
    running_gateway,
)
from tests.teams import team_identities

JOBS = 4
JOB_COST = Decimal("0.013")
"""What a job of ``priced_catalog``'s model costs (tests.support.PRICED)."""


async def test_status_shows_postgresql_spend_after_redis_loses_its_data(
    settings: Settings, tmp_path: Path, redis_client: aioredis.Redis
) -> None:
    catalog = priced_catalog(tmp_path)
    async with team_identities(settings) as identities:
        await configure(settings, "alpha", {"budget_usd": Decimal(10)})
        async with running_gateway(settings, teams=("alpha", "beta"), catalog=catalog) as gw:
            # Given alpha (a budget, its own broker user) and beta (no budget, an API key),
            # each with jobs answered and accounted
            for identity in identities.values():
                async with GatewayClient(identity.settings, **identity.who) as client:  # type: ignore[arg-type]
                    for _ in range(JOBS):
                        result = await client.chat("priced", PRICED, max_tokens=PRICED_OUTPUT)
                        assert result.status == "ok"
            await gw.usage_rows(2 * JOBS)

            # When Redis loses every key of the gateway (long before accounting's next
            # reconciliation, 30 s away, makes alpha's ledger again)
            await lose_redis_data(redis_client, settings)
            await _worker_reports(settings)
            # Expect status to show each team's spend as PostgreSQL holds it
            accounted = JOBS * JOB_COST
            assert await _spend_json(settings) == {"alpha": accounted, "beta": accounted}

            # And when one more job of each is answered and accounted (beta's live spend
            # made again by it: that job alone)
            for identity in identities.values():
                async with GatewayClient(identity.settings, **identity.who) as client:  # type: ignore[arg-type]
                    result = await client.chat("priced", PRICED, max_tokens=PRICED_OUTPUT)
                    assert result.status == "ok"
            await gw.usage_rows(2 * JOBS + 2)
            # Expect each team's month spend, in the JSON and in the table
            month = (JOBS + 1) * JOB_COST
            assert await _spend_json(settings) == {"alpha": month, "beta": month}
            table = await _status(settings)
            assert table.count(f"${month}") == 2, table


async def _worker_reports(settings: Settings) -> None:
    """Until the worker has written its live stats again (Redis lost its name too): a status
    read before says no worker reports, and exits 3."""
    async with StatusReader(settings) as reader, asyncio.timeout(10):
        # Polled: a worker writes its live stats on its schedule, unannounced.
        while (await reader.read([])).workers == 0:  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def _spend_json(settings: Settings) -> dict[str, Decimal]:
    """Each team's spend as ``queuegate status --json`` prints it."""
    status = json.loads(await _status(settings, "--json"), parse_float=Decimal)
    return {team["team"]: Decimal(team["spend_usd"]) for team in status["teams"]}


async def _status(settings: Settings, *args: str) -> str:
    """What ``queuegate status ARGS`` prints, wide enough for every column."""
    code, stdout, stderr = await queuegate_cli(settings, "status", *args, COLUMNS="200")
    assert code == 0, stderr
    return stdout
