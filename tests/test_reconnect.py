"""A dropped broker connection: producer, worker and accounting carry on without an operator."""

from __future__ import annotations

import asyncio

import aio_pika
import pytest

from mockprovider import Behavior, MockConfig
from producer import GatewayClient
from queuegate.errors import ServiceUnavailable
from queuegate.settings import Settings
from queuegate.topology import Topology
from tests.faults import behind_proxies
from tests.support import consumed, running_gateway, wait_until

HELLO = [{"role": "user", "content": "Hello there"}]
OUTAGE = 0.5
"""Seconds the broker stays unreachable: long enough for every connection to notice."""


async def test_a_reply_sent_while_the_producer_is_disconnected_still_arrives(
    settings: Settings,
) -> None:
    # Given a producer reaching RabbitMQ through a proxy, and a provider taking 0.3 s a call
    slow = MockConfig(default=Behavior(latency_ms=300))
    async with (
        behind_proxies(settings, "amqp") as (through, proxies),
        running_gateway(settings, mock_config=slow) as gw,
        GatewayClient(through, team="alpha") as client,
    ):
        handle = await client.submit(client.job("gpt-4o-mini", HELLO))

        # When the producer's connection drops and the result is published meanwhile
        await proxies["amqp"].down()
        [row] = await gw.usage_rows(1)  # usage goes out after the result: the result is sent
        await proxies["amqp"].up()

        # Expect the result waiting on the client's own reply queue, delivered after reconnect
        result = await handle.result(timeout=15)
        assert result.status == "ok"
        assert row["job_id"] == handle.job_id and row["reply_delivered"]


async def test_a_worker_whose_team_queue_is_deleted_declares_it_again_and_serves_it(
    settings: Settings,
) -> None:
    queue = Topology(settings.namespace).team_queue("alpha")
    admin = await aio_pika.connect(settings.amqp_url)
    async with admin, running_gateway(settings) as gw, gw.client("alpha") as client:
        # Given a worker serving team alpha
        assert (await client.chat("gpt-4o-mini", HELLO, timeout=10)).status == "ok"

        # When an operator deletes the team's queue under it
        async with admin.channel() as channel:
            await channel.queue_delete(queue)

        # Expect the queue back, consumed again, and new jobs answered
        await consumed(admin, queue)
        assert (await client.chat("gpt-4o-mini", HELLO, timeout=10)).status == "ok"


async def test_a_job_in_flight_when_the_worker_loses_the_broker_completes_once(
    settings: Settings,
) -> None:
    # Given producer, worker and accounting all reaching RabbitMQ through one proxy,
    # and a provider taking 1 s per call
    slow = MockConfig(default=Behavior(latency_ms=1000))
    async with (
        behind_proxies(settings, "amqp") as (through, proxies),
        running_gateway(settings, mock_config=slow, components=through) as gw,
        gw.client("alpha") as client,
    ):
        handle = await client.submit(client.job("gpt-4o-mini", HELLO))
        await wait_until(lambda: gw.worker.in_flight == 1)

        # When the broker connection drops while the job is at the provider, then returns
        await proxies["amqp"].down()
        await asyncio.sleep(OUTAGE)
        await proxies["amqp"].up()

        # Expect one result, the call in flight not made again (its redelivery answered
        # from the outcome it stored), one usage row, and the whole path serving new jobs
        result = await handle.result(timeout=15)
        assert result.status == "ok"
        [row] = await gw.usage_rows(1, timeout=15)
        assert row["job_id"] == handle.job_id
        await wait_until(lambda: gw.worker.in_flight == 0, timeout=15)
        assert gw.mock.stats.calls == 1
        again = await client.chat("gpt-4o-mini", HELLO, timeout=15)
        assert again.status == "ok"
        assert len(await gw.usage_rows(2, timeout=15)) == 2


async def test_a_submit_during_an_outage_waits_for_the_connection(settings: Settings) -> None:
    async with (
        behind_proxies(settings, "amqp") as (through, proxies),
        running_gateway(settings, components=through) as gw,
        gw.client("alpha") as client,
    ):
        # Given the broker unreachable
        await proxies["amqp"].down()
        # When a job is submitted, and the broker returns meanwhile
        submitting = asyncio.create_task(client.submit(client.job("gpt-4o-mini", HELLO)))
        await asyncio.sleep(OUTAGE)
        assert not submitting.done()
        await proxies["amqp"].up()
        # Expect the submit to go through once the connection is back, and the job answered
        handle = await asyncio.wait_for(submitting, timeout=15)
        result = await handle.result(timeout=15)
        assert result.status == "ok"


async def test_a_submit_fails_clearly_when_the_broker_stays_away(settings: Settings) -> None:
    async with (
        behind_proxies(settings, "amqp") as (through, proxies),
        running_gateway(settings, components=through),
    ):
        # Given a client that waits 0.3 s for a lost connection, and the broker gone for good
        impatient = through.model_copy(update={"reconnect_wait": 0.3})
        async with GatewayClient(impatient, team="alpha") as c:
            await proxies["amqp"].down()
            # When it submits, expect a clear error rather than a hang
            with pytest.raises(ServiceUnavailable, match="did not come back within"):
                await c.submit(c.job("gpt-4o-mini", HELLO))
            await proxies["amqp"].up()
