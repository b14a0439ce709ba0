"""A client's reply queue acknowledges its replies together, against the real broker."""

from __future__ import annotations

import asyncio
import uuid
from typing import cast

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustChannel
from aiormq.abc import DeliveredMessage

from producer.replies import Inbox, ReplyAcks, ReplyQueue
from queuegate.broker import Outgoing, connect, consume, json_message, publish
from queuegate.messages import ChatResult, GatewayInfo
from queuegate.settings import Settings
from queuegate.topology import MESSAGE_TYPE_RESULT, Topology
from tests.proxy import TcpProxy

REPLIES = 20
ACK_FRAME = 21
"""Bytes of one basic.ack frame: header 7, class and method 4, delivery tag 8, flags 1, end 1."""


def result_message(job_id: str) -> Outgoing:
    result = ChatResult(
        job_id=job_id,
        team="alpha",
        status="ok",
        gateway=GatewayInfo(model_requested="gpt-4o-mini"),
    )
    return json_message(
        result.model_dump_json().encode(),
        message_type=MESSAGE_TYPE_RESULT,
        correlation_id=result.job_id,
    )


async def test_replies_handed_over_together_are_acknowledged_with_one_ack_and_none_left(
    settings: Settings,
) -> None:
    name = Topology(settings.namespace).replies_queue("alpha", uuid.uuid4().hex)

    async def declare(channel: AbstractRobustChannel) -> str:
        await channel.declare_queue(name, durable=True, arguments={"x-expires": 60_000})
        return name

    inbox = Inbox()
    futures = [inbox.replies.expect(f"job-{i}") for i in range(REPLIES)]
    worker = await aio_pika.connect(settings.amqp_url)
    async with worker, TcpProxy(settings.amqp_url) as proxy:
        # Given results waiting in a pipeline's named queue, as a worker answers a burst of jobs
        answering = await worker.channel(publisher_confirms=True)
        await declare(answering)
        for i in range(REPLIES):
            await publish(answering, result_message(f"job-{i}"), exchange="", routing_key=name)

        # When its client starts reading it, and has handed every one over
        connection = await connect(proxy.url, name="test-reply-acks")
        async with connection:
            replies = ReplyQueue(inbox, declare=declare)  # named: kept, as a pipeline's
            await replies.start(connection)
            started = proxy.requested
            async with asyncio.timeout(30):
                await asyncio.gather(*futures)

            # Expect it to have sent no ack per reply: at most one, for those handed over
            # before the linger passed
            assert proxy.requested - started <= ACK_FRAME

            # and, once it stops, every reply acknowledged: none left for the queue's next
            # owner
            await replies.stop()
            await connection.close()
        left = await answering.declare_queue(name, passive=True)
        assert left.declaration_result.message_count == 0
        await answering.queue_delete(name)


class HeldFirstAck:
    """A consuming channel whose first ack is held back until ``release`` is set, as aiormq's
    writer holds one: it writes through a queue of ten frames, and while RabbitMQ's flow
    control leaves the connection unread an ack waits there for a slot; asyncio.Queue keeps no
    order among the frames waiting (one woken for a slot can lose it to a newcomer and wait
    again at the back), so an ack requested later can reach the broker first."""

    def __init__(self, channel: aiormq.abc.AbstractChannel) -> None:
        self._channel = channel
        self.holding = asyncio.Event()
        self.release = asyncio.Event()
        self.written: list[int] = []
        """The tags of the acks passed on to the channel, in order."""

    @property
    def is_closed(self) -> bool:
        return self._channel.is_closed

    async def basic_ack(self, delivery_tag: int, multiple: bool = False, wait: bool = True) -> None:
        if not self.holding.is_set():
            self.holding.set()
            await self.release.wait()
        self.written.append(delivery_tag)
        await self._channel.basic_ack(delivery_tag, multiple=multiple, wait=wait)


async def test_a_multiple_ack_held_back_is_never_overtaken_by_a_later_one(
    settings: Settings,
) -> None:
    name = f"{settings.namespace}.replies"
    connection = await connect(settings.amqp_url, name="test-reply-acks-order")
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(name, arguments={"x-expires": 60_000})
        for i in range(2):
            await publish(channel, result_message(f"job-{i}"), exchange="", routing_key=name)
        tags: list[int] = []
        both = asyncio.Event()

        async def delivered(message: DeliveredMessage) -> None:
            assert message.delivery_tag is not None
            tags.append(message.delivery_tag)
            if len(tags) == 2:
                both.set()

        consumer = await consume(channel, name, delivered, prefetch=10)
        async with asyncio.timeout(10):
            await both.wait()
        held = HeldFirstAck(consumer.channel)
        acks = ReplyAcks()
        held_channel = cast(aiormq.abc.AbstractChannel, held)

        # Given the first reply's ack on its way, held up in the connection's writer
        acks.handed_over(held_channel, tags[0])
        acks.flush()
        async with asyncio.timeout(10):
            await held.holding.wait()

        # When the second reply is acknowledged meanwhile, and then the writer moves on
        acks.handed_over(held_channel, tags[1])
        acks.flush()
        held.release.set()
        async with asyncio.timeout(10):
            await acks.close()

        # Expect the channel still open (a round trip on it answered): the later multiple
        # ack, sent first, would have settled the earlier one's tag, which the broker then
        # refuses (PRECONDITION_FAILED - unknown delivery tag), closing the channel and failing
        # every publish on it; the acks were written in the order of their tags
        await consumer.channel.queue_declare(name, passive=True)
        assert held.written == tags
        await connection.close()

    # and both replies settled: none came back to the queue when the connection closed
    async with await connect(settings.amqp_url, name="test-reply-acks-left") as checking:
        left = await (await checking.channel()).declare_queue(name, passive=True)
        assert left.declaration_result.message_count == 0
