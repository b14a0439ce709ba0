"""What ``queuegate teams`` does: the registry row and the team's queue, together."""

from __future__ import annotations

from queuegate.broker import connect
from queuegate.db import create_pool
from queuegate.registry import Team, add_team, disable_team, list_teams
from queuegate.settings import Settings
from queuegate.topology import Topology


async def add(settings: Settings, name: str) -> None:
    """Register the team and declare its queue, so producers can publish before a worker runs."""
    from accounting import migrate

    pool = await create_pool(settings)
    try:
        await migrate(pool, settings.database_schema)
        await add_team(pool, name)
    finally:
        await pool.close()
    connection = await connect(settings.amqp_url, name="queuegate-teams")
    async with connection:
        channel = await connection.channel()
        await Topology(settings.namespace, settings.delivery_limit).declare_team_queue(
            channel, name
        )


async def listing(settings: Settings) -> list[Team]:
    pool = await create_pool(settings)
    try:
        return await list_teams(pool)
    finally:
        await pool.close()


async def disable(settings: Settings, name: str) -> bool:
    pool = await create_pool(settings)
    try:
        return await disable_team(pool, name)
    finally:
        await pool.close()
