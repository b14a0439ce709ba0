"""The accounting intake: a consume-only AMQP connection of our own, against the real broker."""

from __future__ import annotations

import asyncio
import ssl
import uuid
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import pytest
import uvloop

from accounting.intake import Delivery, Intake, IntakeClosed, tls_context
from queuegate.broker import json_message, publish
from queuegate.namespace import drop_namespace
from queuegate.settings import Settings
from queuegate.topology import MESSAGE_TYPE_USAGE, Topology
from tests.test_accounting import WAIT, queued


async def _publish(settings: Settings, *messages: tuple[bytes, str]) -> None:
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await Topology(settings.namespace).declare_usage(channel)
        for body, message_id in messages:
            message = json_message(body, message_type=MESSAGE_TYPE_USAGE, message_id=message_id)
            await publish(channel, message, exchange=exchange.name, routing_key="")


async def _receive(settings: Settings, count: int, *, frame_max: int = 0) -> list[Delivery]:
    """Consume ``count`` deliveries, acknowledge them with one multiple ack, and close."""
    received: list[Delivery] = []
    arrived = asyncio.Event()

    def on_deliveries(intake: Intake, deliveries: list[Delivery]) -> None:
        received.extend(deliveries)
        if len(received) >= count:
            arrived.set()

    queue = Topology(settings.namespace).accounting_queue
    intake = await Intake.open(
        settings.amqp_url, queue, 10, on_deliveries, name="test", frame_max=frame_max
    )
    try:
        async with asyncio.timeout(WAIT):
            await arrived.wait()
        intake.ack(received[-1].tag, multiple=True)
    finally:
        await intake.close()
    assert await intake.closed is None  # closed by us, not lost
    return received


async def test_bodies_arrive_whole_in_order_and_one_ack_settles_them(settings: Settings) -> None:
    # Given an empty body, a small one and one spread over three frames of 4 KiB
    large = b"x" * 10_000
    await _publish(settings, (b"", "empty"), (b'{"a":1}', "small"), (large, "large"))

    # When consumed with the broker's frames capped at 4 KiB
    received = await _receive(settings, 3, frame_max=4096)

    # Expect each body whole, in delivery order, its message id readable from its header
    assert [d.body for d in received] == [b"", b'{"a":1}', large]
    assert [d.message_id() for d in received] == ["empty", "small", "large"]
    assert [d.tag for d in received] == [1, 2, 3]
    # ... and the multiple ack to have settled all three before the close
    assert await queued(settings) == 0


async def test_a_refused_login_raises(settings: Settings) -> None:
    # Given a URL with a wrong password
    parts = urlsplit(settings.amqp_url)
    wrong = urlunsplit(parts._replace(netloc=f"guest:wrong@{parts.hostname}:{parts.port or 5672}"))

    # Expect opening to fail as a closed intake (no socket is left open: pytest would say)
    with pytest.raises(IntakeClosed):
        await Intake.open(wrong, "any", 1, lambda *_: None, name="test")


def test_the_intake_runs_on_uvloop(base_settings: Settings) -> None:
    # uvloop's transports are not asyncio.Transport subclasses; the accountant runs on uvloop.
    tag = uuid.uuid4().hex[:10]
    settings = base_settings.model_copy(
        update={"namespace": f"qgt-{tag}", "database_schema": f"qgt_{tag}"}
    )

    async def go() -> list[Delivery]:
        await _publish(settings, (b"{}", "one"))
        return await _receive(settings, 1)

    try:
        assert [d.body for d in uvloop.run(go())] == [b"{}"]
    finally:
        asyncio.run(drop_namespace(settings, []))


def test_tls_is_set_up_from_the_url_as_aio_pika_does() -> None:
    assert tls_context(urlsplit("amqp://broker/")) is None
    verified = tls_context(urlsplit("amqps://broker/"))
    assert verified is not None and verified.verify_mode is ssl.CERT_REQUIRED
    unverified = tls_context(urlsplit("amqps://broker/?no_verify_ssl=1"))
    assert unverified is not None and unverified.verify_mode is ssl.CERT_NONE
    assert not unverified.check_hostname
    # A named CA is read, not ignored for the system's
    with pytest.raises(FileNotFoundError):
        tls_context(urlsplit("amqps://broker/?cafile=/nonexistent/ca.pem"))
