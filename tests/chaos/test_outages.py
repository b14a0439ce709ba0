"""Chaos 2, 3 and 5: RabbitMQ, PostgreSQL or Redis goes away mid-run, then comes back.

Each service is cut through a TcpProxy (the shared services keep running for other tests):
RabbitMQ for producer, worker and accounting at once; PostgreSQL for accounting and the
worker; Redis, whose outcome store is best effort, for the worker.
"""

from __future__ import annotations

import asyncio

import pytest

from mockprovider import Behavior, MockConfig
from queuegate.settings import Settings
from tests.chaos.harness import TEAMS, Figures, expect_each_job_once, jobs_flowing, team_clients
from tests.faults import Service, behind_proxies
from tests.support import running_gateway

JOBS = 400
CUT_AFTER_CALLS = 100


@pytest.mark.parametrize(
    ("service", "outage"),
    [("amqp", 3.0), ("database", 5.0), ("redis", 3.0)],
    ids=["rabbitmq", "postgresql", "redis"],
)
async def test_an_outage_loses_no_confirmed_job_and_counts_none_twice(
    settings: Settings, service: Service, outage: float
) -> None:
    figures = Figures(f"{service} cut for {outage:.0f} s")
    # Given a gateway whose components reach the service through a proxy
    mock = MockConfig(default=Behavior(latency_ms=20))
    async with (
        behind_proxies(settings, service) as (through, proxies),
        running_gateway(settings, teams=TEAMS, mock_config=mock, components=through) as gw,
        team_clients(gw.client) as clients,
    ):
        # When jobs are flowing and the service becomes unreachable for a while
        submitting = await jobs_flowing(clients, gw.mock, JOBS, CUT_AFTER_CALLS, within=60)
        calls_at_cut = gw.mock.stats.calls
        await proxies[service].down()
        await asyncio.sleep(outage)
        await proxies[service].up()

        # Expect every confirmed job answered once, called once and accounted once
        await expect_each_job_once(
            submitting,
            clients=clients,
            pool=gw.pool,
            mock=gw.mock,
            dead=settings,
            figures=figures,
        )
        # ... and the cut came mid-run: jobs were still to be served when the service went away
        assert calls_at_cut < JOBS
