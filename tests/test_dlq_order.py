"""Reading the dead letters keeps their order, however many there are: a quorum queue takes
back, as one command, the returns its channel sent while more than 32 were still unapplied,
and puts back more than 32 letters returned at once in an order of its own (a hash map's)."""

from __future__ import annotations

from aio_pika.abc import AbstractChannel

from queuegate import dlq
from queuegate.settings import Settings
from tests.support import publish_dead_letters

PER_TEAM = 160


async def test_three_reads_of_three_hundred_letters_in_two_queues_keep_their_order(
    settings: Settings, direct: AbstractChannel
) -> None:
    # Given 160 dead letters in alpha's queue and 160 in beta's, far past the 32 a quorum
    # queue takes back in order at once
    alpha = await publish_dead_letters(settings, direct, "alpha", PER_TEAM)
    beta = await publish_dead_letters(settings, direct, "beta", PER_TEAM)

    # When the operator lists them three times in a row
    reads = [[x.message_id for x in (await dlq.peek(settings))[0]] for _ in range(3)]

    # Expect each list to show them all, each queue's in the order they died
    assert reads == [alpha + beta] * 3
