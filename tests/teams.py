"""Registering test teams with a config, before or while a gateway runs, and as their apps
reach the gateway."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aio_pika
import aio_pika.exceptions

from accounting import migrate
from admin.teams import add
from queuegate.db import create_pool
from queuegate.management import BrokerAdmin
from queuegate.registry import TeamConfig, add_team, set_team_config
from queuegate.settings import Settings
from queuegate.topology import Topology


async def register(settings: Settings, team: str, config: TeamConfig) -> None:
    pool = await create_pool(settings)
    try:
        await migrate(pool, settings.database_schema)
        await add_team(pool, team)
        await set_team_config(pool, team, config)
    finally:
        await pool.close()


@dataclass(frozen=True)
class TeamIdentity:
    """A team as its own apps reach the gateway: its broker URL, or the shared one and its key."""

    team: str
    settings: Settings
    api_key: str | None = None

    @property
    def who(self) -> dict[str, str | None]:
        """The ``team`` and ``api_key`` arguments of the batch functions and GatewayClient."""
        return {"team": self.team, "api_key": self.api_key}


@asynccontextmanager
async def team_identities(settings: Settings) -> AsyncIterator[dict[str, TeamIdentity]]:
    """``alpha`` added the default way (its own broker user), ``beta`` with an API key; the
    broker user is deleted afterwards."""
    alpha = await add(settings, "alpha")
    beta = await add(settings, "beta", identity="api_key")
    assert alpha.amqp_url is not None and beta.api_key is not None
    try:
        yield {
            "alpha": TeamIdentity(
                "alpha", settings.model_copy(update={"amqp_url": alpha.amqp_url})
            ),
            "beta": TeamIdentity("beta", settings, beta.api_key),
        }
    finally:
        async with BrokerAdmin.of(settings) as admin:
            assert alpha.user is not None
            await admin.delete_user(alpha.user)


async def quota_in_force(settings: Settings, team: str) -> None:
    """Until the broker refuses the team's queue a message, then emptied: it applies a new
    policy on its own time, seconds after ``teams set`` may return."""
    name = Topology(settings.namespace).team_queue(team)
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        for _ in range(1000):
            try:
                await channel.default_exchange.publish(aio_pika.Message(b"{}"), routing_key=name)
            except aio_pika.exceptions.DeliveryError:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError(f"{name} took every message: its quota is not in force")
        queue = await channel.declare_queue(name, passive=True)
        await queue.purge()
