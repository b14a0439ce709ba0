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


class LockHeld(BatchError):
    """Another process holds the lock: a wait, not a failure. A holder that stalled keeps
    it until the broker drops its connection (missed heartbeats), which may be after its
    batch lease lapsed and another runner took the batch up."""


class BatchLock:
    """Whether the lock is held: False from the moment its channel closes (the broker then
    releases it to whoever asks next) until it is taken again, if it is."""

    def __init__(self) -> None:
        self.held = False

    def dropped(self, *_: object) -> None:
        self.held = False


async def hold_lock(
    connection: AbstractRobustConnection, queue: str, busy: str, *, retake: bool
) -> BatchLock:
    """Hold the lock ``queue`` on a channel of ``connection``; BatchError(``busy``) when
    another holds it. ``retake``: take it again whenever the channel comes back (a
    collector, which writes each line once whoever collects); else it stays lost."""
    lock = BatchLock()
    channel = await connection.channel()

    async def hold(channel: AbstractRobustChannel | None) -> None:
        if channel is not None:
            underlay = await channel.get_underlay_channel()
            await underlay.basic_consume(queue, _ignore, exclusive=True)
            lock.held = True

    try:
        await hold(channel)
    except aiormq.exceptions.ChannelAccessRefused as exc:
        raise LockHeld(busy) from exc
    channel.close_callbacks.add(lock.dropped)
    if retake:
        # The robust channel restores nothing of ours: the lock is taken again by hand.
        channel.reopen_callbacks.add(hold)
    return lock


async def _ignore(message: DeliveredMessage) -> None:
    """The lock queue holds nothing; were a message to land there, it is of no use."""
