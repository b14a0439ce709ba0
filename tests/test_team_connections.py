"""A broker connection closed under one team's jobs takes no other team's jobs with it.

RabbitMQ 3.10 closes a connection (541) for what a team can publish with its own credentials
(README: A broker fault a team can reach): its job queue, restarted after a malformed
``x-death``, may deliver to a consumer tag the channel no longer knows. Here the broker closes
the connection a team's jobs are consumed on, as it does then, found as the broker lists the
consumer of the team's queue, while both teams' jobs are at the provider. One team added the
default way (its own broker user), the other by API key.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from admin.teams import add, disable
from mockprovider import Behavior, MockConfig
from producer import GatewayClient
from queuegate.keys import Keys
from queuegate.livestats import window_of
from queuegate.management import BrokerAdmin
from queuegate.redis_client import redis_for
from queuegate.settings import Settings
from queuegate.topology import Topology
from tests.faults import RECONNECT_INTERVAL
from tests.support import reconnects, running_gateway, wait_until
from tests.teams import team_identities

HELLO = [{"role": "user", "content": "Hello there"}]
JOBS = 6
"""Jobs of each team at the provider when the connection closes: fewer than the prefetch."""
SLOW = MockConfig(default=Behavior(latency_ms=2000))
"""Calls long enough for the connection to be closed while every job is in one."""


async def consumed_on(settings: Settings, team: str) -> str:
    """The name of the connection the one consumer of ``team``'s job queue is on, as the
    broker lists it (its management statistics, some seconds behind: looked at again until
    it is there)."""
    queue = Topology.of(settings).team_queue(team)
    async with BrokerAdmin.of(settings) as admin, asyncio.timeout(30):
        while True:
            listed = await admin.queue(queue)
            consumers = (listed or {}).get("consumer_details") or []
            # A consumer's channel the statistics do not know yet has an empty list there.
            details = [c["channel_details"] for c in consumers]
            if details and isinstance(details[0], dict):
                [channel] = details
                return str(channel["connection_name"])
            await asyncio.sleep(0.2)


async def connections_once_closed(settings: Settings, name: str) -> list[str]:
    """The gateway user's connections, as the broker lists them, once ``name`` is not among
    them (the list is some seconds behind)."""
    async with BrokerAdmin.of(settings) as admin, asyncio.timeout(30):
        while True:
            listed = await admin.connections(settings.amqp_user or "")
            if name not in listed:
                return listed
            await asyncio.sleep(0.2)


async def taken(settings: Settings, team: str, since: float, *, at_least: int = 0) -> int:
    """Deliveries of ``team``'s jobs the workers took since ``since`` (``time.time``), as their
    live stats counted them (written once a second, in full once the worker stopped); looked
    at again until there are ``at_least``."""
    keys = Keys(settings.redis_prefix)
    redis = redis_for(settings)
    try:
        async with asyncio.timeout(30):
            while True:
                windows = range(window_of(since), window_of(time.time()) + 1)
                counts = [await redis.hget(keys.live_team(team, w), "taken") for w in windows]
                total = sum(int(count) for count in counts if count is not None)
                if total >= at_least:
                    return total
                await asyncio.sleep(0.1)
    finally:
        await redis.aclose()


@pytest.mark.parametrize("cut", ["alpha", "beta"])
async def test_a_connection_closed_under_one_teams_jobs_redelivers_no_other_teams(
    settings: Settings, cut: str
) -> None:
    other = "beta" if cut == "alpha" else "alpha"
    # The worker reconnects within a test's patience (aio-pika waits 5 s by default).
    components = settings.model_copy(
        update={"amqp_url": f"{settings.amqp_url}?reconnect_interval={RECONNECT_INTERVAL}"}
    )
    async with (
        team_identities(settings) as identities,
        running_gateway(components, teams=("alpha", "beta"), mock_config=SLOW) as gw,
        GatewayClient(identities["alpha"].settings, **identities["alpha"].who) as alpha,  # type: ignore[arg-type]
        GatewayClient(identities["beta"].settings, **identities["beta"].who) as beta,  # type: ignore[arg-type]
    ):
        clients = {"alpha": alpha, "beta": beta}
        # Given the connection cut's jobs are consumed on, as the broker lists it
        closing = await consumed_on(settings, cut)
        worker, own, others = (
            reconnects("worker"),
            reconnects("team", cut),
            reconnects("team", other),
        )
        # ... and JOBS jobs of each team at the provider
        since = time.time()
        handles = {
            team: [await client.submit(client.job("gpt-4o-mini", HELLO)) for _ in range(JOBS)]
            for team, client in clients.items()
        }
        await wait_until(lambda: gw.mock.arrived == 2 * JOBS)

        # When the broker closes that connection
        async with BrokerAdmin.of(settings) as admin:
            await admin.close_connection(closing, reason="a fault of one team's")

        # Expect every job of both teams answered ok, once, and accounted once, the
        # provider called once for each
        await gw.expect_each_answered_once([*handles["alpha"], *handles["beta"]])
        assert gw.mock.arrived == 2 * JOBS
        # ... cut's connection made again, and cut's jobs it held delivered again there
        await wait_until(lambda: reconnects("team", cut) == own + 1)
        await taken(settings, cut, since, at_least=2 * JOBS)
        await gw.stop_worker()
        assert await taken(settings, cut, since) == 2 * JOBS
        # ... but neither the worker's own connection nor the other team's: each of its jobs
        # delivered once
        assert reconnects("worker") == worker
        assert reconnects("team", other) == others
        assert await taken(settings, other, since) == JOBS


async def test_a_team_enabled_is_consumed_on_a_connection_of_its_own_closed_once_disabled(
    settings: Settings,
) -> None:
    async with (
        team_identities(settings),
        running_gateway(settings, teams=()),  # every team the registry has enabled
    ):
        # Given a worker of alpha and beta: each consumed on a connection of its own
        alpha, beta = await consumed_on(settings, "alpha"), await consumed_on(settings, "beta")
        assert alpha != beta
        # When beta is disabled and gamma added
        assert await disable(settings, "beta")
        await add(settings, "gamma", identity="api_key")

        # Expect gamma consumed on a third connection, beta's connection closed and alpha's
        # kept (the broker lists connections some seconds behind too)
        gamma = await consumed_on(settings, "gamma")
        assert gamma not in (alpha, beta)
        listed = await connections_once_closed(settings, beta)
        assert alpha in listed and gamma in listed


async def published_on(settings: Settings, connection: str, *, at_least: int) -> int:
    """Messages the channels of ``connection`` published, as the broker's statistics count
    them (some seconds behind: looked at again until there are ``at_least``)."""
    async with BrokerAdmin.of(settings) as admin, asyncio.timeout(30):
        while True:
            channels = await admin._request("GET", "channels") or []
            published = sum(
                int((channel.get("message_stats") or {}).get("publish", 0))
                for channel in channels
                # (an empty list for a channel whose connection the statistics do not know yet)
                if isinstance(channel["connection_details"], dict)
                and channel["connection_details"]["name"] == connection
            )
            if published >= at_least:
                return published
            await asyncio.sleep(0.2)


@pytest.mark.parametrize("team", ["alpha", "beta"])
async def test_a_teams_results_go_on_the_connection_its_jobs_are_consumed_on(
    settings: Settings, team: str
) -> None:
    async with (
        team_identities(settings) as identities,
        running_gateway(settings, teams=("alpha", "beta")),
        GatewayClient(identities[team].settings, **identities[team].who) as client,  # type: ignore[arg-type]
    ):
        # When the team's jobs are answered
        handles = [await client.submit(client.job("gpt-4o-mini", HELLO)) for _ in range(JOBS)]
        assert [(await h.result(30)).status for h in handles] == ["ok"] * JOBS

        # Expect their results published on the connection they were consumed and
        # acknowledged on: the broker reads a job's acknowledgement with its result, and a
        # fault of the team's closes no connection its results share with other teams'
        consumed = await consumed_on(settings, team)
        assert await published_on(settings, consumed, at_least=JOBS) >= JOBS
