"""Fixtures: the real RabbitMQ, Redis and PostgreSQL, one namespace, prefix and schema per test."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import aio_pika
import asyncpg
import pytest
import redis.asyncio as aioredis

from queuegate.settings import Settings
from queuegate.topology import Topology

TEST_TEAMS = ("alpha", "beta", "gamma")
"""Teams tests may use; their queues are deleted after every test."""

START_HINTS = {
    "RabbitMQ": "rabbitmq-server -detached",
    "Redis": "redis-server --daemonize yes --port 6379 --save '' --appendonly no",
    "PostgreSQL": "pg_ctlcluster $(ls /etc/postgresql) main start",
}


def _unreachable(service: str, url: str, exc: BaseException) -> None:
    pytest.fail(
        f"{service} is not reachable at {url} ({type(exc).__name__}): "
        f"start it (e.g. `{START_HINTS[service]}`) or set its QUEUEGATE_* URL",
        pytrace=False,
    )


@pytest.fixture(scope="session")
def base_settings() -> Settings:
    return Settings()


@pytest.fixture
async def settings(base_settings: Settings) -> AsyncIterator[Settings]:
    """Settings of this test alone: its own namespace, Redis prefix and database schema."""
    tag = uuid.uuid4().hex[:10]
    s = base_settings.model_copy(
        update={"namespace": f"qgt-{tag}", "database_schema": f"qgt_{tag}", "shutdown_grace": 5.0}
    )
    yield s
    await _drop_everything(s)


async def _drop_everything(s: Settings) -> None:
    try:
        connection = await aio_pika.connect(s.amqp_url)
    except Exception as exc:
        _unreachable("RabbitMQ", s.amqp_url, exc)
    async with connection:
        channel = await connection.channel()
        topo = Topology(s.namespace)
        for team in TEST_TEAMS:
            await channel.queue_delete(topo.team_queue(team))
        for queue in (topo.accounting_queue, topo.dead_queue):
            await channel.queue_delete(queue)
        for exchange in (topo.jobs_exchange, topo.usage_exchange, topo.dead_exchange):
            await channel.exchange_delete(exchange)
    client = aioredis.from_url(s.redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{s.redis_prefix}:*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()
    conn = await asyncpg.connect(s.database_url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{s.database_schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture(scope="session", autouse=True)
def services_reachable(base_settings: Settings) -> None:
    """Fail the run at once, naming the service, when one of the three is down."""
    import asyncio

    async def check() -> None:
        try:
            connection = await aio_pika.connect(base_settings.amqp_url, timeout=5)
            await connection.close()
        except Exception as exc:
            _unreachable("RabbitMQ", base_settings.amqp_url, exc)
        client = aioredis.from_url(base_settings.redis_url)
        try:
            await client.ping()
        except Exception as exc:
            _unreachable("Redis", base_settings.redis_url, exc)
        finally:
            await client.aclose()
        try:
            conn = await asyncpg.connect(base_settings.database_url, timeout=5)
            await conn.close()
        except Exception as exc:
            _unreachable("PostgreSQL", base_settings.database_url, exc)

    asyncio.run(check())


@pytest.fixture
async def redis_client(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(settings.redis_url)
    yield client
    await client.aclose()
