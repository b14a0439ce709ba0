"""A dropped broker connection: producer, worker and accounting carry on without an operator."""

from __future__ import annotations

import asyncio

import aio_pika
import pytest
from aio_pika.exceptions import ChannelNotFoundEntity
from aiormq.exceptions import ChannelInvalidStateError

from frontdoor.auth import Caller
from frontdoor.bridge import Bridge
from mockprovider import Behavior, MockConfig
from producer import GatewayClient
from queuegate.broker import Delivery, connect, json_message, publish, when_connected
from queuegate.errors import ServiceUnavailable
from queuegate.messages import ChatJob
from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from queuegate.topology import Topology
from tests.faults import RECONNECT_INTERVAL, behind_proxies
from tests.frontdoor_support import issue_key
from tests.proxy import TcpProxy
from tests.support import consumed, running_gateway, wait_until
from tests.teams import register

HELLO = [{"role": "user", "content": "Hello there"}]
OUTAGE = 0.5
"""Seconds the broker stays unreachable: long enough for every connection to notice."""
RENEWED_PUBLISHES, RENEWED_ROUNDS = 300, 3
"""Publishes at a time when their channel is closed for a fresh one, and the times it is: some
are awaiting their confirm then, though not always (they may all be confirmed together)."""


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


async def _gone_while_away(settings: Settings, proxy: TcpProxy, queue: str) -> None:
    """Cut the owner's connection and delete its reply queue meanwhile, as the broker does
    once the queue has gone unused past its expiry; then let the owner reconnect, and wait
    until the queue is back and consumed."""
    await proxy.down()
    admin = await aio_pika.connect(settings.amqp_url)
    async with admin:
        async with admin.channel() as channel:
            await channel.queue_delete(queue)
        await proxy.up()
        await consumed(admin, queue)


async def _exists(settings: Settings, queue: str) -> bool:
    admin = await aio_pika.connect(settings.amqp_url)
    async with admin:
        try:
            async with admin.channel() as channel:
                await channel.declare_queue(queue, passive=True)
        except ChannelNotFoundEntity:
            return False
    return True


async def test_a_clients_reply_queue_gone_while_it_was_away_is_opened_again(
    settings: Settings,
) -> None:
    async with (
        behind_proxies(settings, "amqp") as (through, proxies),
        running_gateway(settings) as gw,
    ):
        # Given a client with a reply queue of its own, and one with a named queue
        async with (
            GatewayClient(through, team="alpha") as client,
            GatewayClient(settings, team="alpha", reply_queue="nightly") as named,
        ):
            own, kept = client.reply_to, named.reply_to
            # When its queue goes while its connection is down (it expired meanwhile)
            await _gone_while_away(settings, proxies["amqp"], own)
            # Expect it asked for again on reconnect, consumed, and replies arriving there
            assert (await client.chat("gpt-4o-mini", HELLO, timeout=15)).status == "ok"
            assert gw.mock.stats.calls == 1
        # and, once the clients close, their own queue deleted, the named one kept for the
        # next client of that name
        assert not await _exists(settings, own)
        assert await _exists(settings, kept)


async def test_the_front_doors_reply_queue_gone_while_it_was_away_is_declared_again(
    settings: Settings,
) -> None:
    await register(settings, "alpha", TeamConfig())
    key_id, key = await issue_key(settings, "alpha")
    caller = Caller("alpha", key_id, key)
    job = ChatJob(job_id="after-reconnect", team="alpha", model="gpt-4o-mini", messages=HELLO)
    async with (
        behind_proxies(settings, "amqp") as (through, proxies),
        running_gateway(settings) as gw,
    ):
        # Given a front-door process's bridge and its reply queue
        async with Bridge(through) as bridge:
            queue = bridge.reply_queue
            # When the queue goes while the bridge's connection is down
            await _gone_while_away(settings, proxies["amqp"], queue)
            # Expect it declared again on reconnect, consumed, and the job's answer there
            await bridge.submit(job, caller)
            result = await bridge.wait(job.job_id, 15)
            assert result.status == "ok", result.error
            assert gw.mock.stats.calls == 1
        # and deleted once the bridge closes
        assert not await _exists(settings, queue)


async def test_a_publish_awaiting_its_confirm_when_the_connection_is_found_stuck_is_sent_again(
    settings: Settings,
) -> None:
    # Given a connection with a 1 s heartbeat through a proxy, and a queue to publish to
    async with TcpProxy(settings.amqp_url) as proxy:
        url = f"{proxy.url}?heartbeat=1&reconnect_interval={RECONNECT_INTERVAL}"
        connection = await connect(url, name="test-stuck-confirm")
        async with connection:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            queue = await channel.declare_queue(exclusive=True)
            lost = asyncio.Event()
            connection.close_callbacks.add(lambda *_: lost.set())
            # When the broker freezes with a publish awaiting its confirm, until the client
            # finds the connection stuck (missed heartbeats) and the broker comes back
            proxy.hang()
            message = json_message(b"{}", message_type="test")
            publishing = asyncio.create_task(
                when_connected(
                    channel,
                    lambda: publish(channel, message, exchange="", routing_key=queue.name),
                    within=60,
                    what="publishing a test message",
                )
            )
            async with asyncio.timeout(30):
                await lost.wait()
            await proxy.up()
            # Expect the publish sent again on the new connection, not failed as cancelled
            async with asyncio.timeout(30):
                await publishing
            assert not publishing.cancelled()


async def test_a_delivery_settled_twice_is_acked_once_and_its_channel_stays_open(
    settings: Settings,
) -> None:
    # Given a delivery a consumer holds as a Delivery (what a worker keeps while it waits)
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(f"{settings.namespace}.twice", exclusive=True)
        await channel.default_exchange.publish(aio_pika.Message(b"x"), routing_key=queue.name)
        underlay = await channel.get_underlay_channel()
        delivery = Delivery(await underlay.basic_get(queue.name))
        # When it is acked, then acked and nacked again
        await delivery.ack()
        await delivery.ack()
        await delivery.nack(requeue=True)
        # Expect the channel open (a second settle of a tag would close it) and the queue empty
        declared = await channel.declare_queue(queue.name, passive=True)
        assert not channel.is_closed
        assert declared.declaration_result.message_count == 0


async def test_publishes_awaiting_their_confirm_when_their_channel_is_renewed_are_sent_again(
    settings: Settings,
) -> None:
    # Given a robust channel publishing persistent messages to a quorum queue, which confirms
    # them once written, a few hundred at a time
    connection = await connect(settings.amqp_url, name="test-renewed-confirms")
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        queue = await channel.declare_queue(
            f"{settings.namespace}.renewed", durable=True, arguments={"x-queue-type": "quorum"}
        )
        message = json_message(b"{}", message_type="test")
        for _ in range(RENEWED_ROUNDS):
            publishing = [
                asyncio.create_task(
                    when_connected(
                        channel,
                        lambda: publish(channel, message, exchange="", routing_key=queue.name),
                        within=30,
                        what="publishing a test message",
                    )
                )
                for _ in range(RENEWED_PUBLISHES)
            ]
            # When, once the first is confirmed (others then await theirs), the channel is
            # closed from this side for a fresh one, as a publish that waited too long for its
            # confirm has it closed, or publishes refused for seconds
            await asyncio.wait(publishing, return_when=asyncio.FIRST_COMPLETED)
            underlay = await channel.get_underlay_channel()
            await underlay.close(ChannelInvalidStateError("a fresh channel"))
            # Expect every publish sent again on the fresh channel and confirmed there, none
            # failed with the ChannelClosed aiormq rejects the closed channel's confirms with
            async with asyncio.timeout(30):
                await asyncio.gather(*publishing)
