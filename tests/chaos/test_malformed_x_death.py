"""A team's job whose ``x-death`` header the broker cannot update, expiring in its queue, stops
no other team's dead letters.

On a node of its own: where a job queue dead-letters at least once, RabbitMQ 3.10's dead-letter
worker crashes on such a job at each restart until the supervisor of every queue's workers
gives up, and from then on no queue of the node dead-letters, nor does a new one start.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aio_pika

from queuegate.broker import connect
from queuegate.settings import Settings
from queuegate.topology import Topology
from tests.chaos.harness import declare_teams
from tests.chaos.private_broker import PrivateBroker, on_node

MALFORMED = [1, "x"]
"""An ``x-death`` of entries that are no tables, as any team may set on its own jobs."""


async def test_a_teams_malformed_x_death_stops_no_other_teams_dead_letters(
    settings: Settings, tmp_path: Path
) -> None:
    with PrivateBroker(tmp_path / "rabbitmq") as node:
        settings = on_node(settings, node)
        topology = Topology.of(settings)
        await declare_teams(settings, ("alpha", "beta"))
        connection = await connect(settings.amqp_url, name="x-death")
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            jobs = await channel.get_exchange(topology.jobs_exchange, ensure=False)
            # Given alpha's job with a malformed x-death header, expiring in its queue at once
            poison = aio_pika.Message(b"{}", headers={"x-death": MALFORMED}, expiration=0.001)
            await jobs.publish(poison, routing_key="alpha")
            # When beta's job expires in beta's queue after it
            await jobs.publish(aio_pika.Message(b"{}", expiration=0.001), routing_key="beta")

            # Expect beta's dead letter where it belongs (alpha's own may be dropped), and a
            # new team's queue declared: the broker's dead-letter workers are all still there
            underlay = await channel.get_underlay_channel()
            async with asyncio.timeout(10):
                while True:  # the broker announces no letter: look again
                    beta = await underlay.queue_declare(
                        topology.team_dead_queue("beta"), passive=True
                    )
                    if beta.message_count:
                        break
                    await asyncio.sleep(0.05)
        await declare_teams(settings, ("gamma",))
        assert node.ctl("eval", "whereis(rabbit_fifo_dlx_sup).").strip() != "undefined"
