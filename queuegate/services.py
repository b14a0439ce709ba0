"""Checking that RabbitMQ, Redis and PostgreSQL answer, with one line that says what to do."""

from __future__ import annotations

import asyncpg
from redis.exceptions import RedisError

from queuegate.broker import connect, redact_url
from queuegate.errors import ServiceUnavailable
from queuegate.redis_client import redis_for, redis_unreachable
from queuegate.settings import Settings


async def check_services(settings: Settings) -> None:
    """Raise ServiceUnavailable for the first service that does not answer."""
    connection = await connect(settings.amqp_url, name="queuegate-check")
    await connection.close()
    client = redis_for(settings, connect_timeout=3)
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        how = "start it (redis-server --daemonize yes)"
        raise ServiceUnavailable(redis_unreachable(settings, how)) from exc
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
