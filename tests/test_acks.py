"""Acknowledging a worker's deliveries: those settled together go as one multiple ack, which
never covers a delivery still held."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection
from aiormq.abc import DeliveredMessage

from queuegate.broker import Delivery
from queuegate.settings import Settings
from tests.proxy import TcpProxy

JOBS = 20
ACK_FRAME = 21
"""Bytes of one basic.ack frame: 7 of header, 4 of method, 8 of tag, 1 of flags, 1 of end."""


async def _queue_of(channel: AbstractChannel, settings: Settings) -> str:
    queue = await channel.declare_queue(f"{settings.namespace}.acks", auto_delete=False)
    for i in range(JOBS):
        await channel.default_exchange.publish(aio_pika.Message(b"%d" % i), routing_key=queue.name)
    return queue.name


async def _deliveries(connection: AbstractConnection, queue: str) -> list[Delivery]:
    """Every message of ``queue``, each held as a Delivery made as it arrives (as a worker's)."""
    channel = await connection.channel()
    underlay = await channel.get_underlay_channel()
    await underlay.basic_qos(prefetch_count=JOBS)
    held: list[Delivery] = []
    all_in = asyncio.Event()

    async def on_message(delivered: DeliveredMessage) -> None:
        held.append(Delivery(delivered))
        if len(held) == JOBS:
            all_in.set()

    await underlay.basic_consume(queue, on_message)
    async with asyncio.timeout(10):
        await all_in.wait()
    return held


@dataclass
class Held:
    queue: str
    proxy: TcpProxy
    connection: AbstractConnection
    deliveries: list[Delivery]


@contextlib.asynccontextmanager
async def _held_through_proxy(settings: Settings, direct: AbstractChannel) -> AsyncIterator[Held]:
    """A consumer holding every message of a queue of its own, its connection behind a proxy
    counting its bytes."""
    queue = await _queue_of(direct, settings)
    async with TcpProxy(settings.amqp_url) as proxy:
        connection = await aio_pika.connect(proxy.url)
        async with connection:
            yield Held(queue, proxy, connection, await _deliveries(connection, queue))


async def _left(channel: AbstractChannel, queue: str) -> int:
    declared = await channel.declare_queue(queue, passive=True)
    assert declared.declaration_result.message_count is not None
    return declared.declaration_result.message_count


async def test_deliveries_acked_together_go_as_one_ack_and_none_comes_back(
    settings: Settings, direct: AbstractChannel
) -> None:
    # Given a consumer holding 20 deliveries, its connection behind a proxy counting its bytes
    async with _held_through_proxy(settings, direct) as held:
        queue, proxy = held.queue, held.proxy
        channel = await held.connection.channel()
        # (what a passive declare sends, to tell the acks' bytes from it)
        before = proxy.requested
        await channel.declare_queue(queue, passive=True)
        declare = proxy.requested - before
        # When every one is acked in the same turn of the loop (as a usage batch's
        # confirm releases its jobs)
        before = proxy.requested
        await asyncio.gather(*(delivery.ack() for delivery in held.deliveries))
        # (a round trip behind the acks, on the same connection, so they have gone through)
        await channel.declare_queue(queue, passive=True)
        # Expect one ack frame for the 20, not one each
        assert proxy.requested - before - declare == ACK_FRAME
        # And once the connection is cut, none of them back in the queue
        await proxy.down()
    assert await _left(direct, queue) == 0
    await direct.queue_delete(queue)


async def test_a_multiple_ack_never_covers_a_delivery_still_held(
    settings: Settings, direct: AbstractChannel
) -> None:
    # Given a consumer holding 20 deliveries through a proxy
    async with _held_through_proxy(settings, direct) as held:
        queue, proxy, connection = held.queue, held.proxy, held.connection
        # When the first is still in flight, the second refused (dropped) and the rest are
        # acked, all in one turn
        lowest, refused, *rest = held.deliveries
        await asyncio.gather(refused.nack(requeue=False), *(delivery.ack() for delivery in rest))
        # Expect the channel still open (no tag settled twice)
        channel = await connection.channel()
        await channel.declare_queue(queue, passive=True)
        assert not connection.is_closed
        # And, once the connection is cut, the one in flight back in the queue, alone
        await proxy.down()
        del lowest
    async with asyncio.timeout(10):
        async with (await direct.get_queue(queue)).iterator() as messages:
            async for message in messages:
                assert message.body == b"0"
                assert message.redelivered
                await message.ack()
                break
    assert await _left(direct, queue) == 0
    await direct.queue_delete(queue)
