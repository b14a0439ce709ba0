"""A team's reply and results queues are bounded in bytes, on the real broker.

A team that reads none of its results must not park them until the broker's memory alarm
blocks every team's publishers; what the broker refuses is still answered and accounted.
"""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
import pytest
from aiormq.exceptions import ChannelNotFoundEntity, DeliveryError

from admin.teams import Credentials
from producer import GatewayClient
from queuegate.broker import connect
from queuegate.messages import ChatJob
from queuegate.settings import Settings
from queuegate.topology import Bound, Topology
from tests.faults import behind_proxies
from tests.support import running_gateway

HELLO = [{"role": "user", "content": "Hello there"}]
BIG = 4 * 1024 * 1024


def as_team(settings: Settings, credentials: Credentials) -> Settings:
    assert credentials.amqp_url is not None
    return settings.model_copy(update={"amqp_url": credentials.amqp_url})


async def fill(settings: Settings, queue: str, count: int) -> int:
    """Publish ``count`` 4 MiB results into ``queue`` as a worker does (the gateway's user,
    confirmed); how many the broker took before it refused one."""
    accepted = 0
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        try:
            with pytest.raises(DeliveryError):
                for _ in range(count):
                    await channel.default_exchange.publish(
                        aio_pika.Message(b"x" * BIG), routing_key=queue
                    )
                    accepted += 1
        finally:
            await channel.queue_delete(queue)  # not left holding its megabytes
    return accepted


async def test_a_teams_results_queue_refuses_results_past_its_bytes(
    settings: Settings, teams: dict[str, Credentials]
) -> None:
    # Given alpha added the default way, and a batch's results queue the gateway declared
    # for it on its own credentials, which nobody reads
    alpha = as_team(settings, teams["alpha"])
    async with (
        running_gateway(settings, teams=("alpha",)),
        GatewayClient(alpha, team="alpha", reply_queue="nightly") as client,
    ):
        queue = client.reply_to

    # When results of 4 MiB arrive in it until the broker refuses one
    limit = settings.reply_queue_max_bytes // BIG
    accepted = await fill(settings, queue, limit + 2)

    # Expect the bound in bytes to hold (a quorum queue may take one more), far below
    # QUEUEGATE_REPLY_QUEUE_MAX_LENGTH results of that size
    assert accepted in (limit, limit + 1)


async def test_a_results_queue_of_an_earlier_version_opens_and_is_bounded_by_the_policy(
    settings: Settings, teams: dict[str, Credentials]
) -> None:
    # Given alpha added the default way, and its results queue as an earlier version
    # declared it: an expiry only, no bound
    topology = Topology(settings.namespace)
    queue = topology.results_queue("alpha", "nightly")
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        earlier = {
            "x-queue-type": "quorum",
            "x-expires": int(settings.results_queue_expires * 1000),
        }
        await channel.declare_queue(queue, durable=True, arguments=earlier)

    # When its pipeline opens it again through this version's gateway
    alpha = as_team(settings, teams["alpha"])
    async with (
        running_gateway(settings, teams=("alpha",)),
        GatewayClient(alpha, team="alpha", reply_queue="nightly") as client,
    ):
        # Expect it served (the broker refuses a redeclare with other arguments)
        assert client.reply_to == queue
        result = await client.chat("gpt-4o-mini", HELLO, timeout=10)
        assert result.status == "ok", result.error

    # ... and bounded in bytes all the same, by the policy teams add put
    limit = settings.reply_queue_max_bytes // BIG
    assert await fill(settings, queue, limit + 2) in (limit, limit + 1)


async def test_a_client_reply_queue_of_an_earlier_version_is_kept_as_it_was(
    settings: Settings,
) -> None:
    # Given a client's reply queue as an earlier version declared it (oldest dropped)
    topology, bound = Topology(settings.namespace), Bound.of(settings)
    expires = int(settings.reply_queue_expires * 1000)
    earlier = {"x-expires": expires, "x-max-length": bound.max_length, "x-overflow": "drop-head"}
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        name = topology.replies_queue("alpha", uuid.uuid4().hex)
        await channel.declare_queue(name, durable=True, arguments=earlier)

        # When a worker declares it again for its client, after the upgrade
        client_id = name.rsplit(".", 1)[1]
        queue = await topology.declare_replies_queue(
            channel, "alpha", client_id, expires_s=settings.reply_queue_expires, bound=bound
        )

        # Expect it kept, on a channel still open, and a new one declared with this
        # version's bound
        assert queue.name == name and not channel.is_closed
        fresh = await topology.declare_replies_queue(
            channel, "alpha", "fresh", expires_s=settings.reply_queue_expires, bound=bound
        )
        assert fresh.arguments is not None
        assert fresh.arguments["x-max-length-bytes"] == settings.reply_queue_max_bytes
        assert fresh.arguments["x-overflow"] == "reject-publish"
        for declared in (name, fresh.name):
            await channel.queue_delete(declared)


async def test_a_reply_queue_that_expired_is_not_declared_again_when_its_declarer_reconnects(
    settings: Settings,
) -> None:
    topology = Topology(settings.namespace)
    name = topology.replies_queue("alpha", "gone")
    async with behind_proxies(settings, "amqp") as (through, proxies):
        # Given a client's reply queue declared as the control plane declares it, on its
        # robust channel, and then gone (as one its client left expires)
        connection = await connect(through.amqp_url, name="control-plane")
        async with connection:
            channel = await connection.channel()
            await topology.declare_replies_queue(
                channel, "alpha", "gone", expires_s=60, bound=Bound.of(settings)
            )
            direct = await aio_pika.connect(settings.amqp_url)
            async with direct:
                await (await direct.channel()).queue_delete(name)

                # When the declarer's connection drops and it reconnects
                reconnected = asyncio.get_running_loop().create_future()
                connection.reconnect_callbacks.add(lambda *_: reconnected.set_result(None))
                await proxies["amqp"].down()
                await proxies["amqp"].up()
                await reconnected

                # Expect the queue still gone: only its client's next open declares it
                with pytest.raises(ChannelNotFoundEntity):
                    await (await direct.channel()).declare_queue(name, passive=True)


async def test_results_refused_by_a_full_results_queue_are_answered_and_accounted_once(
    settings: Settings, teams: dict[str, Credentials]
) -> None:
    # Given results queues of 4 KiB, one job of alpha's served at a time, and alpha's
    # results queue, which nobody reads
    settings = settings.model_copy(update={"reply_queue_max_bytes": 4096, "prefetch": 1})
    assert teams["alpha"].user is not None
    alpha = as_team(settings, teams["alpha"])
    jobs = 12
    async with running_gateway(settings, teams=("alpha",)) as gw:
        async with GatewayClient(alpha, team="alpha", reply_queue="inbox") as client:
            queue = client.reply_to

        # When alpha sends jobs answered there with its own broker user
        connection = await aio_pika.connect(alpha.amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(gw.topology.entry_exchange("alpha"), ensure=False)
            for n in range(jobs):
                job_id = f"job-{n:02d}"
                job = ChatJob(job_id=job_id, team="alpha", model="gpt-4o-mini", messages=HELLO)
                message = aio_pika.Message(
                    job.model_dump_json().encode(),
                    message_id=job_id,
                    correlation_id=job_id,
                    reply_to=queue,
                    user_id=teams["alpha"].user,
                )
                await exchange.publish(message, routing_key="alpha")

        # Expect every job answered and accounted once, each called once
        rows = await gw.usage_rows(jobs)
        assert [row["job_id"] for row in rows] == [f"job-{n:02d}" for n in range(jobs)]
        assert all(row["status"] == "ok" for row in rows) and gw.mock.stats.calls == jobs
        # ... the results queue holding no more than its bound (the last one may pass it),
        # and each result it refused recorded undelivered
        held = await take_all(settings, queue)
        assert sum(held) - max(held) < 4096
        delivered = [row["job_id"] for row in rows if row["reply_delivered"]]
        assert len(delivered) == len(held) < jobs


async def take_all(settings: Settings, queue: str) -> list[int]:
    """The body sizes of what ``queue`` holds, taken from it (then deleted)."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        sizes: list[int] = []
        source = await channel.get_queue(queue, ensure=False)
        while (message := await source.get(fail=False)) is not None:
            sizes.append(len(message.body))
            await message.ack()
        await channel.queue_delete(queue)
    return sizes
