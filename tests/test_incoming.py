"""The message a consumer wraps a delivery in (queuegate.broker.Incoming): aio-pika's own, with
the same value in every field, locked and settled as aio-pika's would be."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import aio_pika
import pytest
from aio_pika import IncomingMessage
from aio_pika.abc import AbstractChannel
from aio_pika.message import Message
from aiormq.abc import DeliveredMessage

from queuegate.broker import Incoming, consume
from queuegate.settings import Settings

EVERY_PROPERTY = aio_pika.Message(
    b'{"job": 1}',
    headers={"x-queuegate-sent-ms": 1_700_000_000_000, "x-text": "a", "x-nested": {"b": [1]}},
    content_type="application/json; charset=utf-8",
    content_encoding="identity",
    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    priority=3,
    correlation_id="corr-1",
    reply_to="results-of-tests",
    expiration=60,
    message_id="job-1",
    timestamp=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    type="job",
    user_id="guest",
    app_id="tests",
)
NO_PROPERTY = aio_pika.Message(b"")


def _fields() -> list[str]:
    """Every field of aio-pika's message of a delivery, private ones by their mangled names."""
    names = []
    for cls in (Message, IncomingMessage):
        names += [f"_{cls.__name__}{n}" if n.startswith("__") else n for n in cls.__slots__]
    return names


_MISSING = object()


def _values(message: IncomingMessage) -> dict[str, object]:
    return {name: getattr(message, name, _MISSING) for name in _fields()}


@pytest.fixture
async def channel(settings: Settings) -> AsyncIterator[AbstractChannel]:
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        yield await connection.channel()


async def _delivered(channel: AbstractChannel, queue: str, count: int) -> list[DeliveredMessage]:
    """The next ``count`` deliveries of ``queue``, unsettled, as a consumer's callback gets them."""
    got: list[DeliveredMessage] = []
    arrived = asyncio.Event()

    async def on_message(delivered: DeliveredMessage) -> None:
        got.append(delivered)
        if len(got) == count:
            arrived.set()

    consumer = await consume(channel, queue, on_message, prefetch=count)
    async with asyncio.timeout(10):
        await arrived.wait()
    await consumer.cancel()
    return got


@pytest.mark.parametrize("sent", [EVERY_PROPERTY, NO_PROPERTY], ids=["every property", "none"])
@pytest.mark.parametrize("no_ack", [False, True], ids=["acked", "no_ack"])
async def test_a_delivery_is_the_message_aio_pika_would_make_of_it(
    channel: AbstractChannel, settings: Settings, sent: aio_pika.Message, no_ack: bool
) -> None:
    # Given a message published with these properties, delivered to a consumer
    queue = await channel.declare_queue(f"{settings.namespace}.incoming", auto_delete=False)
    await channel.default_exchange.publish(sent, routing_key=queue.name)
    [delivered] = await _delivered(channel, queue.name, 1)
    # When it is wrapped as a consumer of ours and as aio-pika does
    ours, theirs = Incoming(delivered, no_ack=no_ack), IncomingMessage(delivered, no_ack=no_ack)
    # Expect every field the same (the channel the same object), and as many set
    assert _values(ours) == _values(theirs)
    assert ours.locked == theirs.locked == no_ack
    assert ours.info() == theirs.info()


async def test_a_delivery_is_settled_once_through_it(
    channel: AbstractChannel, settings: Settings
) -> None:
    # Given two deliveries, wrapped as a consumer of ours wraps them
    queue = await channel.declare_queue(f"{settings.namespace}.incoming", auto_delete=False)
    for _ in range(2):
        await channel.default_exchange.publish(EVERY_PROPERTY, routing_key=queue.name)
    first, second = (Incoming(d) for d in await _delivered(channel, queue.name, 2))
    # When one is acked and the other rejected back to its queue
    await first.ack()
    await second.reject(requeue=True)
    # Expect each processed, a second settle refused as aio-pika refuses it, and the rejected
    # one delivered again
    assert first.processed and second.processed
    with pytest.raises(aio_pika.exceptions.MessageProcessError):
        await first.ack()
    [again] = await _delivered(channel, queue.name, 1)
    assert again.redelivered and again.delivery.delivery_tag != second.delivery_tag
