"""The answer to a channel the broker closes, sent however busy its connection is.

When the broker closes a channel (a consume of a queue that is gone, a passive declare of what
is not there), the client must answer channel.close-ok before the channel's number is used
again. aiormq 7.2 queues that answer with ``put_nowait`` and drops it when the connection's
write queue (ten frames) is full, as it is whenever a dozen publishes were queued in the same
turn of the event loop. The broker then keeps the number closing, and the robust channel's
reopening on it reads as a second channel.open: the broker closes the whole connection
(CHANNEL_ERROR), failing every publish awaiting its confirm and every consumer on it (a
client's reply queue refused once under load took 32 publishes down with it). Here the answer
waits for room in the queue, as every other frame of aiormq's does; the channel closes once it
is queued, so its reopening is queued after it. Importing ``queuegate.broker`` applies it.
"""

from __future__ import annotations

from aiormq import spec
from aiormq.abc import ChannelFrame
from aiormq.channel import Channel, exception_by_code


async def _on_close_frame(self: Channel, frame: spec.Channel.Close) -> None:
    """aiormq's own, but for the close-ok awaited into the write queue, never dropped."""
    exc = exception_by_code(frame)
    self._close_exception = exc
    await self.write_queue.put(
        ChannelFrame.marshall(channel_number=self.number, frames=[spec.Channel.CloseOk()])
    )
    # aiormq's private event, set where its own handler sets it.
    self._Channel__close_event.set()  # type: ignore[attr-defined]
    raise exc


def apply() -> None:
    """Answer every aiormq channel's close this way (idempotent)."""
    # Checked, not assumed: an aiormq that renamed it would go on dropping the answer.
    if not hasattr(Channel, "_on_close_frame"):
        raise RuntimeError("aiormq's channel changed: review queuegate/channel_close.py")
    Channel._on_close_frame = _on_close_frame  # type: ignore[method-assign]
