"""A worker's check that a job's reply queue exists, against the real broker."""

from __future__ import annotations

import asyncio

import pytest

from producer.client import GatewayClient
from queuegate.broker import connect
from queuegate.errors import ConfigError
from queuegate.settings import Settings
from queuegate.topology import Topology
from queuegate.visible import clipped
from workers.reply_queues import ReplyQueues


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
