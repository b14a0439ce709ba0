"""The accounting consumer: usage events from the broker to ``usage_log``, in batches."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Self

import asyncpg
import redis.asyncio as aioredis
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from aiormq import spec
from aiormq.abc import AbstractChannel, DeliveredMessage
from aiormq.exceptions import AMQPError
from pydantic import ValidationError
from redis.exceptions import RedisError

from accounting.migrate import migrate
from accounting.store import insert_usage, prepare_insert, stage, storable_json
from queuegate import tracing
from queuegate.broker import CONNECTION_LOST, Consumer, connect, consume, settle
from queuegate.db import DB_ERRORS, is_unreachable, reconnect, wait_for_pool
from queuegate.errors import ConfigError
from queuegate.keys import Keys
from queuegate.messages import UsageBatch, UsageEvent
from queuegate.metrics import (
    observe_accounting_batch,
    observe_spend_correction,
    set_accounting_lag,
)
from queuegate.outage import OutageLog
from queuegate.redis_client import redis_for
from queuegate.registry import list_teams
from queuegate.runtime import serving
from queuegate.settings import Settings
from queuegate.spend import (
    Correction,
    current_month,
    ledger_scopes,
    reconcile,
    reconciler_token,
)
from queuegate.topology import MESSAGE_TYPE_USAGE_BATCH, Topology

log = logging.getLogger(__name__)

BACKOFF_FIRST = 0.1
BACKOFF_CAP = 5.0
"""Seconds between attempts to write a batch while PostgreSQL is unavailable: doubling, capped."""

CANCEL_TIMEOUT = 5.0
"""Seconds a stopping accountant waits for the broker to confirm its consumer is cancelled."""

NOTABLE_DRIFT = Decimal("0.000001")
"""USD of drift worth a log line: each job's cost is rounded up to a nano-dollar in Redis,
so a few nano-dollars of difference from PostgreSQL's exact sum are no drift."""
IN_FLIGHT = 2
"""Batches written at once: the next batch is built and sent on a second connection while
PostgreSQL writes and commits the one before, so that work overlaps this process's (one at a
time, the accountant sat idle for each statement). PostgreSQL inserts the second's rows
meanwhile; its daily rollup (usage_daily_add) waits for the first's commit when they share a
day, team and model. Each is acknowledged after its commit and the previous one's."""
PREFETCH_BATCHES = IN_FLIGHT + 3
"""Batches' worth of events the prefetch holds: those in flight and three more, so that
deliveries go on arriving while they are written and acknowledged (one at a time and with
one more, the bench wrote 40 % fewer events/s than with three)."""
EVENTS_PER_MESSAGE = 20
"""Events a worker's batch carries under load (18-23 in the bench): the prefetch is counted in
messages of that size, so that a backlog of full worker batches (500 events) held during a
PostgreSQL outage stays bounded (125 messages by default); single events from older workers
arrive 125 at a time."""
LAG_EVERY = 1.0
"""Seconds between updates of the accounting lag gauge while events wait unwritten: it must
grow through a PostgreSQL outage, when no batch commits to update it."""
_RECONCILE_ERRORS: tuple[type[Exception], ...] = (*DB_ERRORS, RedisError, ConfigError)


# Not frozen: a frozen dataclass takes 3.5x as long to build, and one is built per message.
@dataclass(slots=True)
class _Delivery:
    channel: AbstractChannel
    """The channel it came on: its delivery tag means nothing on any other."""
    tag: int
    events: list[UsageEvent] | None
    """One event (a ``usage`` message) or a batch's (``usage-batch``); None when the body is
    neither: it is dead-lettered in its turn (see _commit)."""


class Accountant:
    """Writes the usage events of one namespace to PostgreSQL, one row per job.

        async with Accountant(settings) as accountant:   # migrates, connects, declares
            await accountant.run(stop)                    # until `stop` is set, then flushes

    Events are written in batches of ``settings.accounting_batch`` (or whatever arrived
    within ``settings.accounting_linger``) by one idempotent transaction, and acknowledged only
    after it commits. While PostgreSQL is unavailable the batch is held and retried with
    backoff, and the broker keeps the rest. Any number may run side by side: a job's row is
    written once however often its event is delivered, alone or in a worker's batch
    (``UsageBatch``; a message of type ``usage`` holds one event, as older workers send them).

    The counters below are read by metrics; ``wait_until`` waits on them.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topology = Topology.of(settings)
        self.messages_received = 0
        """Usage messages taken from the queue: one event each, or a batch of them."""
        self.events_received = 0
        """Valid usage events taken from the queue."""
        self.events_rejected = 0
        """Events dead-lettered with their message (a value PostgreSQL cannot store, or a
        batch with one such), and bodies that are no usage message (each counts one)."""
        self.events_written = 0
        """Events whose batch committed (redeliveries included; rows_inserted excludes them)."""
        self.rows_inserted = 0
        self.batches = 0
        self.last_batch_size = 0
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        # Deliveries in delivery order, holding `_held` events (a malformed body counts one);
        # the writer sleeps until `_wanted` of them are here.
        self._inbox: deque[_Delivery] = deque()
        self._held = 0
        self._wanted = 1
        # The events of the batches being written (retried through an outage), by id().
        self._writing: dict[int, list[UsageEvent]] = {}
        self._arrived = asyncio.Event()
        self._stopping = False
        self._stop_deadline = math.inf
        self._postgres = OutageLog(
            log,
            "PostgreSQL",
            "usage events stay unacknowledged and are written again with backoff"
            f" up to {BACKOFF_CAP:.0f} s",
        )
        self._broker = OutageLog(
            log,
            "RabbitMQ",
            "usage events wait in their queue",
        )
        self._ledgers = OutageLog(
            log, "Redis or PostgreSQL (spend reconciliation)", "spend ledgers are not reconciled"
        )
        self._token = reconciler_token()
        self._pool: asyncpg.Pool | None = None
        self._redis: aioredis.Redis | None = None
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._consumer: Consumer | None = None
        self._reopening: asyncio.Task[None] | None = None
        self._resources = contextlib.AsyncExitStack()

    async def __aenter__(self) -> Self:
        async with contextlib.AsyncExitStack() as stack:
            # No connection floor: asyncpg would log a traceback for every attempt to restore
            # it during an outage, which the write loop already reports once.
            # A connection per batch in flight, and one for spend reconciliation. Not reset
            # when released: that cost a round trip per batch (11 % of this process's time),
            # and nothing here leaves session state (migrations' locks are transactions').
            # Each connection gets its staging table once, as it opens, not at every batch.
            pool = await wait_for_pool(
                self.settings,
                min_size=0,
                max_size=IN_FLIGHT + 1,
                reset_sessions=False,
                prepare=stage,
            )
            stack.push_async_callback(pool.close)
            await migrate(pool, self.settings.database_schema)
            await _open_writers(pool)
            # A robust connection: it reconnects, reopens the channel and declares the exchange
            # and queue again on it (_on_reopen consumes again).
            connection = await connect(self.settings.amqp_url, name="queuegate-accounting")
            stack.push_async_callback(connection.close)
            connection.close_callbacks.add(self._on_lost)
            channel = await connection.channel()
            await self.topology.declare_usage(channel)
            self._connection, self._channel = connection, channel
            self._redis = redis_for(self.settings)
            stack.push_async_callback(self._redis.aclose)
            self._pool = pool
            self._resources = stack.pop_all()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        # Closing the connection returns anything still unacknowledged to the queue.
        self._stopping = True
        await self._resources.aclose()

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set; then stop consuming, write and acknowledge what is held.

        Held events are given ``settings.shutdown_grace`` seconds to be written after ``stop``;
        what cannot be written by then stays unacknowledged and is delivered again later.
        """
        channel = self._channel
        if self._pool is None or channel is None:
            raise RuntimeError("use `async with Accountant(settings) as accountant` first")
        if stop.is_set():
            # Stopped while starting: a stop signal then cancels the start (stop_on_signals),
            # but an await inside the broker or database client can swallow that cancel, and
            # only the stop, set with it, says not to begin consuming.
            return
        serving(stop)  # a stop from here on writes and acknowledges what was taken
        channel.reopen_callbacks.add(self._on_reopen)
        try:
            await self._consume(channel)
            stopper = asyncio.create_task(self._stop_consuming(stop))
            reconciler = asyncio.create_task(self._reconcile_until(stop))
            lag = asyncio.create_task(self._report_lag())
            try:
                await self._write_until_stopped()
            finally:
                set_accounting_lag(None)  # what is held goes back to the queue
                for task in (lag, reconciler, stopper):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        finally:
            channel.reopen_callbacks.discard(self._on_reopen)

    async def reconcile_spend(self) -> list[Correction] | None:
        """Reconcile this month's spend ledger of every budgeted team (and capped model) with
        usage_log now; None when another accountant is at it. Raises what Redis or
        PostgreSQL raise (``run`` calls it every ``settings.spend_reconcile_interval``)."""
        assert self._pool is not None and self._redis is not None
        scopes = [
            scope
            for team in await list_teams(self._pool)
            for scope in ledger_scopes(team.name, team.config)
        ]
        keys = Keys(self.settings.redis_prefix)
        corrections = await reconcile(
            self._redis, self._pool, keys, scopes, current_month(), token=self._token
        )
        for correction in corrections or []:
            _report(correction)
        return corrections

    async def _reconcile_until(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.reconcile_spend()
            except _RECONCILE_ERRORS as exc:
                self._ledgers.failed(exc)
            else:
                self._ledgers.recovered()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.spend_reconcile_interval):
                    await stop.wait()

    def unwritten_since(self) -> datetime | None:
        """When the earliest job whose usage event is held unwritten ended; None when every
        event taken has been written."""
        held = [e.ts for d in self._inbox for e in d.events or ()]
        held += [e.ts for events in self._writing.values() for e in events]
        # An event's time without an offset is UTC, as accounting stores it.
        return min((ts if ts.tzinfo else ts.replace(tzinfo=UTC) for ts in held), default=None)

    async def _report_lag(self) -> None:
        while True:
            set_accounting_lag(self.unwritten_since())
            if self._waiters:
                self._notify()
            await asyncio.sleep(LAG_EVERY)

    def is_ready(self) -> bool:
        """Connected to the broker and consuming: what ``/readyz`` reports."""
        connection = self._connection
        connected = connection is not None and connection.connected.is_set()
        return connected and self._consumer is not None and not self._stopping

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds; it is checked after every delivery and batch, and
        every update of the lag gauge.

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

    async def _on_reopen(self, channel: AbstractRobustChannel | None) -> None:
        # The robust channel has declared the exchange and queue again; consume once more.
        if channel is not None and not self._stopping:
            await self._consume(channel)

    async def _consume(self, channel: AbstractRobustChannel) -> None:
        # On the underlying aiormq channel: aio-pika's message object and task per delivery
        # would double its cost, and a delivery holds a batch of events (see queuegate.broker).
        consumer = await consume(
            channel,
            self.topology.accounting_queue,
            self._on_delivery,
            prefetch=max(
                1, PREFETCH_BATCHES * self.settings.accounting_batch // EVENTS_PER_MESSAGE
            ),
        )
        consumer.channel.on_consumer_cancel_callbacks.add(self._on_cancelled)
        self._consumer = consumer
        self._broker.recovered()

    def _on_cancelled(self, frame: spec.Basic.Cancel) -> None:
        consumer = self._consumer
        if consumer is None or frame.consumer_tag != consumer.tag:
            return
        self._consumer = None
        self._broker.failed(ConnectionError("the broker cancelled the consumer"))
        log.warning(
            "the broker cancelled the usage consumer (was its queue deleted?): reopening the"
            " channel, which declares the queue again and consumes"
        )
        # Not awaited: this runs in the channel's reader, which the close waits for. Kept so
        # that the task is not collected before it is done.
        self._reopening = asyncio.create_task(consumer.channel.close())

    def _on_lost(self, _: object, reason: BaseException | None = None) -> None:
        if self._stopping or self._consumer is None:
            return
        self._consumer = None  # not ready until the reopened channel consumes again
        self._broker.failed(reason or ConnectionError("the connection was lost"))

    async def _on_delivery(self, message: DeliveredMessage) -> None:
        # Synchronous before any await: aiormq starts a task per delivery in delivery order,
        # and the inbox must keep that order (see _commit).
        tag = message.delivery_tag
        assert tag is not None  # a delivery to a consumer always has one
        try:
            events = _events(message)
        except ValidationError as exc:
            _log_malformed(message, exc)
            self._inbox.append(_Delivery(message.channel, tag, None))
            self._held += 1
        else:
            self._inbox.append(_Delivery(message.channel, tag, events))
            self._held += len(events)
            self.events_received += len(events)
        self.messages_received += 1
        if self._held >= self._wanted:
            self._arrived.set()
        if self._waiters:
            self._notify()

    async def _stop_consuming(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._stopping = True
        self._stop_deadline = asyncio.get_running_loop().time() + self.settings.shutdown_grace
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            try:
                # Bounded: while the connection is down the cancel would wait for it to return.
                await consumer.channel.basic_cancel(consumer.tag, timeout=CANCEL_TIMEOUT)
            except (*CONNECTION_LOST, AMQPError, TimeoutError) as exc:
                log.warning("could not cancel the usage consumer (%r); closing will end it", exc)
        # Wakes the writer, which flushes what it holds and returns.
        self._arrived.set()

    async def _write_until_stopped(self) -> None:
        # After the stop the inbox is drained too: deliveries that were already on their way
        # when the consumer was cancelled are written rather than redelivered.
        in_flight: deque[asyncio.Task[bool]] = deque()
        try:
            while not (self._stopping and not self._inbox):
                batch = await self._collect()
                if not batch:
                    continue
                previous = in_flight[-1] if in_flight else None
                in_flight.append(asyncio.create_task(self._commit(batch, previous)))
                # The next batch is collected and sent while this one commits; beyond
                # IN_FLIGHT, the oldest is awaited first.
                while in_flight and (len(in_flight) >= IN_FLIGHT or in_flight[0].done()):
                    if not await in_flight.popleft():
                        return
            while in_flight:
                if not await in_flight.popleft():
                    return
        finally:
            # Cancelled (or returning early): what is not settled stays unacknowledged.
            for task in in_flight:
                task.cancel()
            for task in in_flight:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _collect(self) -> list[_Delivery]:
        """The next batch: waits for one delivery, then up to ``accounting_linger`` seconds for
        ``accounting_batch`` events; at once what is held after the stop. Whole deliveries
        only: one worker's batch is written by one transaction, whatever its size."""
        size = self.settings.accounting_batch
        await self._await_inbox(1, math.inf)
        deadline = asyncio.get_running_loop().time() + self.settings.accounting_linger
        await self._await_inbox(size, deadline)
        batch: list[_Delivery] = []
        taken = 0
        while self._inbox and (not batch or taken < size):
            delivery = self._inbox.popleft()
            taken += 1 if delivery.events is None else len(delivery.events)
            batch.append(delivery)
        self._held -= taken
        return batch

    async def _await_inbox(self, count: int, deadline: float) -> None:
        """Until the inbox holds ``count`` events, the stop is asked, or ``deadline``."""
        if self._held >= count or self._stopping:
            return
        self._wanted = count
        self._arrived.clear()
        try:
            async with asyncio.timeout_at(None if deadline == math.inf else deadline):
                await self._arrived.wait()
        except TimeoutError:
            pass

    async def _commit(self, batch: list[_Delivery], previous: asyncio.Task[bool] | None) -> bool:
        """Write the batch, retrying while PostgreSQL is unavailable, then settle it once the
        ``previous`` batch is settled.

        Returns False when the stop grace ran out first, for this batch or the previous: the
        batch stays unacknowledged (written or not: the insert ignores its redelivery).
        """
        # Flattened once: the write, its retries, the settlement and the counters read it.
        events = [event for delivery in batch for event in delivery.events or ()]
        delay = BACKOFF_FIRST
        self._writing[id(events)] = events
        try:
            while True:
                started = time.time_ns()
                try:
                    inserted, unstorable = await self._write(events)
                    break
                except DB_ERRORS as exc:
                    self._postgres.failed(exc)
                    if is_unreachable(exc):
                        assert self._pool is not None
                        await reconnect(self._pool)
                grace = self._stop_deadline - asyncio.get_running_loop().time()
                if grace <= 0:
                    log.warning(
                        "stopping with %d usage messages unwritten: the broker delivers them again",
                        len(batch),
                    )
                    return False
                await asyncio.sleep(min(delay, grace))
                delay = min(delay * 2, BACKOFF_CAP)
        finally:
            del self._writing[id(events)]
        ended = time.time_ns()
        self._postgres.recovered()
        # In delivery order: a multiple ack of this batch would settle the previous one's tags
        # too, and the previous batch may still be writing (or never be written).
        if previous is not None and not await previous:
            return False
        # A batch goes whole: the other events of a rejected delivery are written (and are not
        # written twice when it is replayed from the dead letters).
        stored = [e for e in events if _key(e) not in unstorable] if unstorable else events
        written = len(stored)
        rejected = len(events) - written + sum(delivery.events is None for delivery in batch)
        last: _Delivery | None = None
        # Settlements are sent in the order awaited: these rejects reach the broker before the
        # multiple ack below, which would otherwise have settled their tags already.
        for delivery in batch:
            if delivery.events is None or (
                unstorable and any(_key(e) in unstorable for e in delivery.events)
            ):
                await settle(
                    delivery.channel.basic_reject(delivery.tag, requeue=False),
                    "reject a usage delivery",
                    log,
                )
            else:
                last = delivery
        if last is not None:
            # Deliveries reach the inbox in delivery-tag order and batches are settled in that
            # order, so on the last delivery's channel every earlier tag is in this batch or
            # already settled: one multiple ack covers exactly this batch. Deliveries from a
            # channel lost since cannot be acknowledged; the insert ignores their redelivery.
            await settle(
                last.channel.basic_ack(last.tag, multiple=True), "acknowledge usage deliveries", log
            )
        if tracing.ON:
            _traced_write(stored, written + rejected, started, ended)
        self.events_rejected += rejected
        self.events_written += written
        self.rows_inserted += inserted
        self.batches += 1
        self.last_batch_size = written + rejected
        if events:
            observe_accounting_batch(written, rejected)
        self._notify()
        return True

    async def _write(self, events: list[UsageEvent]) -> tuple[int, set[tuple[str, str]]]:
        """Insert a batch's events; return the rows inserted and the (team, job id) of each
        event that cannot be stored (job ids are unique within a team only)."""
        try:
            return await insert_usage(self._pool, events, staged=True), set()
        except DB_ERRORS as exc:
            if not _is_unstorable(exc):
                raise
        # One value PostgreSQL refuses fails the whole statement. Row by row finds it, so the
        # rest are written and only that event is dead-lettered instead of blocking the queue.
        inserted = 0
        unstorable: set[tuple[str, str]] = set()
        # Every event, not the first of each job: another of a job's events may bill calls
        # made under another claim (``insert_usage``).
        for event in events:
            try:
                inserted += await insert_usage(self._pool, [event], staged=True)
            except DB_ERRORS as exc:
                if not _is_unstorable(exc):
                    raise
                log.error(
                    "usage event %s cannot be stored, dead-lettering it: %s", event.job_id, exc
                )
                unstorable.add(_key(event))
        return inserted, unstorable

    def _notify(self) -> None:
        # Synchronous and a no-op without waiters: it runs for every delivery.
        for predicate, future in self._waiters:
            if not future.done() and predicate():
                future.set_result(None)


async def _open_writers(pool: asyncpg.Pool) -> None:
    """Open the connections of the batches in flight and prepare the insert on each before
    consuming: else the first batches after a start, a backlog's, wait for it. A connection's
    first batch of 500 cost PostgreSQL twice the CPU of the next (23-25 ms against 12-13)
    and took 30-60 ms longer, besides opening the connection."""
    async with contextlib.AsyncExitStack() as held:
        for _ in range(IN_FLIGHT):
            await prepare_insert(await held.enter_async_context(pool.acquire()))


def _traced_write(written: list[UsageEvent], size: int, started: int, ended: int) -> None:
    """A batch's write in the trace of each job written that was recorded, as a child of the
    job's span: one statement wrote the batch of ``size``, so each span is that statement's."""
    for event in written:
        if event.trace_id is None or event.span_id is None:
            continue
        parent = tracing.continued(event.trace_id, event.span_id)
        if parent is None:
            continue
        tracing.record(
            "accounting write",
            started,
            ended,
            kind="CLIENT",
            parent=parent,
            attributes={
                "db.system.name": "postgresql",
                "db.operation.name": "INSERT",
                "db.collection.name": "usage_log",
                "db.operation.batch.size": size,
                "queuegate.team": event.team,
                "queuegate.job_id": event.job_id,
            },
        )


def _report(correction: Correction) -> None:
    scope = correction.scope
    what = f"team {scope.team}" + (f" on {scope.model}" if scope.model else "")
    drift = correction.drift
    observe_spend_correction(scope.team, scope.model, float(drift))
    if correction.before is None:
        log.info(
            "%s had no spend ledger for %s in Redis (a new month, or Redis lost it): set from"
            " PostgreSQL at $%s",
            what,
            correction.month,
            correction.after,
        )
    elif abs(drift) >= NOTABLE_DRIFT:
        log.warning(
            "%s's spend ledger for %s corrected by $%s to $%s (lapsed reservations, lost "
            "settles, or spend while it had no budget): Redis had counted $%s",
            what,
            correction.month,
            -drift,
            correction.after,
            correction.before,
        )


def _events(message: DeliveredMessage) -> list[UsageEvent]:
    """The events a usage message holds: a batch's (``usage-batch``), or one (``usage``, what
    workers before batches send, and what any other type is read as), each NUL in their text
    as U+FFFD: the row of a job whose key id, model or error held one is still written."""
    body = storable_json(message.body)
    if message.header.properties.message_type == MESSAGE_TYPE_USAGE_BATCH:
        return UsageBatch.model_validate_json(body).events
    return [UsageEvent.model_validate_json(body)]


def _log_malformed(message: DeliveredMessage, exc: ValidationError) -> None:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    log.warning(
        "dead-lettering a usage message that is not a UsageEvent or UsageBatch"
        " (type=%s, message_id=%s, %d bytes, %d errors): %s: %s",
        message.header.properties.message_type,
        message.header.properties.message_id,
        len(message.body),
        exc.error_count(),
        where,
        first["msg"],
    )


def _key(event: UsageEvent) -> tuple[str, str]:
    # Job ids are unique within a team only.
    return event.team, event.job_id


def _is_unstorable(exc: BaseException) -> bool:
    """Whether a write failed because of a value in it rather than PostgreSQL's availability.

    asyncpg raises DataError also for a Python value it cannot encode (an int out of range).
    """
    return isinstance(exc, asyncpg.DataError | asyncpg.IntegrityConstraintViolationError)
