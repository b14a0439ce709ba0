"""A worker's Publisher against the real broker: how many results it hands to aiormq at once."""

from __future__ import annotations

import asyncio
import uuid

import aiormq
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from queuegate.broker import connect
from queuegate.settings import Settings
from queuegate.topology import Topology
from tests.proxy import TcpProxy
from workers.publisher import REPLIES_IN_FLIGHT, Publisher

WAITING = 300
"""Results beyond REPLIES_IN_FLIGHT that wait their turn."""
MARKER = b"first-of-the-burst"
"""In the first result's body: once it is sent, the broker's confirms no longer come back."""


class Arrivals:
    """The results a reply queue's reader has received, by job id."""

    def __init__(self, wanted: int) -> None:
        self.jobs: set[str] = set()
        self.copies = 0
        self._wanted = wanted
        self.first = asyncio.Event()
        """Set once REPLIES_IN_FLIGHT have arrived."""
        self.all = asyncio.Event()
        """Set once every job's result has."""

    async def __call__(self, message: AbstractIncomingMessage) -> None:
        self.copies += 1
        self.jobs.add(message.correlation_id or "")
        if self.copies >= REPLIES_IN_FLIGHT:
            self.first.set()
        if len(self.jobs) == self._wanted:
            self.all.set()


class OneChannel:
    """Every team's results on one channel, as ``TeamReplies``."""

    def __init__(self, channel: AbstractChannel) -> None:
        self._channel = channel

    async def replies(self, team: str) -> AbstractChannel:
        return self._channel


async def test_results_past_the_bound_wait_their_turn_outside_aiormq_and_none_is_lost(
    settings: Settings,
) -> None:
    name = Topology(settings.namespace).replies_queue("alpha", uuid.uuid4().hex)
    bodies = [MARKER] + [b'{"n": %d}' % i for i in range(1, REPLIES_IN_FLIGHT + WAITING)]
    arrivals = Arrivals(len(bodies))
    async with (
        TcpProxy(settings.amqp_url) as proxy,
        # The reader's connection does not pass through the proxy.
        await connect(settings.amqp_url, name="test-publisher-reader") as reader,
    ):
        reading = await reader.channel()
        queue = await reading.declare_queue(name, durable=True, arguments={"x-expires": 60_000})
        await queue.consume(arrivals, no_ack=True)
        connection = await connect(proxy.url, name="test-publisher")
        async with connection:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            replies = await connection.channel(publisher_confirms=True, on_return_raises=True)
            usage = await channel.declare_exchange(f"{settings.namespace}.test-usage")
            publisher = Publisher(
                channel,
                usage,
                usage,
                replies=OneChannel(replies),
                reconnect_wait=30,
                user_id=None,
                keeps_results=lambda _: True,
                bounded=lambda _: True,
            )
            underlay = await replies.get_underlay_channel()
            assert isinstance(underlay, aiormq.Channel)
            sent_before = underlay.delivery_tag

            # Given a broker whose confirms stop coming back once a burst of results starts
            proxy.hold_replies_after(MARKER)

            # When the worker answers more jobs at once than the bound
            answering = [
                # (each answering a delivery still open)
                asyncio.create_task(
                    publisher.result("alpha", name, f"job-{i}", body, held=lambda: True)
                )
                for i, body in enumerate(bodies)
            ]
            async with asyncio.timeout(30):
                await arrivals.first.wait()

            # Expect only REPLIES_IN_FLIGHT of them handed to aiormq (each with its frames and
            # stall timer), the rest waiting their turn in the Publisher
            assert underlay.delivery_tag - sent_before == REPLIES_IN_FLIGHT
            assert len(underlay.confirmations) == REPLIES_IN_FLIGHT
            assert not any(task.done() for task in answering)

            # ... and, once the connection is cut and back, every result delivered
            await proxy.down()
            await proxy.up()
            async with asyncio.timeout(60):
                assert all(await asyncio.gather(*answering))
                await arrivals.all.wait()
            # (those sent before the cut may come twice: a client ignores a result seen before)
            assert arrivals.jobs == {f"job-{i}" for i in range(len(bodies))}
            await channel.exchange_delete(usage.name)
        await reading.queue_delete(name)
