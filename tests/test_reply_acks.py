"""A client's reply queue acknowledges its replies together, against the real broker."""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
from aio_pika.abc import AbstractRobustChannel

from producer.replies import Inbox, ReplyQueue
from queuegate.broker import connect, json_message, publish
from queuegate.messages import ChatResult, GatewayInfo
from queuegate.settings import Settings
from queuegate.topology import MESSAGE_TYPE_RESULT, Topology
from tests.proxy import TcpProxy

REPLIES = 20
ACK_FRAME = 21
"""Bytes of one basic.ack frame: header 7, class and method 4, delivery tag 8, flags 1, end 1."""


async def test_replies_handed_over_together_are_acknowledged_with_one_ack_and_none_left(
    settings: Settings,
) -> None:
    name = Topology(settings.namespace).replies_queue("alpha", uuid.uuid4().hex)

    async def declare(channel: AbstractRobustChannel) -> str:
        await channel.declare_queue(name, durable=True, arguments={"x-expires": 60_000})
        return name

    inbox = Inbox()
    futures = [inbox.replies.expect(f"job-{i}") for i in range(REPLIES)]
    async with TcpProxy(settings.amqp_url) as proxy:
        connection = await connect(proxy.url, name="test-reply-acks")
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            replies = ReplyQueue(inbox, declare=declare)  # named: kept, as a pipeline's
            await replies.start(channel)
            sent_before = proxy.requested

            # Given results sent to the queue at once, as a worker answers a burst of jobs
            worker = await aio_pika.connect(settings.amqp_url)
            async with worker:
                answering = await worker.channel(publisher_confirms=True)
                for i in range(REPLIES):
                    result = ChatResult(
                        job_id=f"job-{i}",
                        team="alpha",
                        status="ok",
                        gateway=GatewayInfo(model_requested="gpt-4o-mini"),
                    )
                    message = json_message(
                        result.model_dump_json().encode(),
                        message_type=MESSAGE_TYPE_RESULT,
                        correlation_id=result.job_id,
                    )
                    await publish(answering, message, exchange="", routing_key=name)

                # When the client has handed every one over
                async with asyncio.timeout(30):
                    await asyncio.gather(*futures)

                # Expect it to have sent no ack per reply: at most one, for those handed over
                # before the linger passed
                assert proxy.requested - sent_before <= ACK_FRAME

                # and, once it stops, every reply acknowledged: none left for the queue's next
                # owner
                await replies.stop()
                await connection.close()
                left = await answering.declare_queue(name, passive=True)
                assert left.declaration_result.message_count == 0
                await answering.queue_delete(name)
