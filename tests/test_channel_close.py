"""A channel the broker closes while the connection's writer is busy takes nothing else down."""

from __future__ import annotations

import asyncio

import aio_pika
import aiormq
import pytest

from queuegate.broker import connect, consume
from queuegate.settings import Settings
from tests.proxy import TcpProxy
from tests.support import wait_until

RECEIVE_BUFFER = 64 * 1024
CHANNELS = 32
CHUNK = b"x" * (512 * 1024)
"""One publish of CHUNK on each of CHANNELS channels (16 MiB) sent while the proxy reads
nothing: past what the sockets between the client and the proxy take (the client's send
buffer, 4 MiB at most by Linux's default, and the proxy's RECEIVE_BUFFER). aio-pika's publish
has the connection's writer see each frame sent (drained), so the writer waits at the first
that does not fit, and the frames behind it fill its write queue (aiormq's: ten frames)."""


async def test_a_channel_closed_by_the_broker_while_publishes_wait_keeps_the_connection(
    settings: Settings,
) -> None:
    async with TcpProxy(settings.amqp_url, receive_buffer=RECEIVE_BUFFER) as proxy:
        connection = await connect(proxy.url, name="channel-close")
        async with connection:
            channels = [await connection.channel() for _ in range(CHANNELS)]
            refused = await connection.channel(publisher_confirms=False)
            # Where the publishes go: the broker keeps the last one alone.
            sink = await channels[0].declare_queue(exclusive=True, arguments={"x-max-length": 1})
            lost: list[BaseException | None] = []
            connection.close_callbacks.add(lambda _, exc: lost.append(exc))
            assert connection.transport is not None
            underlay = connection.transport.connection
            closing = await refused.get_underlay_channel()

            # Given the broker's refusal of a consume (NOT_FOUND closes its channel) on its way
            # back to the client
            proxy.hang_replies()
            consuming = asyncio.create_task(
                consume(refused, f"{settings.namespace}.missing", lambda _: None)
            )
            await proxy.replies_waiting.wait()
            # and the connection's writer held up, its write queue full of publishes
            proxy.hang_requests()
            publishes = [
                asyncio.create_task(
                    channel.default_exchange.publish(aio_pika.Message(CHUNK), sink.name)
                )
                for channel in channels
            ]
            try:
                await wait_until(underlay.write_queue.full)
                # When the refusal reaches the client (its channel's close-ok due with the
                # write queue full), then the client's bytes flow again
                proxy.release_replies()
                # Read: the number no longer that channel's (reopened on it, once handled).
                await wait_until(lambda: underlay.channels.get(closing.number) is not closing)
            finally:
                await proxy.up()

            # Expect every publish confirmed and the refused channel open again, on the same
            # connection: no close-ok lost (the broker, still waiting for it, takes the
            # channel's reopening for a second channel.open and closes the whole connection)
            with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
                await consuming
            async with asyncio.timeout(30):
                failed = [
                    type(r).__name__
                    for r in await asyncio.gather(*publishes, return_exceptions=True)
                    if isinstance(r, BaseException)
                ]
                assert failed == []
                await refused.ready()
                await refused.declare_queue(exclusive=True)
            assert connection.transport.connection is underlay
            assert lost == []


async def test_a_connection_closed_after_its_broker_went_leaves_no_task_behind(
    settings: Settings,
) -> None:
    async with TcpProxy(settings.amqp_url) as proxy:
        connection = await connect(proxy.url, name="closed-after-loss")
        # Given a connection whose broker went (its dead write queue is drained a while)
        await connection.channel()
        await proxy.down()
        await wait_until(lambda: not connection.connected.is_set())
        # When it is closed at once
        await connection.close()
    # Expect nothing of it left running to outlive the event loop
    left = [t for t in asyncio.all_tasks() if t.get_coro().__name__ == "_drain"]  # type: ignore[union-attr]
    assert left == []
