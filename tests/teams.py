"""Registering test teams with a config, before or while a gateway runs."""

from __future__ import annotations

from accounting import migrate
from queuegate.db import create_pool
from queuegate.registry import TeamConfig, add_team, set_team_config
from queuegate.settings import Settings


async def register(settings: Settings, team: str, config: TeamConfig) -> None:
    pool = await create_pool(settings)
    try:
        await migrate(pool, settings.database_schema)
        await add_team(pool, team)
        await set_team_config(pool, team, config)
    finally:
        await pool.close()
