"""The accounting consumer: usage events from the broker to ``usage_log``, in batches."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Self

import asyncpg
from aio_pika.abc import AbstractRobustChannel
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError
from aiormq import spec
from aiormq.abc import AbstractChannel, DeliveredMessage
from pydantic import ValidationError

from accounting.migrate import migrate
from accounting.store import first_per_job, insert_usage
from queuegate.broker import connect, settle
from queuegate.db import create_pool
from queuegate.messages import UsageEvent
from queuegate.metrics import observe_accounting_batch
from queuegate.settings import Settings
from queuegate.topology import Topology

log = logging.getLogger(__name__)

BACKOFF_FIRST = 0.1
BACKOFF_CAP = 5.0
"""Seconds between attempts to write a batch while PostgreSQL is unavailable: doubling, capped."""

CANCEL_TIMEOUT = 5.0
"""Seconds a stopping accountant waits for the broker to confirm its consumer is cancelled."""

_WRITE_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)
# A settle after a reconnect finds its channel gone (ChannelInvalidStateError); one racing the
# connection's loss fails inside aiormq (AMQPError). Either way the broker redelivers.
_CHANNEL_GONE = (ChannelInvalidStateError, AMQPError)


@dataclass(frozen=True, slots=True)
class _Delivery:
    channel: AbstractChannel
    """The channel it came on: its delivery tag means nothing on any other."""
    tag: int
    event: UsageEvent


class Accountant:
    """Writes the usage events of one namespace to PostgreSQL, one row per job.

        async with Accountant(settings) as accountant:   # migrates, connects, declares
            await accountant.run(stop)                    # until `stop` is set, then flushes

    Events are written in batches of ``settings.accounting_batch`` (or whatever arrived
    within ``settings.accounting_linger``) by one idempotent statement, and acknowledged only
    after it commits. While PostgreSQL is unavailable the batch is held and retried with
    backoff, and the broker keeps the rest. Any number may run side by side: a job's row is
    written once however often its event is delivered.

    The counters below are read by metrics; ``wait_until`` waits on them.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topology = Topology(settings.namespace, settings.delivery_limit)
        self.events_received = 0
        """Valid usage events taken from the queue."""
        self.events_rejected = 0
        """Bodies dead-lettered: not a UsageEvent, or a value PostgreSQL cannot store."""
        self.events_written = 0
        """Events whose batch committed (redeliveries included; rows_inserted excludes them)."""
        self.rows_inserted = 0
        self.batches = 0
        self.last_batch_size = 0
        self._settling = asyncio.Lock()
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        # Deliveries in delivery order; the writer sleeps until `_wanted` of them are here.
        self._inbox: deque[_Delivery] = deque()
        self._wanted = 1
        self._arrived = asyncio.Event()
        self._stopping = False
        self._stop_deadline = math.inf
        self._outage_since: float | None = None
        self._pool: asyncpg.Pool | None = None
        self._connected: asyncio.Event | None = None
        self._channel: AbstractRobustChannel | None = None
        self._consumer: tuple[AbstractChannel, str] | None = None
        self._reopening: asyncio.Task[None] | None = None
        self._resources = contextlib.AsyncExitStack()

    async def __aenter__(self) -> Self:
        async with contextlib.AsyncExitStack() as stack:
            # No connection floor: asyncpg would log a traceback for every attempt to restore
            # it during an outage, which the write loop already reports once.
            pool = await create_pool(self.settings, min_size=0, max_size=2)
            stack.push_async_callback(pool.close)
            await migrate(pool, self.settings.database_schema)
            connection = await connect(self.settings.amqp_url, name="queuegate-accounting")
            stack.push_async_callback(connection.close)
            self._connected = connection.connected
            channel = await connection.channel()
            # Four batches: deliveries go on arriving while one is written and acknowledged
            # (with two, the bench wrote 40 % fewer events/s on a busy machine).
            await channel.set_qos(prefetch_count=4 * self.settings.accounting_batch)
            await self.topology.declare_usage(channel)
            self._channel = channel
            self._pool = pool
            self._resources = stack.pop_all()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        # Closing the channel returns anything still unacknowledged to the queue.
        await self._resources.aclose()

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set; then stop consuming, write and acknowledge what is held.

        Held events are given ``settings.shutdown_grace`` seconds to be written after ``stop``;
        what cannot be written by then stays unacknowledged and is delivered again later.
        """
        if self._channel is None:
            raise RuntimeError("use `async with Accountant(settings) as accountant` first")
        # The consumer is on the underlying aiormq channel: aio-pika's message object and task
        # per delivery were a third of accounting's CPU per event. The robust channel restores
        # only its own consumers, so each reopened channel gets this one back here.
        self._channel.reopen_callbacks.add(self._on_reopen)
        try:
            await self._consume()
            stopper = asyncio.create_task(self._stop_consuming(stop))
            try:
                await self._write_until_stopped()
            finally:
                stopper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await stopper
        finally:
            self._channel.reopen_callbacks.discard(self._on_reopen)

    def is_ready(self) -> bool:
        """Connected to the broker and consuming: what ``/readyz`` reports."""
        connected = self._connected is not None and self._connected.is_set()
        return connected and self._consumer is not None

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds; it is checked after every delivery and batch.

        Bound the wait with ``asyncio.timeout`` where the counters may never get there.
        """
        if predicate():
            return
        waiter = (predicate, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        try:
            await waiter[1]
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    async def _on_reopen(self, _: AbstractRobustChannel | None) -> None:
        await self._consume()

    async def _consume(self) -> None:
        if self._stopping or self._channel is None:
            return
        channel = await self._channel.get_underlay_channel()
        channel.on_consumer_cancel_callbacks.add(self._on_cancelled)
        ok = await channel.basic_consume(self.topology.accounting_queue, self._on_delivery)
        assert ok.consumer_tag is not None  # the broker names it when we do not
        self._consumer = (channel, ok.consumer_tag)

    def _on_cancelled(self, frame: spec.Basic.Cancel) -> None:
        consumer = self._consumer
        if consumer is None or frame.consumer_tag != consumer[1]:
            return
        self._consumer = None
        log.warning(
            "the broker cancelled the usage consumer (was its queue deleted?):"
            " reopening the channel, which declares the queue again and consumes"
        )
        # Not awaited: this runs in the channel's reader, which the close waits for. The task is
        # kept so that it is not collected before it is done.
        self._reopening = asyncio.create_task(consumer[0].close())

    async def _on_delivery(self, message: DeliveredMessage) -> None:
        channel, tag = message.channel, message.delivery_tag
        assert tag is not None  # a delivery to a consumer always has one
        try:
            event = UsageEvent.model_validate_json(message.body)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "body"
            log.warning(
                "dead-lettering a usage message that is not a UsageEvent"
                " (message_id=%s, %d bytes, %d errors): %s: %s",
                message.header.properties.message_id,
                len(message.body),
                exc.error_count(),
                where,
                first["msg"],
            )
            await self._settle(channel.basic_reject(tag, requeue=False), "reject")
            self.events_rejected += 1
            self._notify()
            return
        self.events_received += 1
        self._inbox.append(_Delivery(channel, tag, event))
        if len(self._inbox) >= self._wanted:
            self._arrived.set()
        if self._waiters:
            self._notify()

    async def _stop_consuming(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._stopping = True
        self._stop_deadline = asyncio.get_running_loop().time() + self.settings.shutdown_grace
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            channel, tag = consumer
            try:
                # Bounded: while the connection is down the cancel would wait for it to return.
                await channel.basic_cancel(tag, timeout=CANCEL_TIMEOUT)
            except (*_CHANNEL_GONE, TimeoutError) as exc:
                log.warning("could not cancel the usage consumer (%r); closing will end it", exc)
        # Wakes the writer, which flushes what it holds and returns.
        self._arrived.set()

    async def _write_until_stopped(self) -> None:
        # After the stop the inbox is drained too: deliveries that were already on their way
        # when the consumer was cancelled are written rather than redelivered.
        while not (self._stopping and not self._inbox):
            batch = await self._collect()
            if batch and not await self._commit(batch):
                return

    async def _collect(self) -> list[_Delivery]:
        """The next batch: waits for one delivery, then up to ``accounting_linger`` seconds for
        the batch to fill; at once what is held after the stop."""
        size = self.settings.accounting_batch
        await self._await_inbox(1, math.inf)
        deadline = asyncio.get_running_loop().time() + self.settings.accounting_linger
        await self._await_inbox(size, deadline)
        return [self._inbox.popleft() for _ in range(min(size, len(self._inbox)))]

    async def _await_inbox(self, count: int, deadline: float) -> None:
        """Until the inbox holds ``count`` deliveries, the stop is asked, or ``deadline``."""
        if len(self._inbox) >= count or self._stopping:
            return
        self._wanted = count
        self._arrived.clear()
        try:
            async with asyncio.timeout_at(None if deadline == math.inf else deadline):
                await self._arrived.wait()
        except TimeoutError:
            pass

    async def _commit(self, batch: list[_Delivery]) -> bool:
        """Write the batch, retrying while PostgreSQL is unavailable, then settle it.

        Returns False when the stop grace ran out first: the batch stays unacknowledged.
        """
        delay = BACKOFF_FIRST
        while True:
            try:
                inserted, unstorable = await self._write(batch)
                break
            except _WRITE_ERRORS as exc:
                self._note_outage(exc, len(batch))
            grace = self._stop_deadline - asyncio.get_running_loop().time()
            if grace <= 0:
                log.warning(
                    "stopping with %d usage events unwritten: the broker delivers them again",
                    len(batch),
                )
                return False
            await asyncio.sleep(min(delay, grace))
            delay = min(delay * 2, BACKOFF_CAP)
        self._note_recovery()
        written = [d for d in batch if (d.event.team, d.event.job_id) not in unstorable]
        for delivery in batch:
            if (delivery.event.team, delivery.event.job_id) in unstorable:
                await self._settle(
                    delivery.channel.basic_reject(delivery.tag, requeue=False), "reject"
                )
        if written:
            # Deliveries reach the inbox in delivery-tag order and batches are settled in that
            # order, so on the last delivery's channel every earlier tag is in this batch or
            # already settled: one multiple ack covers exactly this batch. Deliveries from a
            # channel lost since cannot be acknowledged; the insert ignores their redelivery.
            last = written[-1]
            await self._settle(last.channel.basic_ack(last.tag, multiple=True), "acknowledge")
        self.events_rejected += len(batch) - len(written)
        self.events_written += len(written)
        self.rows_inserted += inserted
        self.batches += 1
        self.last_batch_size = len(batch)
        observe_accounting_batch(
            len(written), len(batch) - len(written), min(d.event.ts for d in batch)
        )
        self._notify()
        return True

    async def _write(self, batch: list[_Delivery]) -> tuple[int, set[tuple[str, str]]]:
        """Insert the batch; return the rows inserted and the (team, job id) of each event that
        cannot be stored (job ids are unique within a team only)."""
        events = [delivery.event for delivery in batch]
        try:
            return await insert_usage(self._pool, events), set()
        except _WRITE_ERRORS as exc:
            if not _is_unstorable(exc):
                raise
        # One value PostgreSQL refuses fails the whole statement. Row by row finds it, so the
        # rest are written and only that event is dead-lettered instead of blocking the queue.
        inserted = 0
        unstorable: set[tuple[str, str]] = set()
        for event in first_per_job(events):
            try:
                inserted += await insert_usage(self._pool, [event])
            except _WRITE_ERRORS as exc:
                if not _is_unstorable(exc):
                    raise
                log.error(
                    "usage event %s cannot be stored, dead-lettering it: %s", event.job_id, exc
                )
                unstorable.add((event.team, event.job_id))
        return inserted, unstorable

    async def _settle(self, action: Awaitable[None], verb: str) -> None:
        # One settlement at a time, in the order issued (the lock is fair): a batch's multiple
        # ack must not overtake the reject of an earlier tag, or the broker would see that
        # reject's tag as unknown and close the channel.
        # The rows are committed before any settlement, and inserts are idempotent.
        async with self._settling:
            await settle(action, f"{verb} usage deliveries", log)

    def _notify(self) -> None:
        # Synchronous and a no-op without waiters: it runs for every delivery.
        for predicate, future in self._waiters:
            if not future.done() and predicate():
                future.set_result(None)

    def _note_outage(self, exc: BaseException, held: int) -> None:
        if self._outage_since is None:
            self._outage_since = asyncio.get_running_loop().time()
            log.warning(
                "cannot write usage to PostgreSQL (%s: %s): holding %d events unacknowledged,"
                " retrying with backoff up to %.0f s",
                type(exc).__name__,
                exc,
                held,
                BACKOFF_CAP,
            )

    def _note_recovery(self) -> None:
        if self._outage_since is not None:
            down = asyncio.get_running_loop().time() - self._outage_since
            log.warning("writing usage to PostgreSQL again after %.1f s", down)
            self._outage_since = None


def _is_unstorable(exc: BaseException) -> bool:
    """Whether a write failed because of a value in it rather than PostgreSQL's availability.

    asyncpg raises DataError also for a Python value it cannot encode (an int out of range).
    """
    return isinstance(exc, asyncpg.DataError | asyncpg.IntegrityConstraintViolationError)
