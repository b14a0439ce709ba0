"""Outages under accounting: PostgreSQL away, the broker connection cut, its queue deleted."""

from __future__ import annotations

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractExchange
from prometheus_client import REGISTRY

from accounting.consumer import LAG_EVERY
from queuegate.db import create_pool
from queuegate.settings import Settings
from queuegate.topology import Topology
from tests.faults import behind_proxies
from tests.support import consumed
from tests.test_accounting import WAIT, running, send_usage, usage, wait_until


async def test_usage_written_during_a_postgres_outage_lands_once_after_it(
    settings: Settings,
) -> None:
    async with behind_proxies(settings, "database") as (through, proxies):
        connection = await aio_pika.connect(settings.amqp_url)
        pool = await create_pool(settings)
        async with connection, running(through) as accountant:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await Topology(settings.namespace).declare_usage(channel)
            # Given accounting writing through a proxy, with 50 events written
            await send_usage(exchange, *(usage(f"before-{i}") for i in range(50)))
            await wait_until(accountant, lambda: accountant.rows_inserted == 50)

            # When PostgreSQL goes away and 100 more events arrive
            await proxies["database"].down()
            await send_usage(exchange, *(usage(f"during-{i}") for i in range(100)))
            await wait_until(accountant, lambda: accountant.events_received == 150)
            assert accountant.rows_inserted == 50  # held, not acknowledged

            # Expect every one of them written exactly once after it returns
            await proxies["database"].up()
            await wait_until(accountant, lambda: accountant.rows_inserted == 150)
        try:
            rows = await pool.fetch("SELECT job_id FROM usage_log")
        finally:
            await pool.close()
        assert len(rows) == 150 == len({row["job_id"] for row in rows})


async def test_accounting_consumes_again_after_its_broker_connection_drops(
    settings: Settings,
) -> None:
    async with behind_proxies(settings, "amqp") as (through, proxies):
        connection = await aio_pika.connect(settings.amqp_url)
        async with connection, running(through) as accountant:
            exchange = await _usage_exchange(connection, settings)
            # Given accounting reaching RabbitMQ through a proxy, with 10 events written
            await send_usage(exchange, *(usage(f"before-{i}") for i in range(10)))
            await wait_until(accountant, lambda: accountant.rows_inserted == 10)

            # When its connection is cut and may come back, and 10 more events arrive
            await proxies["amqp"].down()
            await proxies["amqp"].up()
            await send_usage(exchange, *(usage(f"after-{i}") for i in range(10)))

            # Expect them written: its consumer is back on the reopened channel
            await wait_until(accountant, lambda: accountant.rows_inserted == 20)


async def test_accounting_declares_its_queue_again_when_it_is_deleted(
    settings: Settings,
) -> None:
    queue = Topology(settings.namespace).accounting_queue
    admin = await aio_pika.connect(settings.amqp_url)
    async with admin, running(settings) as accountant:
        exchange = await _usage_exchange(admin, settings)
        # Given accounting consuming its queue
        await send_usage(exchange, usage("before"))
        await wait_until(accountant, lambda: accountant.rows_inserted == 1)

        # When an operator deletes the queue under it
        async with admin.channel() as channel:
            await channel.queue_delete(queue)

        # Expect the queue back, consumed again, and new events written
        await consumed(admin, queue, WAIT)
        await send_usage(exchange, usage("after"))
        await wait_until(accountant, lambda: accountant.rows_inserted == 2)


async def _usage_exchange(connection: AbstractConnection, settings: Settings) -> AbstractExchange:
    channel = await connection.channel(publisher_confirms=True)
    return await Topology(settings.namespace).declare_usage(channel)


def _lag() -> float:
    value = REGISTRY.get_sample_value("queuegate_accounting_lag_seconds")
    assert value is not None
    return value


async def test_accounting_lag_grows_while_postgres_is_down_and_falls_to_zero_once_written(
    settings: Settings,
) -> None:
    async with behind_proxies(settings, "database") as (through, proxies):
        connection = await aio_pika.connect(settings.amqp_url)
        async with connection, running(through) as accountant:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await Topology(settings.namespace).declare_usage(channel)
            # Given accounting caught up
            await send_usage(exchange, usage("before"))
            await wait_until(accountant, lambda: accountant.rows_inserted == 1)

            # When PostgreSQL goes away and events arrive that cannot be written
            await proxies["database"].down()
            await send_usage(exchange, *(usage(f"during-{i}") for i in range(5)))
            await wait_until(accountant, lambda: accountant.events_received == 6)

            # Expect the lag to grow while they wait, as the docs say to look for
            await wait_until(accountant, lambda: _lag() >= LAG_EVERY)
            first = _lag()
            await wait_until(accountant, lambda: _lag() >= first + LAG_EVERY)

            # And to fall back to 0 once they are written, not to stay at their age
            await proxies["database"].up()
            await wait_until(accountant, lambda: accountant.rows_inserted == 6)
            await wait_until(accountant, lambda: _lag() == 0.0)
            assert accountant.unwritten_since() is None
