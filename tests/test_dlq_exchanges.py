"""A replay into a namespace missing an exchange it publishes to takes no letter: it says so in
one line, and every letter stays, in its order (had the broker refused a publish mid-replay, it
would have closed the channel, and the letters held would have come back in an order of the
quorum queue's own)."""

from __future__ import annotations

import aio_pika
from aio_pika.abc import AbstractChannel

from queuegate import dlq
from queuegate.settings import Settings
from queuegate.topology import HEADER_DEAD_QUEUE, HEADER_DEAD_REASON, Topology
from tests.support import dlq_cli

LETTERS = 100
"""Far past the 32 letters a quorum queue takes back in their order at once."""


async def test_a_replay_without_the_usage_exchange_takes_nothing_and_says_what_to_do(
    settings: Settings, direct: AbstractChannel
) -> None:
    # Given 100 usage events a worker dead-lettered from accounting (delivery_limit), in a
    # namespace whose usage exchange was then deleted
    topology = Topology.of(settings)
    await topology.declare_jobs_exchange(direct)
    await topology.declare_usage(direct)
    by_team = await direct.get_exchange(topology.dead_teams_exchange)
    ids = [f"usage-{i:03d}" for i in range(LETTERS)]
    headers = {HEADER_DEAD_REASON: "delivery_limit", HEADER_DEAD_QUEUE: topology.accounting_queue}
    for job_id in ids:
        await by_team.publish(
            aio_pika.Message(b"{}", message_id=job_id, headers=headers, user_id=settings.amqp_user),
            routing_key="",  # accounting's dead-letter queue, <ns>.dead
        )
    await (await direct.get_exchange(topology.usage_exchange)).delete()
    assert [x.message_id for x in (await dlq.peek(settings))[0]] == ids

    # When the operator replays every dead letter
    stdout, stderr = await dlq_cli(settings, "replay", "--all", exit_code=1)

    # Expect it refused in one line saying what to do, and every letter there, in its order
    assert stdout == ""
    assert stderr.splitlines() == [
        f"error: the exchange {topology.usage_exchange!r} a replay publishes to is missing: "
        "start a worker, which declares it, then replay again (no dead letter was taken)"
    ]
    assert [x.message_id for x in (await dlq.peek(settings))[0]] == ids
