"""Messages whose header tables a worker will not decode: a team cannot take the worker's loop
from every other team by what it puts in its messages' headers.

On this machine's broker (RabbitMQ's default ``frame_max``, 131072), a team may send a table of
80 KB: decoded, 40,000 small integers took 88 ms of the worker's loop a message.
"""

from __future__ import annotations

import asyncio
import time

import aio_pika
import orjson
from aio_pika.abc import AbstractIncomingMessage
from pamqp import commands as spec
from pamqp import frame
from pamqp.header import ContentHeader

from admin.teams import Credentials
from queuegate.control import DIRECT_REPLY_TO, BatchCall, ControlResponse
from queuegate.header_bound import HEADERS_DROPPED, HEADERS_MAX, _bounded
from queuegate.settings import Settings
from tests.support import running_gateway
from tests.test_control import alpha_entry, control_message

HELLO = [{"role": "user", "content": "Hello there"}]
PAD = {"x-pad": [1] * 40_000}
"""80 KB of headers, ten times what the worker reads."""


def test_a_large_table_is_dropped_undecoded_and_the_rest_read_as_sent() -> None:
    # Given a message's properties with 80 KB of headers, and one with a table of the most read
    properties = {
        "content_type": "application/json",
        "content_encoding": "utf-8",
        "message_id": "m-1",
        "reply_to": DIRECT_REPLY_TO,
        "user_id": "ns.alpha",
        "delivery_mode": 2,
        "expiration": "30000",
    }
    large = frame.marshal(ContentHeader(0, 11, spec.Basic.Properties(headers=PAD, **properties)), 3)
    small_headers = {"x-pad": "p" * (HEADERS_MAX - 20)}
    small = frame.marshal(
        ContentHeader(0, 11, spec.Basic.Properties(headers=small_headers, **properties)), 3
    )
    # When each is read
    started = time.process_time()
    read, channel, header = _bounded(large)
    took = time.process_time() - started
    # Expect the large table replaced by its size, undecoded (88 ms decoded), every other
    # property and the frame's length as sent; the other read whole
    assert isinstance(header, ContentHeader)
    assert (read, channel, header.body_size) == (len(large), 3, 11)
    assert header.properties.headers == {HEADERS_DROPPED: 80_011}
    assert {name: getattr(header.properties, name) for name in properties} == properties
    assert took < 0.02, took
    _, _, kept = _bounded(small)
    assert isinstance(kept, ContentHeader) and kept.properties.headers == small_headers


async def test_a_job_or_control_request_with_too_many_headers_is_refused_saying_so(
    settings: Settings, teams: dict[str, Credentials]
) -> None:
    alpha = teams["alpha"]
    assert alpha.amqp_url is not None and alpha.user is not None
    async with (
        running_gateway(settings, teams=("alpha",)) as gw,
        gw.client("alpha") as client,
    ):
        # Given alpha's app sending, with its own credentials, a job with 80 KB of headers
        # (before: read in 88 ms of the worker's loop, and served)
        job = {"job_id": "padded", "team": "alpha", "model": "gpt-4o-mini", "messages": HELLO}
        connection = await aio_pika.connect(alpha.amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(alpha_entry(settings), ensure=False)
            padded = aio_pika.Message(
                orjson.dumps(job),
                message_id="padded",
                reply_to=client.reply_to,
                user_id=alpha.user,
                headers=PAD,
            )
            await exchange.publish(padded, routing_key="alpha")
            # Expect it refused, uncalled, saying why and what to do
            result = await client.wait("padded", timeout=10)
            assert result.error is not None and result.error.code == "invalid_request"
            assert "headers are 80,011 bytes, more than the 8,192 bytes the gateway reads" in (
                result.error.message
            )
            assert gw.mock.stats.calls == 0

            # And a control request so padded refused the same way
            answers = await channel.get_queue(DIRECT_REPLY_TO, ensure=False)
            said: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

            async def on_answer(message: AbstractIncomingMessage) -> None:
                said.set_result(message.body)

            await answers.consume(on_answer, no_ack=True)
            request = control_message(
                BatchCall(call="list"),
                team="alpha",
                reply_to=DIRECT_REPLY_TO,
                user=alpha.user,
                key=None,
            )
            request.headers = {**request.headers, **PAD}
            await exchange.publish(request, routing_key="alpha.control")
            answer = ControlResponse.model_validate_json(await asyncio.wait_for(said, 10))
        assert not answer.ok and answer.code == "invalid_request"
        assert "more than the 8,192 bytes the gateway reads" in (answer.error or "")
        # And the team's jobs served as ever after
        assert (await client.chat("gpt-4o-mini", HELLO, timeout=10)).status == "ok"
