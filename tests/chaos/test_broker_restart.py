"""Chaos 2, for real: the RabbitMQ node itself stops and starts again mid-run.

test_outages.py cuts the connection through a proxy; here a private node (the shared broker is
never stopped) restarts on its own data, so only what is durable survives: quorum queues,
persistent messages and the clients' durable reply queues.
"""

from __future__ import annotations

import asyncio

from mockprovider import Behavior, MockConfig
from queuegate.settings import Settings
from tests.chaos.harness import TEAMS, Figures, expect_each_job_once, jobs_flowing, team_clients
from tests.chaos.private_broker import PrivateBroker, on_node
from tests.support import running_gateway

JOBS = 400
RESTART_AFTER_CALLS = 100


async def test_a_broker_restart_loses_no_confirmed_job_and_counts_none_twice(
    settings: Settings, broker: PrivateBroker
) -> None:
    figures = Figures("rabbitmq node restarted")
    # Given a gateway whose producer, worker and accounting all use the private node
    components = on_node(settings, broker)
    mock = MockConfig(default=Behavior(latency_ms=20))
    async with (
        running_gateway(settings, teams=TEAMS, mock_config=mock, components=components) as gw,
        team_clients(gw.client) as clients,
    ):
        # When jobs are flowing and the node stops and starts again
        submitting = await jobs_flowing(clients, gw.mock, JOBS, RESTART_AFTER_CALLS, within=60)
        calls_at_restart = gw.mock.stats.calls
        await asyncio.to_thread(broker.restart)

        # Expect every confirmed job answered once, called once and accounted once
        await expect_each_job_once(
            submitting,
            clients=clients,
            pool=gw.pool,
            mock=gw.mock,
            dead=components,
            figures=figures,
        )
        # ... and the restart came mid-run: jobs were still to be served when the node stopped
        assert calls_at_restart < JOBS


async def test_a_reply_awaited_across_a_broker_restart_arrives(
    settings: Settings, broker: PrivateBroker
) -> None:
    # Given a job the provider is still answering
    mock = MockConfig(default=Behavior(latency_ms=1000))
    async with (
        running_gateway(settings, mock_config=mock, components=on_node(settings, broker)) as gw,
        gw.client("alpha") as alpha,
    ):
        handle = await alpha.submit(alpha.job("gpt-4o-mini", [{"role": "user", "content": "hi"}]))
        async with asyncio.timeout(10):
            await gw.mock.wait_for_arrivals(1)

        # When the node restarts while its producer awaits the reply
        await asyncio.to_thread(broker.restart)

        # Expect the reply to arrive
        result = await handle.result(timeout=60)
        assert result.status == "ok"
        assert result.job_id == handle.job_id
