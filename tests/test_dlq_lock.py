"""``queuegate dlq`` commands run at once take turns: each reads the letters by taking them and
giving them back, so each holds the namespace's lock (an exclusive queue) while it does. Two
reads at once each see every letter, in its order; a read whose holder was killed is served;
one that waited past ``QUEUEGATE_DLQ_LOCK_WAIT`` says so in one line."""

from __future__ import annotations

import asyncio
import os
import sys

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel
from aiormq.exceptions import ChannelAccessRefused

from admin.teams import Credentials
from queuegate import dlq
from queuegate.settings import Settings
from queuegate.topology import Topology
from tests.support import dead_letters, dlq_cli

LETTERS = 12

HOLDER = """
import asyncio
import contextlib
from queuegate import dlq
from queuegate.settings import Settings

async def main() -> None:
    async with dlq._reading(Settings()) as reader, contextlib.AsyncExitStack() as held:
        names = await dlq._dead_queues(reader)
        taken = [await held.enter_async_context(dlq._held(reader, name)) for name in names]
        print(sum(len(letters) for letters, _ in taken), flush=True)
        await asyncio.Event().wait()

asyncio.run(main())
"""
"""A dlq read that holds every letter until it is killed."""


async def letters(settings: Settings, direct: AbstractChannel) -> list[str | None]:
    """Twelve dead letters, in alpha's queue and accounting's; their ids in the order read."""
    topology = Topology.of(settings)
    await topology.declare_dead(direct)
    await topology.declare_team_dead(direct, "alpha")
    by_team = await direct.get_exchange(topology.dead_teams_exchange)
    for i in range(LETTERS):
        # Every third one accounting's (the empty key), the rest alpha's
        await by_team.publish(
            aio_pika.Message(b"{}", message_id=f"lock-{i}"), routing_key="" if i % 3 else "alpha"
        )
    ids = [x.message_id for x in await dead_letters(settings, LETTERS)]
    assert sorted(map(str, ids)) == sorted(f"lock-{i}" for i in range(LETTERS))
    return ids


async def ids_left(settings: Settings) -> list[str | None]:
    return [letter.message_id for letter in (await dlq.peek(settings))[0]]


async def test_two_reads_at_once_each_see_every_letter_and_leave_their_order(
    settings: Settings, direct: AbstractChannel
) -> None:
    # Given twelve dead letters in two queues
    before = await letters(settings, direct)

    # When two reads run at once, five times over, then a read beside a drop
    reads = [await asyncio.gather(ids_left(settings), ids_left(settings)) for _ in range(5)]
    beside, dropped = await asyncio.gather(ids_left(settings), dlq.drop(settings, "lock-4"))

    # Expect each read to see every letter in its order, the drop its letter, and afterwards
    # the rest in their order
    assert reads == [[before, before]] * 5
    rest = [x for x in before if x != "lock-4"]
    assert beside in (before, rest)
    assert [x.message_id for x in dropped] == ["lock-4"]
    assert await ids_left(settings) == rest


async def test_a_read_waits_for_the_reader_before_it_and_not_for_one_killed(
    settings: Settings, direct: AbstractChannel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given twelve dead letters, all held by a dlq read in another process
    before = await letters(settings, direct)
    monkeypatch.setenv("QUEUEGATE_DLQ_LOCK_WAIT", "0.5")
    holder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        HOLDER,
        env={**os.environ, "QUEUEGATE_NAMESPACE": settings.namespace},
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None
        held = await asyncio.wait_for(holder.stdout.readline(), timeout=30)
        assert held.strip() == str(LETTERS).encode()

        # When the operator lists them meanwhile, then the holder is killed
        _, waited = await dlq_cli(settings, "list", exit_code=1)
    finally:
        holder.kill()
        await holder.wait()
    # (once the broker has put back all the killed holder took: it does so as it sees its
    # connection gone, and a full run once read the queues half way)
    after = [letter.message_id for letter in await dead_letters(settings, len(before))]

    # Expect the list refused in one line, once it waited its bound, saying what to do; and
    # the next read served, every letter back (in the order the broker put them back: the
    # holder's channel closed unreturned)
    assert waited.splitlines() == [
        f"error: another queuegate dlq command is reading the dead letters (it holds "
        f"{settings.namespace}.dlq.lock) and did not end within 0.5 s: run this one again "
        "once it ends (or raise QUEUEGATE_DLQ_LOCK_WAIT)"
    ]
    assert sorted(map(str, after)) == sorted(map(str, before))


async def test_a_team_cannot_take_the_lock_from_the_operators(
    settings: Settings, direct: AbstractChannel, teams: dict[str, Credentials]
) -> None:
    # Given dead letters, and alpha's own broker user
    before = await letters(settings, direct)
    assert teams["alpha"].amqp_url is not None
    connection = await aio_pika.connect(teams["alpha"].amqp_url)
    async with connection:
        # When alpha declares the lock, as a dlq command does
        channel = await connection.channel()
        # Expect the broker to refuse it (teams configure nothing), and a read served at once
        with pytest.raises(ChannelAccessRefused, match="ACCESS_REFUSED"):
            await channel.declare_queue(Topology.of(settings).dlq_lock_queue, exclusive=True)
        quick = settings.model_copy(update={"dlq_lock_wait": 0.1})
        assert await ids_left(quick) == before
