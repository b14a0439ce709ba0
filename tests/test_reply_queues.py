"""A worker's check that a job's reply queue exists, against the real broker."""

from __future__ import annotations

import asyncio
import logging

import aio_pika
import orjson
import pytest

from producer.client import GatewayClient
from queuegate.broker import connect
from queuegate.errors import ConfigError
from queuegate.settings import Settings
from queuegate.topology import HEADER_DEAD_DETAIL, HEADER_DEAD_REASON, Topology
from queuegate.visible import clipped
from tests.support import running_gateway
from tests.teams import team_identities
from workers.reply_queues import ReplyQueues

HELLO = [{"role": "user", "content": "Hello there"}]


async def test_jobs_asking_about_one_queue_at_once_share_one_look(settings: Settings) -> None:
    connection = await connect(settings.amqp_url, name="test-reply-queues")
    async with connection:
        channel = await connection.channel()
        name = Topology(settings.namespace).replies_queue("alpha", "burst")
        await channel.declare_queue(name, durable=True, arguments={"x-expires": 60_000})
        replies = ReplyQueues(connection)

        # When 3,000 jobs delivered at once ask about the same queue, and about a missing one
        async with asyncio.timeout(30):
            found = await asyncio.gather(*(replies.exists(name) for _ in range(3000)))
            missing = await asyncio.gather(*(replies.exists(f"{name}-gone") for _ in range(3000)))

        # Expect every answer right, and the connection still open: one channel for each
        # look, not one a job (past the broker's 2,047 it closes the connection)
        assert all(found)
        assert not any(missing)
        assert not connection.is_closed
        assert connection.connected.is_set()
        await channel.queue_delete(name)


@pytest.mark.parametrize("name", ["a.b", "nightly:results", "", "x" * 65, "two words"])
def test_a_client_given_a_reply_queue_name_it_cannot_have_says_so_in_one_line(
    settings: Settings, name: str
) -> None:
    # When a pipeline's client is made with a reply queue name no queue may have
    with pytest.raises(ConfigError) as refused:
        GatewayClient(settings, team="alpha", reply_queue=name)
    # Expect one line naming it and what a name may hold, before anything is opened
    message = str(refused.value)
    assert "\n" not in message and repr(clipped(name)) in message  # as log lines clip it
    assert "1-64 letters, digits, - and _" in message


@pytest.mark.parametrize("tail", ["a\nb", "a\tb", "r\u00e9ponses"])
async def test_a_job_whose_reply_to_is_no_queue_name_is_refused_at_once(
    settings: Settings, caplog: pytest.LogCaptureFixture, tail: str
) -> None:
    caplog.set_level(logging.INFO, logger="workers")
    async with team_identities(settings) as identities, running_gateway(settings) as gw:
        # Given a job published by alpha's own broker user, its reply_to one of alpha's reply
        # queues but for a character no queue name may hold
        alpha = identities["alpha"].settings
        reply_to = Topology(settings.namespace).replies_queue("alpha", tail)
        body = {"job_id": "no-name", "team": "alpha", "model": "gpt-4o-mini", "messages": HELLO}
        connection = await aio_pika.connect(alpha.amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(gw.topology.entry_exchange("alpha"))
            # When it is published
            await exchange.publish(
                aio_pika.Message(
                    orjson.dumps(body),
                    message_id="no-name",
                    reply_to=reply_to,
                    user_id=alpha.amqp_user,
                ),
                routing_key="alpha",
            )

        # Expect it refused as a job whose reply queue does not exist: dead-lettered saying
        # why, accounted as refused, the provider not called
        [dead] = await gw.dead_letters(1)
        assert dead.message_id == "no-name"
        assert dead.headers[HEADER_DEAD_REASON] == "invalid_request"
        assert "does not exist" in str(dead.headers[HEADER_DEAD_DETAIL])
        [row] = await gw.usage_rows(1)
        assert row["job_id"].startswith("no-name/refused/")
        assert row["error_code"] == "invalid_request" and not row["reply_delivered"]
        assert gw.mock.stats.calls == 0
    # ... at once: refused once, never returned to its queue
    said = [r.getMessage() for r in caplog.records]
    assert len([line for line in said if "refused (invalid_request" in line]) == 1, said
    assert not [line for line in said if "returning it to the queue" in line], said


async def test_a_queue_another_connection_holds_exclusively_exists(settings: Settings) -> None:
    # Given a reply queue exclusive to its app's connection, as AMQP's RPC pattern has it
    app = await connect(settings.amqp_url, name="test-reply-queues-app")
    connection = await connect(settings.amqp_url, name="test-reply-queues")
    async with app, connection:
        name = Topology(settings.namespace).replies_queue("alpha", "own")
        await (await app.channel()).declare_queue(name, exclusive=True)
        # When the worker looks whether it exists (the broker refuses it the look: locked)
        # Expect an answer that it does, not an error that would return the job to its queue
        assert await ReplyQueues(connection).exists(name)
