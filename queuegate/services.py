"""Checking that RabbitMQ, Redis and PostgreSQL answer, with one line that says what to do."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Literal

import asyncpg
from redis.exceptions import RedisError

from queuegate.broker import connect
from queuegate.db import database_unreachable
from queuegate.errors import ConfigError, ServiceUnavailable
from queuegate.management import BrokerAdmin
from queuegate.redis_client import redis_for, redis_unreachable
from queuegate.settings import Settings

Service = Literal["amqp", "redis", "database"]
"""A service by the name of its setting (``QUEUEGATE_<NAME>_URL``)."""


async def check_broker(settings: Settings) -> None:
    connection = await connect(settings.amqp_url, name="queuegate-check")
    await connection.close()


REDIS_CHECK_WAIT = 10.0
"""Seconds a one-off question to Redis (``check_redis``, ``queuegate deployments``) waits for
it, through the Sentinels when they are set, before saying it is unreachable. The client's
own timeouts do not bound it: redis-py asks each Sentinel it cannot reach again with backoff
(three refusing Sentinels took 58 s to report), and waits forever on one that accepts the
connection and never answers."""


async def check_redis(settings: Settings, *, within: float = REDIS_CHECK_WAIT) -> None:
    client = redis_for(settings, connect_timeout=min(3.0, within))
    try:
        async with asyncio.timeout(within):
            await client.ping()
    # TimeoutError, the wait passed, is an OSError.
    except (RedisError, OSError) as exc:
        how = "start it (redis-server --daemonize yes)"
        raise ServiceUnavailable(redis_unreachable(settings, how, exc)) from exc
    finally:
        await client.aclose()


async def check_database(settings: Settings) -> None:
    try:
        conn = await asyncpg.connect(settings.database_url, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        how = "start it (pg_ctlcluster <version> main start)"
        raise ServiceUnavailable(database_unreachable(settings, exc, how)) from exc
    await conn.close()


async def check_management(settings: Settings) -> None:
    """RabbitMQ's management API answers, as an administrator (operator commands need it)."""
    try:
        async with BrokerAdmin.of(settings) as admin:
            await admin.check_administrator()
    except ConfigError as exc:
        raise ServiceUnavailable(str(exc)) from exc


CHECKS: dict[Service, Callable[[Settings], Awaitable[None]]] = {
    "amqp": check_broker,
    "redis": check_redis,
    "database": check_database,
}


async def check_services(settings: Settings, *, management: bool = False) -> None:
    """Raise ServiceUnavailable for the first service that does not answer (``management``:
    nor RabbitMQ's management API as an administrator)."""
    for check in CHECKS.values():
        await check(settings)
    if management:
        await check_management(settings)


async def unanswered(settings: Settings) -> dict[Service, str]:
    """Each service that does not answer, with the one line that says so; all asked at once."""
    failures = await asyncio.gather(
        *(check(settings) for check in CHECKS.values()), return_exceptions=True
    )
    found: dict[Service, str] = {}
    for service, failure in zip(CHECKS, failures, strict=True):
        if isinstance(failure, ServiceUnavailable):
            found[service] = str(failure)
        elif isinstance(failure, BaseException):
            raise failure
    return found
