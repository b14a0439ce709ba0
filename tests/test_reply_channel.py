"""A reply queue failing to come back (a client's, the front door's) never fails a publish, nor
stays unconsumed."""

from __future__ import annotations

import asyncio
import logging

import aio_pika
import openai
import pytest

from frontdoor.chat_request import RequestOptions
from producer import GatewayClient, JobHandle
from producer.replies import REPLY_PREFETCH
from queuegate.keys import Keys
from queuegate.management import BrokerAdmin
from queuegate.redis_client import redis_for
from queuegate.settings import Settings
from queuegate.topology import Topology
from tests.faults import behind_proxies
from tests.frontdoor_support import open_door
from tests.support import consumed, logged, running_gateway

HELLO = [{"role": "user", "content": "Hello"}]
SUBMITTERS = 32
"""Jobs published at a time while the reply queue is refused: on the channel of its consume,
those waiting behind it are lost with the channel, and those awaiting their confirm then (when
the broker is slower to confirm than here) failed with the refusal."""
CALLER_TIMEOUT = 5.0
"""Seconds a front door's caller waits for its answer (x-queuegate-timeout)."""


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
        # the channel the jobs are published on left open, none failed with the refusal's
        # ChannelNotFoundEntity (those awaiting their confirm then, as on a loaded cluster),
        # and the attempt the refusal put in backoff dropped for the one its channel's
        # reopening starts, not left to consume beside it
        await publish_channel_kept_and_one_consumer(admin, queue, caplog)


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


async def test_the_front_doors_reply_queue_refused_at_its_consume_disturbs_no_publish(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        behind_proxies(settings, "amqp") as (through, proxies),
        open_door(settings, door_settings=through) as door,
        # A caller's own bound: one whose result went with the deleted queue is answered
        # deadline_exceeded by then, not left waiting for the SDK's ten minutes.
        door.client(default_headers={"x-queuegate-timeout": f"{CALLER_TIMEOUT:g}"}) as sdk,
        await aio_pika.connect(settings.amqp_url) as admin,
    ):
        caplog.set_level(logging.INFO, logger="queuegate.broker")
        # Given a front door answering requests
        assert (await sdk.chat.completions.create(model="gpt-4o-mini", messages=HELLO)).choices
        queue, proxy = await frontdoor_queue(settings), proxies["amqp"]

        async def request(key: str) -> None:
            try:
                await sdk.chat.completions.create(
                    model="gpt-4o-mini", messages=HELLO, extra_headers={"Idempotency-Key": key}
                )
            except openai.APIStatusError as exc:
                # Ends the deletion itself brings, not the channel: a result sent while the
                # queue was gone is returned to the worker (its caller answered at its
                # timeout), a job whose queue the worker found gone is refused.
                assert exc.status_code == 504 or "does not exist" in exc.message, exc

        # When its reply queue is deleted (the broker cancels the bridge's consumer), and is
        # gone again when the bridge consumes it once it has declared it anew (as when a
        # cluster's node holding it dies meanwhile): the broker refuses the consume with
        # NOT_FOUND, closing the channel it came on. Requests come meanwhile, their jobs
        # published while the consume awaits its answer (held at the consume itself, not at
        # its basic.qos: a channel's publishes wait behind its call under way, and those
        # waiting behind the qos would be sent before the consume).
        proxy.hang_at(consume_frame(queue))
        async with admin.channel() as channel:
            await channel.queue_delete(queue)
        await proxy.hung.wait()
        # Each with an Idempotency-Key: its job's id known here, to see it published.
        keys = [f"during-{i}" for i in range(SUBMITTERS)]
        requests = [asyncio.create_task(request(key)) for key in keys]
        await accepted(settings, keys)
        async with admin.channel() as channel:
            await channel.queue_delete(queue)
        await proxy.up()

        # Expect the queue declared and consumed again, and a request answered after
        await consumed(admin, queue)
        async with asyncio.timeout(CALLER_TIMEOUT + 30):
            await asyncio.gather(*requests)
        answer = await sdk.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
        assert answer.choices[0].message.content
        await publish_channel_kept_and_one_consumer(admin, queue, caplog)


async def publish_channel_kept_and_one_consumer(
    admin: aio_pika.abc.AbstractConnection, queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Assert the channel the jobs are published on was left open (no publish lost with it
    and sent again: those waiting behind the consume) and ``queue`` is read by one consumer."""
    lost = [
        r.getMessage()
        for r in caplog.records
        # Its own lines alone: aio-pika's may name a callback whose repr fails once run.
        if r.name == "queuegate.broker" and r.getMessage().startswith("connection lost")
    ]
    assert lost == []
    async with admin.channel() as channel:
        declared = await channel.declare_queue(queue, passive=True)
        assert declared.declaration_result.consumer_count == 1


def consume_frame(queue: str) -> bytes:
    """The start of a basic.consume of ``queue`` on the wire (class 60, method 20, the
    reserved short, then the queue's name)."""
    name = queue.encode()
    return b"\x00\x3c\x00\x14\x00\x00" + len(name).to_bytes(1, "big") + name


async def frontdoor_queue(settings: Settings) -> str:
    """The reply queue of the namespace's one front-door process (named by its process id)."""
    prefix = Topology.of(settings).frontdoor_queue("")
    async with BrokerAdmin.of(settings) as admin:
        (queue,) = [name for name in await admin.queues() if name.startswith(prefix)]
    return queue


async def accepted(settings: Settings, idempotency_keys: list[str]) -> None:
    """Wait until the front door has taken alpha's requests of these Idempotency-Keys: it
    marks each job accepted (in Redis) just before it publishes it."""
    keys = Keys(settings.redis_prefix)
    accepted = [keys.accepted("alpha", job_id("alpha", key)) for key in idempotency_keys]
    async with redis_for(settings) as redis, asyncio.timeout(10):
        # Polled: nothing announces it.
        while await redis.exists(*accepted) < len(accepted):  # noqa: ASYNC110
            await asyncio.sleep(0.01)


def job_id(team: str, idempotency_key: str) -> str:
    """The id of the job the front door makes of a request with ``idempotency_key``."""
    options = RequestOptions(
        timeout=CALLER_TIMEOUT,
        timeout_named=True,
        idempotency_key=idempotency_key,
        respond_async=False,
    )
    return options.job_id(team)
