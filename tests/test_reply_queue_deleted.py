"""A client whose reply queue an operator deletes declares it again and goes on being answered."""

from __future__ import annotations

import aio_pika

from mockprovider import Behavior, MockConfig
from producer import GatewayClient
from queuegate.settings import Settings
from tests.support import consumed, running_gateway

HELLO = [{"role": "user", "content": "Hello"}]


async def test_a_deleted_reply_queue_is_declared_again_and_answers_keep_coming(
    settings: Settings,
) -> None:
    # Given a client, its job in flight with a provider that takes a while
    slow = MockConfig(default=Behavior(latency_ms=1500))
    async with (
        running_gateway(settings, mock_config=slow) as gw,
        GatewayClient(settings, team="alpha") as client,
    ):
        queue = client.reply_to
        in_flight = await client.submit(client.job("gpt-4o-mini", HELLO))

        # When an operator deletes its reply queue (the broker cancels the client's consumer)
        admin = await aio_pika.connect(settings.amqp_url)
        async with admin:
            async with admin.channel() as channel:
                await channel.queue_delete(queue)
            # Expect the client to have it declared again, under the same name, and consumed
            await consumed(admin, queue)

        # and the job in flight answered there, as is a later one, each called once
        assert (await in_flight.result(timeout=30)).status == "ok"
        assert (await client.chat("gpt-4o-mini", HELLO, timeout=30)).status == "ok"
        assert client.reply_to == queue
        assert gw.mock.stats.calls == 2
        assert client.duplicates == 0
