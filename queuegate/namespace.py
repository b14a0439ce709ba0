"""Removing everything one namespace created: broker objects, Redis keys, database schema.

For the demo's reset, test teardown and benchmarks; never run it against a namespace in use.
"""

from __future__ import annotations

from collections.abc import Iterable

import asyncpg
import redis.asyncio as aioredis

from queuegate.broker import connect
from queuegate.db import quote_ident
from queuegate.settings import Settings
from queuegate.topology import Topology


async def drop_namespace(
    settings: Settings, teams: Iterable[str], *, queues: Iterable[str] = ()
) -> None:
    """``queues``: more queues of the namespace to delete (reply or results queues)."""
    topo = Topology(settings.namespace)
    connection = await connect(settings.amqp_url, name="queuegate-drop")
    async with connection:
        channel = await connection.channel()
        team_queues = [topo.team_queue(team) for team in teams]
        for queue in [*team_queues, *queues, topo.accounting_queue, topo.dead_queue]:
            await channel.queue_delete(queue)
        for exchange in (topo.jobs_exchange, topo.usage_exchange, topo.dead_exchange):
            await channel.exchange_delete(exchange)
    client = aioredis.from_url(settings.redis_url)
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
