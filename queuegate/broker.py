"""Connecting to RabbitMQ and building messages, the same way in every component."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import NamedTuple, TypeVar
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractRobustChannel,
    AbstractRobustConnection,
    DeliveryMode,
)
from aiormq import spec
from aiormq.abc import ConsumerCallback
from aiormq.exceptions import ChannelInvalidStateError

from queuegate.errors import ServiceUnavailable
from queuegate.messages import CONTENT_TYPE

log = logging.getLogger(__name__)

T = TypeVar("T")

CONNECTION_LOST = (ConnectionError, ChannelInvalidStateError)
"""What a publish or settle raises while the connection is down: aiormq's connection errors
(``AMQPConnectionError`` is a ``ConnectionError``) and the closed channel's invalid state."""

RETRY_PAUSE = 0.2
"""Seconds between attempts, so a channel not yet known to be lost is not hammered."""


class Outgoing(NamedTuple):
    """A message to publish: its body and its AMQP properties, built once."""

    body: bytes
    properties: spec.Basic.Properties


async def publish(
    channel: AbstractChannel, message: Outgoing, *, exchange: str, routing_key: str
) -> None:
    """Publish ``mandatory``; on a confirming channel, return once the broker confirms it.

    aio-pika's ``Exchange.publish`` holds the channel until the connection's writer has sent
    the frame, so one channel's publishes leave one per turn of the event loop: at hundreds
    of jobs a second they queue behind each other. Here the frame is queued in order and only
    the confirm is awaited. An unroutable message raises ``PublishError`` on a channel opened
    with ``on_return_raises``.
    """
    if channel.is_closed:
        # As aio-pika does: a robust channel would otherwise wait for its connection forever.
        raise ChannelInvalidStateError(f"{channel} is closed")
    underlay = await channel.get_underlay_channel()
    assert isinstance(underlay, aiormq.Channel)  # the abstract one lacks ``wait``
    await underlay.basic_publish(
        message.body,
        exchange=exchange,
        routing_key=routing_key,
        properties=message.properties,
        mandatory=True,
        wait=False,
    )


@dataclass(frozen=True)
class Consumer:
    channel: aiormq.abc.AbstractChannel
    """The underlying channel it consumes on: once the robust channel reopens, a new one."""
    tag: str

    async def cancel(self) -> None:
        await self.channel.basic_cancel(self.tag)


async def consume(
    channel: AbstractRobustChannel,
    queue: str,
    callback: ConsumerCallback,
    *,
    prefetch: int | None = None,
) -> Consumer:
    """Consume ``queue`` on the robust channel's underlying aiormq channel.

    aio-pika would wrap each delivery in a message of its own, every property decoded, and run
    the callback in a second task beside aiormq's, alive as long as the delivery is held (about
    100 us of CPU and 2.7 KB a delivery). Its robust channel restores only the consumers it made
    itself: consume again from the channel's ``reopen_callbacks``, by which time it has
    declared its queues again. ``prefetch`` is a non-global basic.qos, which applies to the
    consumers started after it on the channel.
    """
    underlay = await channel.get_underlay_channel()
    if prefetch is not None:
        await underlay.basic_qos(prefetch_count=prefetch)
    ok = await underlay.basic_consume(queue, callback)
    assert ok.consumer_tag is not None  # the broker names it when we do not
    return Consumer(underlay, ok.consumer_tag)


async def settle(action: Awaitable[object], what: str, logger: logging.Logger) -> bool:
    """Await an ack, nack or reject; False, logged once, if it failed.

    A settle fails only when its channel or connection is gone, and then the broker delivers
    the message again, which every consumer of ours answers idempotently: so a failed settle
    is never an error. A connection that closes without a reason fails a pending settle with
    a bare ``Exception`` (aiormq), so no narrower type covers every way this goes.
    """
    try:
        await action
    except Exception as exc:
        logger.info("could not %s (%s: its channel is gone); it is delivered again", what, exc)
        return False
    return True


def redact_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ""
    return urlunsplit(parts._replace(netloc=user + host))


async def connect(url: str, *, name: str) -> AbstractRobustConnection:
    """A robust connection: it reconnects and restores channels and consumers by itself."""
    try:
        connection = await aio_pika.connect_robust(url, client_properties={"connection_name": name})
    except aiormq.exceptions.ProbableAuthenticationError as exc:
        raise ServiceUnavailable(
            f"RabbitMQ at {redact_url(url)} refused the user's password: check it (a team's "
            "is shown once by queuegate teams add; rotate-credentials makes a new one)"
        ) from exc
    except (OSError, aio_pika.exceptions.AMQPError) as exc:
        raise ServiceUnavailable(
            f"RabbitMQ is not reachable at {redact_url(url)}: start it "
            "(rabbitmq-server -detached) or set QUEUEGATE_AMQP_URL"
        ) from exc
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        # A cancel (Ctrl-C) landing while aio-pika connects is swallowed by it: honour it here.
        await connection.close()
        raise asyncio.CancelledError
    return connection


async def when_connected(
    channel: AbstractChannel, action: Callable[[], Awaitable[T]], *, within: float, what: str
) -> T:
    """Run a broker action, retrying it once the robust channel is back after a lost connection.

    Robust connections restore channels, queues and consumers, but never replay a publish that
    failed during the outage: that is the caller's, and this does it. Retry only actions that
    are safe twice (every publish of ours is: job ids make its duplicate harmless). Raises
    ServiceUnavailable when the connection is not back within ``within`` seconds.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        try:
            return await action()
        except CONNECTION_LOST as exc:
            left = deadline - loop.time()
            if left <= 0:
                raise ServiceUnavailable(
                    f"lost the RabbitMQ connection while {what} and it did not come back "
                    f"within {within:.0f} s: check the broker"
                ) from exc
            log.info("connection lost while %s (%s); waiting for it", what, type(exc).__name__)
            try:
                async with asyncio.timeout(left):
                    await asyncio.sleep(RETRY_PAUSE)
                    if isinstance(channel, AbstractRobustChannel):
                        await channel.ready()
            except TimeoutError:
                continue


def json_message(
    body: bytes,
    *,
    message_type: str,
    message_id: str | None = None,
    correlation_id: str | None = None,
    reply_to: str | None = None,
    user_id: str | None = None,
    expiration_ms: int | None = None,
    headers: Mapping[str, str | int] | None = None,
    persistent: bool = True,
) -> Outgoing:
    """An AMQP message with a JSON body and the properties our components read.

    The properties are pamqp's own, which ``publish`` sends as they are: an ``aio_pika.Message``
    would check each field as it is set, then build them anew (16 against 1.5 us a message).
    """
    properties = spec.Basic.Properties(
        content_type=CONTENT_TYPE,
        message_type=message_type,
        message_id=message_id,
        correlation_id=correlation_id,
        reply_to=reply_to,
        user_id=user_id,
        expiration=str(expiration_ms) if expiration_ms is not None else None,
        headers=dict(headers) if headers else None,
        timestamp=datetime.now(UTC),
        delivery_mode=DeliveryMode.PERSISTENT if persistent else DeliveryMode.NOT_PERSISTENT,
    )
    return Outgoing(body, properties)
