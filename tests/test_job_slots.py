"""A worker's held jobs of one team: at most its slots started at once, the others waiting
as bare deliveries, started in arrival order as slots free, and returned by a drain."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection
from aiormq.abc import DeliveredMessage

from queuegate.broker import Delivery
from queuegate.settings import Settings
from workers.job_slots import JobSlots

JOBS = 6
LIMIT = 2


class Started:
    """What a JobSlots started and dropped, in order."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.deliveries: list[Delivery] = []
        self.dropped = 0

    def start(self, delivered: DeliveredMessage, delivery: Delivery) -> None:
        self.bodies.append(delivered.body)
        self.deliveries.append(delivery)

    def drop(self) -> None:
        self.dropped += 1


async def _queue(direct: AbstractChannel, settings: Settings) -> str:
    queue = await direct.declare_queue(f"{settings.namespace}.slots", auto_delete=False)
    for i in range(JOBS):
        await direct.default_exchange.publish(aio_pika.Message(b"%d" % i), routing_key=queue.name)
    return queue.name


@dataclass
class Held:
    queue: str
    started: Started
    connection: AbstractConnection
    channel: AbstractChannel
    consumer_tag: str
    slots: JobSlots


@pytest.fixture
async def held(settings: Settings, direct: AbstractChannel) -> AsyncIterator[Held]:
    """JOBS messages in a queue of the test's own, all held by its consumer in a JobSlots of
    LIMIT slots; the queue deleted after the test."""
    queue = await _queue(direct, settings)
    try:
        yield await _held(settings, queue, Started())
    finally:
        await direct.queue_delete(queue)


async def _held(settings: Settings, queue: str, started: Started) -> Held:
    """A consumer of ``queue`` holding every message in a JobSlots of LIMIT slots."""
    connection = await aio_pika.connect(settings.amqp_url)
    channel = await connection.channel()
    underlay = await channel.get_underlay_channel()
    await underlay.basic_qos(prefetch_count=JOBS)
    slots = JobSlots(started.start, started.drop, limit=LIMIT)
    arrived = asyncio.Event()

    async def on_message(delivered: DeliveredMessage) -> None:
        slots.arrived(delivered)
        if len(slots) == JOBS:
            arrived.set()

    ok = await underlay.basic_consume(queue, on_message)
    assert ok.consumer_tag is not None
    async with asyncio.timeout(10):
        await arrived.wait()
    return Held(queue, started, connection, channel, ok.consumer_tag, slots)


async def _taken_by_another(settings: Settings, queue: str, count: int) -> list[bytes]:
    """The bodies of ``count`` messages another consumer of ``queue`` receives (and acks)."""
    bodies: list[bytes] = []
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        async with declared.iterator() as messages, asyncio.timeout(10):
            async for message in messages:
                await message.ack()
                bodies.append(message.body)
                if len(bodies) == count:
                    break
    return bodies


async def test_jobs_past_the_slots_wait_and_start_in_arrival_order_as_slots_free(
    settings: Settings, held: Held
) -> None:
    # Given a team's slots (2) holding 6 deliveries
    queue, started, slots = held.queue, held.started, held.slots
    async with held.connection:
        # Expect the first two started, the other four held but not started
        assert started.bodies == [b"0", b"1"]
        assert (slots.running, len(slots)) == (LIMIT, JOBS)
        # When one ends, expect the next in arrival order started
        slots.ended()
        assert started.bodies == [b"0", b"1", b"2"]
        assert len(slots) == JOBS - 1
        # And the started ones settled through their Delivery, nothing else of them kept
        await asyncio.gather(*(delivery.ack() for delivery in started.deliveries))
        for _ in started.deliveries[1:]:
            slots.ended()
        assert started.bodies == [b"0", b"1", b"2", b"3", b"4"]
    # And once the connection is gone, what was still held is back in the queue, the acked
    # ones not
    assert sorted(await _taken_by_another(settings, queue, JOBS - 3)) == [b"3", b"4", b"5"]


async def test_a_waiting_job_whose_channel_closed_is_dropped_not_started(
    settings: Settings, held: Held
) -> None:
    # Given 2 started and 4 waiting
    queue, started, slots = held.queue, held.started, held.slots
    # When the connection closes (the broker delivers the held ones again) and then the
    # started ones end
    await held.connection.close()
    slots.ended()
    slots.ended()
    # Expect none of the waiting ones started (a provider call for a job no longer this
    # worker's), each told as dropped, and nothing held
    assert started.bodies == [b"0", b"1"]
    assert started.dropped == JOBS - LIMIT
    assert len(slots) == 0
    # And every job back in the queue for the next worker
    assert len(set(await _taken_by_another(settings, queue, JOBS))) == JOBS


async def test_a_drain_returns_the_waiting_jobs_at_once(settings: Settings, held: Held) -> None:
    # Given 2 started and 4 waiting, the connection kept open
    queue, started, slots = held.queue, held.started, held.slots
    async with held.connection:
        # When its consumer is cancelled and the waiting ones taken and returned (as a
        # worker's drain does)
        underlay = await held.channel.get_underlay_channel()
        await underlay.basic_cancel(held.consumer_tag)
        waiting = slots.take_all()
        await asyncio.gather(*(delivery.nack(requeue=True) for delivery in waiting))
        # Expect the four delivered to another consumer while the connection is still open
        # (the two started still held by it), and the started ones' slots ending start
        # nothing more
        assert sorted(await _taken_by_another(settings, queue, JOBS - LIMIT)) == [
            b"2",
            b"3",
            b"4",
            b"5",
        ]
        slots.ended()
        slots.ended()
        assert started.bodies == [b"0", b"1"]
        assert len(slots) == 0
        await asyncio.gather(*(delivery.ack() for delivery in started.deliveries))
