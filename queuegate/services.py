"""Checking that RabbitMQ, Redis and PostgreSQL answer, with one line that says what to do."""

from __future__ import annotations

import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from queuegate.broker import connect, redact_url
from queuegate.errors import ServiceUnavailable
from queuegate.settings import Settings


async def check_services(settings: Settings) -> None:
    """Raise ServiceUnavailable for the first service that does not answer."""
    connection = await connect(settings.amqp_url, name="queuegate-check")
    await connection.close()
    client = aioredis.from_url(settings.redis_url, socket_connect_timeout=3)
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        raise ServiceUnavailable(
            f"Redis is not reachable at {redact_url(settings.redis_url)}: start it "
            "(redis-server --daemonize yes) or set QUEUEGATE_REDIS_URL"
        ) from exc
    finally:
        await client.aclose()
    try:
        conn = await asyncpg.connect(settings.database_url, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        raise ServiceUnavailable(
            f"PostgreSQL is not reachable at {redact_url(settings.database_url)}: start it "
            "(pg_ctlcluster <version> main start) or set QUEUEGATE_DATABASE_URL"
        ) from exc
    await conn.close()
