"""A batch's locks: one collector at a time, and one submitter.

The gateway declares the lock, an empty queue among the team's reply queues; holding it is
consuming it exclusively, so a second holder is refused and the broker releases the lock
with the holder's connection, even on SIGKILL (quorum queues ignore exclusive consumers, so
the batch's results queue cannot serve as one).
"""

from __future__ import annotations

import aiormq
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from aiormq.abc import DeliveredMessage

from queuegate.errors import BatchError


async def hold_lock(connection: AbstractRobustConnection, queue: str, busy: str) -> None:
    """Hold the lock ``queue`` while ``connection`` lives, taken again whenever its channel
    comes back; BatchError(``busy``) when another holds it."""
    channel = await connection.channel()

    async def hold(channel: AbstractRobustChannel | None) -> None:
        if channel is not None:
            underlay = await channel.get_underlay_channel()
            await underlay.basic_consume(queue, _ignore, exclusive=True)

    try:
        await hold(channel)
    except aiormq.exceptions.ChannelAccessRefused as exc:
        raise BatchError(busy) from exc
    # The robust channel restores nothing of ours: the lock is taken again by hand.
    channel.reopen_callbacks.add(hold)


async def _ignore(message: DeliveredMessage) -> None:
    """The lock queue holds nothing; were a message to land there, it is of no use."""
