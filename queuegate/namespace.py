"""Removing everything one namespace created: broker objects, Redis keys, database schema.

For the demo's reset, test teardown and benchmarks; never run it against a namespace in use.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import asyncpg

from queuegate.broker import connect
from queuegate.db import quote_ident
from queuegate.keys import Keys
from queuegate.redis_client import redis_for
from queuegate.settings import Settings
from queuegate.topology import Topology


async def drop_namespace(
    settings: Settings, teams: Iterable[str], *, queues: Iterable[str] = ()
) -> None:
    """``queues``: more queues of the namespace to delete; the reply and results queues the
    gateway declared for ``teams`` (as recorded in Redis) go too."""
    topo = Topology.of(settings)
    teams = list(teams)
    recorded = Keys(settings.redis_prefix)
    client = redis_for(settings)
    try:
        declared: list[str] = []
        for team in teams:
            names: list[Any] = await client.zrange(recorded.reply_queues(team), 0, -1)
            declared.extend(name.decode() for name in names)
    finally:
        await client.aclose()
    connection = await connect(settings.amqp_url, name="queuegate-drop")
    async with connection:
        channel = await connection.channel()
        team_queues = [topo.team_queue(team) for team in teams]
        team_queues += [topo.control_queue(team) for team in teams]
        team_queues += [topo.team_dead_queue(team) for team in teams]
        shared = [topo.accounting_queue, topo.dead_queue, topo.shared_control_queue]
        for queue in [*team_queues, *declared, *queues, *shared]:
            await channel.queue_delete(queue)
        for exchange in (
            *(topo.entry_exchange(team) for team in teams),
            topo.jobs_exchange,
            topo.usage_exchange,
            topo.dead_exchange,
            topo.dead_teams_exchange,
        ):
            await channel.exchange_delete(exchange)
    client = redis_for(settings)
    try:
        pattern = f"{settings.redis_prefix}:*"
        keys = [key async for key in client.scan_iter(match=pattern, count=1000)]
        for start in range(0, len(keys), 1000):
            await client.delete(*keys[start : start + 1000])
    finally:
        await client.aclose()
    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {quote_ident(settings.database_schema)} CASCADE")
    finally:
        await conn.close()
