"""What ``queuegate teams`` does: the registry row and the team's queue, together."""

from __future__ import annotations

import re
from typing import Any

from pydantic import ValidationError

from queuegate.broker import connect
from queuegate.db import create_pool
from queuegate.errors import ConfigError
from queuegate.management import BrokerAdmin
from queuegate.registry import (
    Team,
    TeamConfig,
    add_team,
    disable_team,
    get_team,
    list_teams,
    set_team_config,
)
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


def quota_policy(settings: Settings, team: str) -> str:
    return f"{settings.namespace}-quota-{team}"


async def show(settings: Settings, name: str) -> Team:
    pool = await create_pool(settings)
    try:
        team = await get_team(pool, name)
    finally:
        await pool.close()
    if team is None:
        raise ConfigError(f"no team named {name}: list them with queuegate teams list")
    return team


async def configure(settings: Settings, name: str, changes: dict[str, Any]) -> TeamConfig:
    """Merge ``changes`` (None clears a field) into the team's config, store it, and apply its
    queue quota as a broker policy (a queue's own arguments cannot change once declared).

    Workers pick the rest up at their next registry read.
    """
    team = await show(settings, name)
    merged = team.config.model_dump() | changes
    try:
        config = TeamConfig.model_validate(merged)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        raise ConfigError(f"team {name}: {field}: {first['msg']}") from None
    pool = await create_pool(settings)
    try:
        await set_team_config(pool, name, config)
    finally:
        await pool.close()
    topology = Topology(settings.namespace, settings.delivery_limit)
    async with BrokerAdmin(settings.management_url) as admin:
        if config.max_queue_length is None:
            await admin.delete_policy(quota_policy(settings, name))
        else:
            await admin.put_policy(
                quota_policy(settings, name),
                pattern=f"^{re.escape(topology.team_queue(name))}$",
                definition={"max-length": config.max_queue_length},
            )
    return config
