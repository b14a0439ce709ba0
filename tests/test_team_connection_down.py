"""A team's broker connection kept down by its own requests holds nothing of the worker's.

A control request whose ``reply_to`` RabbitMQ 3.10 cannot decode closes the connection its
answer goes on, the team's own (README: A broker fault a team can reach); that request,
returned unanswered, closes it again each time it comes back. Here the worker reconnects only
after ``DOWN`` seconds, so the team's connection is down for the whole test once closed: what
a connection closed again and again is most of the time. Alpha is added the default way (its
own broker user) or identified by API key.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal

import aio_pika
import pytest

from admin.teams import Credentials, configure, in_force
from mockprovider import Behavior, MockConfig
from producer import GatewayClient
from queuegate.settings import Settings
from queuegate.topology import Topology
from tests.support import logged, reconnects, running_gateway, wait_until
from tests.test_control import App, alpha_app, as_team, ask_undecodable

HELLO = [{"role": "user", "content": "Hello there"}]
DOWN = 60
"""Seconds the worker's robust connections wait before reconnecting: longer than the test."""
JOBS = 4
WAIT = 3.0
"""Seconds a test's ``teams set`` waits for the worker's confirm (the command's default: 5)."""


def reconnecting_late(settings: Settings) -> Settings:
    return settings.model_copy(
        update={"amqp_url": f"{settings.amqp_url}?reconnect_interval={DOWN}"}
    )


@asynccontextmanager
async def alpha_closed(settings: Settings, app: App) -> AsyncIterator[None]:
    """Alpha's connection of the worker closed by alpha's own request, which it holds
    unanswered until its connection is back; purged from alpha's control queue after."""
    with logged("aiormq.connection", "Unexpected connection close") as crashed:
        await ask_undecodable(settings, app, 1)
        await crashed.wait()
    try:
        yield
    finally:
        connection = await aio_pika.connect(settings.amqp_url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.get_queue(
                Topology.of(settings).control_queue("alpha"), ensure=False
            )
            await queue.purge()


@pytest.mark.parametrize("identity", ["broker", "api_key"])
async def test_a_stop_returns_at_once_the_jobs_whose_team_connection_is_down(
    settings: Settings, teams: dict[str, Credentials], identity: str
) -> None:
    slow = MockConfig(default=Behavior(latency_ms=2000))
    async with (
        alpha_app(settings, teams, identity) as app,
        running_gateway(reconnecting_late(settings), mock_config=slow) as gw,
        GatewayClient(app.settings, team="alpha", api_key=app.api_key) as alpha,
    ):
        # Given JOBS jobs of alpha's at the provider
        handles = [await alpha.submit(alpha.job("gpt-4o-mini", HELLO)) for _ in range(JOBS)]
        await wait_until(lambda: gw.mock.arrived == JOBS)
        async with alpha_closed(settings, app):
            # ... when alpha's connection is closed, and stays down as they are answered
            await gw.mock.wait_for_calls(JOBS)
            # (each accounted meanwhile, though its result waits for its redelivery: billed
            # even should alpha's queue be consumed no more, its team disabled)
            assert len(await gw.usage_rows(JOBS)) == JOBS

            # When the worker stops (a SIGTERM)
            began = time.monotonic()
            await gw.stop_worker()
            stopped = time.monotonic() - began

        # Expect it stopped well within its grace, not waiting for results that wait for
        # alpha's connection: those jobs went back to alpha's queue unacknowledged
        assert stopped < settings.shutdown_grace / 2, stopped
        # ... where another worker answers each from its stored outcome, once, the provider
        # not called again, each accounted once (by the first gateway's accounting)
        async with running_gateway(settings, accounting=False) as again:
            await again.expect_each_answered_once(handles)
            assert again.mock.arrived == 0


@pytest.mark.parametrize("identity", ["broker", "api_key"])
async def test_team_changes_are_confirmed_while_a_teams_connection_is_down(
    settings: Settings, teams: dict[str, Credentials], identity: str
) -> None:
    async with (
        alpha_app(settings, teams, identity) as app,
        running_gateway(reconnecting_late(settings), teams=("alpha", "beta")) as gw,
        GatewayClient(as_team(settings, teams["beta"]), team="beta") as beta,
        alpha_closed(settings, app),
    ):
        alpha_reconnects = reconnects("team", "alpha")
        # When alpha's limits change (a new consumer of its queue, which its connection down
        # cannot have), then beta's, then alpha's again
        changes = [
            ("alpha", {"rpm": 6}),
            ("beta", {"budget_usd": Decimal(5)}),
            ("alpha", {"rpm": None}),
            ("beta", {"budget_usd": None}),
        ]
        for team, fields in changes:
            change = await configure(settings, team, fields)
            # Expect each confirmed by the worker within the command's wait: alpha is served
            # once its connection is back
            assert (await in_force(settings, change.change, WAIT)).pending == [], team
        # ... beta served meanwhile, alpha's connection still down
        assert (await beta.chat("gpt-4o-mini", HELLO, timeout=30)).status == "ok"
        assert reconnects("team", "alpha") == alpha_reconnects
        assert "alpha" not in gw.worker.teams
