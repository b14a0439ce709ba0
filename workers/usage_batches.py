"""Usage events in batches: a group commit of the worker's usage messages to the broker."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from queuegate.errors import ServiceUnavailable

MAX_EVENTS = 500
"""Events in one message at most (about 350 KB): a burst of finished jobs goes in several
messages rather than one that holds every event in memory twice. Accounting writes up to
``accounting_batch`` events (500 by default) in one statement."""


class UsageBatches:
    """Sends usage events one batch at a time: the events that arrive while a batch awaits
    its confirm go together in the next, so an idle worker sends each at once and a busy one
    a few hundred messages a second however many jobs it finishes.

        batches = UsageBatches(send)   # send(events) publishes one batch, confirmed
        await batches.add(event)       # returns once the batch carrying it is confirmed
        await batches.close()          # waits for the batch in flight, if any

    A failed send fails every event of its batch (each job then goes back to its queue, and
    its redelivery, answered from the outcome store, sends its event again). Accounting
    writes one row per job, so an event sent twice, in one batch or two, is counted once.
    """

    def __init__(self, send: Callable[[list[bytes]], Awaitable[None]]) -> None:
        self._send = send
        self._waiting: list[tuple[bytes, asyncio.Future[None]]] = []
        self._sender: asyncio.Task[None] | None = None
        self.batches_sent = 0
        self.events_sent = 0

    def add(self, event: bytes) -> asyncio.Future[None]:
        """Queue one event; the future resolves once its batch is confirmed, or fails with
        what failed the send. Cancelling it leaves the batch as it is."""
        # A future per event rather than one per batch: cancelling one job's wait (its task
        # cancelled at shutdown) must not cancel the others'.
        confirmed = asyncio.get_running_loop().create_future()
        self._waiting.append((event, confirmed))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_waiting())
        return confirmed

    async def close(self) -> None:
        """Wait for what is being sent (jobs drained first, so nothing new comes)."""
        if self._sender is not None:
            await asyncio.wait([self._sender])

    async def _send_waiting(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting[:MAX_EVENTS], self._waiting[MAX_EVENTS:]
                try:
                    await self._send([event for event, _ in batch])
                except Exception as exc:
                    for _, confirmed in batch:
                        if not confirmed.done():
                            # One error each: an exception raised in hundreds of jobs would
                            # gather all of their tracebacks.
                            failed = ServiceUnavailable(
                                f"the usage batch of {len(batch)} events "
                                f"carrying this job's failed: {exc!r}"
                            )
                            failed.__cause__ = exc
                            confirmed.set_exception(failed)
                    continue
                except BaseException:
                    for _, confirmed in batch:
                        confirmed.cancel()  # does nothing to a future already done
                    raise
                self.batches_sent += 1
                self.events_sent += len(batch)
                for _, confirmed in batch:
                    if not confirmed.done():
                        confirmed.set_result(None)
        finally:
            self._sender = None
