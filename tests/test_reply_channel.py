"""A client's reply queue failing to come back never fails its publishes, nor stays unconsumed."""

from __future__ import annotations

import asyncio
import logging

import aio_pika
import pytest

from producer import GatewayClient, JobHandle
from producer.replies import REPLY_PREFETCH
from queuegate.settings import Settings
from tests.faults import behind_proxies
from tests.support import consumed, logged, running_gateway

HELLO = [{"role": "user", "content": "Hello"}]
SUBMITTERS = 32
"""Jobs published at a time while the reply queue is refused: on the channel of its consume,
those waiting behind it are lost with the channel, and those awaiting their confirm then (when
the broker is slower to confirm than here) failed with the refusal."""


def reply_qos_frame() -> bytes:
    """The basic.qos a reply queue's consumer is set up with on the wire (class 60, method 10,
    no size limit, a prefetch of REPLY_PREFETCH, not global): sent just before its consume."""
    return b"\x00\x3c\x00\x0a\x00\x00\x00\x00" + REPLY_PREFETCH.to_bytes(2, "big") + b"\x00"


async def test_a_reply_queue_refused_at_its_consume_disturbs_no_publish(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        behind_proxies(settings, "amqp") as (through, proxies),
        running_gateway(settings),
        GatewayClient(through, team="alpha") as client,
        await aio_pika.connect(settings.amqp_url) as admin,
    ):
        caplog.set_level(logging.INFO, logger="queuegate.broker")
        # Given a client publishing jobs steadily, a few dozen at a time
        queue, proxy = client.reply_to, proxies["amqp"]
        done = asyncio.Event()

        async def submitting() -> list[JobHandle]:
            handles = []
            while not done.is_set():
                handles.append(await client.submit(client.job("gpt-4o-mini", HELLO)))
            return handles

        submitters = [asyncio.create_task(submitting()) for _ in range(SUBMITTERS)]

        # When its reply queue is deleted (the broker cancels its consumer), and is gone again
        # when the client consumes it once the gateway has declared it anew (as when a
        # cluster's node holding it dies meanwhile): the broker refuses the consume with
        # NOT_FOUND, closing the channel it came on
        proxy.hang_at(reply_qos_frame())
        async with admin.channel() as channel:
            await channel.queue_delete(queue)
        await proxy.hung.wait()
        async with admin.channel() as channel:
            await channel.queue_delete(queue)
        await proxy.up()

        # Expect the queue declared and consumed again, and the jobs published since answered
        await consumed(admin, queue)
        done.set()
        async with asyncio.timeout(30):
            published = [h for handles in await asyncio.gather(*submitters) for h in handles]
        assert published
        assert (await client.chat("gpt-4o-mini", HELLO, timeout=30)).status == "ok"
        assert client.reply_to == queue
        # the channel the jobs are published on left open: no publish lost with it and
        # sent again (those waiting behind the consume), none failed with the refusal's
        # ChannelNotFoundEntity (those awaiting their confirm then, as on a loaded cluster)
        lost = [
            r
            for r in caplog.records
            # Its own lines alone: aio-pika's may name a callback whose repr fails once run.
            if r.name == "queuegate.broker" and r.getMessage().startswith("connection lost")
        ]
        assert lost == []
        # and the queue read by one consumer: the attempt the refusal put in backoff is
        # dropped for the one its channel's reopening starts, not left to consume beside it
        async with admin.channel() as channel:
            declared = await channel.declare_queue(queue, passive=True)
            assert declared.declaration_result.consumer_count == 1


async def test_a_reply_queue_the_gateway_cannot_declare_after_a_reconnect_is_asked_again(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        behind_proxies(settings, "amqp") as (through, amqp),
        behind_proxies(settings, "redis") as (gateway_side, redis),
        running_gateway(settings, components=gateway_side),
        GatewayClient(through, team="alpha") as client,
        await aio_pika.connect(settings.amqp_url) as admin,
    ):
        # Given a client whose connection drops while the gateway's Redis, which counts the
        # team's reply queues, is away
        assert (await client.chat("gpt-4o-mini", HELLO, timeout=30)).status == "ok"
        await redis["redis"].down()
        await amqp["amqp"].down()

        # When the connection comes back, the gateway refusing to declare the reply queue
        # (ServiceUnavailable), then Redis comes back
        with logged("producer.replies", "could not consume reply queue") as refused:
            await amqp["amqp"].up()
            await refused.wait()
        await redis["redis"].up()

        # Expect the queue asked for again until it is consumed, and a job answered on it,
        # the refusal logged once for the outage
        await consumed(admin, client.reply_to)
        assert (await client.chat("gpt-4o-mini", HELLO, timeout=30)).status == "ok"
        warnings = [
            r
            for r in caplog.records
            if r.name == "producer.replies" and r.levelno == logging.WARNING
        ]
        assert len(warnings) == 1
