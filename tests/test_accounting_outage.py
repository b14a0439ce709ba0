"""A PostgreSQL outage: accounting holds its batch unacknowledged, backs off, and catches up."""

from __future__ import annotations

import aio_pika

from queuegate.db import create_pool
from queuegate.settings import Settings
from queuegate.topology import Topology
from tests.faults import behind_proxies
from tests.test_accounting import publish, running, usage, wait_until


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
            await publish(exchange, *(usage(f"before-{i}") for i in range(50)))
            await wait_until(accountant, lambda: accountant.rows_inserted == 50)

            # When PostgreSQL goes away and 100 more events arrive
            await proxies["database"].down()
            await publish(exchange, *(usage(f"during-{i}") for i in range(100)))
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
