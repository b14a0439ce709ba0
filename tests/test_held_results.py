"""Results a team's own consumer holds unacknowledged count against its queue's bound.

RabbitMQ counts only ready messages against a queue's bounds: a consumer with no prefetch
limit that never acknowledges would take every result of its team's jobs, unbounded. The
attack is made as the team itself, with its own broker user.
"""

from __future__ import annotations

import asyncio

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage

from admin.teams import Credentials
from producer import GatewayClient
from queuegate.messages import ChatJob
from queuegate.settings import Settings
from tests.support import logged, running_gateway, wait_until
from tests.test_control import as_team

HELLO = [{"role": "user", "content": "Hello there"}]
BOUND = 5


async def test_results_a_consumer_holds_unacknowledged_count_against_its_queues_bound(
    settings: Settings, teams: dict[str, Credentials]
) -> None:
    # Given reply queues bounded to 5 results, and alpha's named results queue
    settings = settings.model_copy(update={"reply_queue_max_length": BOUND})
    alpha = as_team(settings, teams["alpha"])
    async with running_gateway(settings, teams=("alpha",)) as gw:
        async with GatewayClient(alpha, team="alpha", reply_queue="hoard") as client:
            queue = client.reply_to
        held: list[AbstractIncomingMessage] = []

        async def hoard(message: AbstractIncomingMessage) -> None:
            held.append(message)  # never acknowledged

        # ... which alpha consumes with its own user at no prefetch limit, acknowledging none
        connection = await aio_pika.connect(alpha.amqp_url)
        with logged("workers.held_results", f"reply queue {queue} holds its bound") as full:
            async with connection, GatewayClient(alpha, team="alpha", listen=False) as sender:
                channel = await connection.channel()
                await channel.set_qos(prefetch_count=0)
                await (await channel.get_queue(queue, ensure=False)).consume(hoard)

                async def send(first: int, count: int) -> None:
                    for n in range(first, first + count):
                        job = ChatJob(
                            job_id=f"job-{n:03d}", team="alpha", model="gpt-4o-mini", messages=HELLO
                        )
                        await sender.publish(job, reply_to=queue)

                # When alpha's jobs answered there outnumber the bound, all taken unacknowledged
                await send(0, 2 * BOUND)
                await wait_until(lambda: len(held) == 2 * BOUND)
                # Expect the workers to count them, once the broker's statistics say so
                await asyncio.wait_for(full.wait(), 30)

                # ... and the results of the jobs sent then not sent to the queue: answered and
                # accounted, recorded undelivered
                await send(2 * BOUND, 20)
                rows = await gw.usage_rows(2 * BOUND + 20)
                later = [row for row in rows if row["job_id"] >= f"job-{2 * BOUND:03d}"]
                assert len(later) == 20 and all(row["status"] == "ok" for row in later)
                assert not any(row["reply_delivered"] for row in later)
                assert len(held) == 2 * BOUND


async def test_results_are_sent_and_the_look_said_missing_while_the_management_api_is_away(
    settings: Settings, teams: dict[str, Credentials], caplog: pytest.LogCaptureFixture
) -> None:
    # Given workers whose management API does not answer (nothing listens on port 1)
    away = settings.model_copy(update={"management_url": "http://guest:guest@127.0.0.1:1/"})
    alpha = as_team(settings, teams["alpha"])
    with logged("workers.held_results", "could not see what the teams' reply queues hold") as said:
        async with running_gateway(settings, teams=("alpha",), components=away):
            # Expect it said once, naming no password, and alpha served all the same
            await asyncio.wait_for(said.wait(), 10)
            async with GatewayClient(alpha, team="alpha") as client:
                result = await client.chat("gpt-4o-mini", HELLO, timeout=10)
                assert result.status == "ok", result.error
    assert "127.0.0.1:1" in caplog.text and "guest:guest" not in caplog.text
