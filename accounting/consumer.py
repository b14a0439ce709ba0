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
from decimal import Decimal
from functools import partial
from typing import Self

import asyncpg
import redis.asyncio as aioredis
from aio_pika.exceptions import AMQPError
from pydantic import ValidationError
from redis.exceptions import RedisError

from accounting.intake import HANDSHAKE_TIMEOUT, Delivery, Intake, IntakeClosed
from accounting.migrate import migrate
from accounting.store import first_per_job, insert_usage
from queuegate import tracing
from queuegate.broker import connect
from queuegate.db import DB_ERRORS, is_unreachable, reconnect, wait_for_pool
from queuegate.errors import ConfigError, ServiceUnavailable
from queuegate.keys import Keys
from queuegate.messages import UsageEvent
from queuegate.metrics import observe_accounting_batch, observe_spend_correction
from queuegate.outage import OutageLog
from queuegate.redis_client import redis_for
from queuegate.registry import list_teams
from queuegate.settings import Settings
from queuegate.spend import Correction, Scope, current_month, reconcile, reconciler_token
from queuegate.topology import Topology

log = logging.getLogger(__name__)

BACKOFF_FIRST = 0.1
BACKOFF_CAP = 5.0
"""Seconds between attempts to write a batch while PostgreSQL is unavailable: doubling, capped."""

CANCEL_TIMEOUT = 5.0
"""Seconds a stopping accountant waits for the broker to confirm its consumer is cancelled."""

_BROKER_ERRORS = (OSError, TimeoutError, IntakeClosed, ServiceUnavailable, AMQPError)
NOTABLE_DRIFT = Decimal("0.000001")
"""USD of drift worth a log line: each job's cost is rounded up to a nano-dollar in Redis,
so a few nano-dollars of difference from PostgreSQL's exact sum are no drift."""
_RECONCILE_ERRORS: tuple[type[Exception], ...] = (*DB_ERRORS, RedisError, ConfigError)


# Not frozen: a frozen dataclass takes 3.5x as long to build, and one is built per message.
@dataclass(slots=True)
class _Delivery:
    intake: Intake
    """The connection it came on: its delivery tag means nothing on any other."""
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
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        # Deliveries in delivery order; the writer sleeps until `_wanted` of them are here.
        self._inbox: deque[_Delivery] = deque()
        self._wanted = 1
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
            "usage events wait in their queue; connecting again with backoff"
            f" up to {BACKOFF_CAP:.0f} s",
        )
        self._ledgers = OutageLog(
            log, "Redis or PostgreSQL (spend reconciliation)", "spend ledgers are not reconciled"
        )
        self._token = reconciler_token()
        self._pool: asyncpg.Pool | None = None
        self._redis: aioredis.Redis | None = None
        self._intake: Intake | None = None
        self._resources = contextlib.AsyncExitStack()

    async def __aenter__(self) -> Self:
        async with contextlib.AsyncExitStack() as stack:
            # No connection floor: asyncpg would log a traceback for every attempt to restore
            # it during an outage, which the write loop already reports once.
            pool = await wait_for_pool(self.settings, min_size=0, max_size=2)
            stack.push_async_callback(pool.close)
            await migrate(pool, self.settings.database_schema)
            await self._declare()  # fails here, not in run(), when the broker is unreachable
            self._redis = redis_for(self.settings)
            stack.push_async_callback(self._redis.aclose)
            self._pool = pool
            self._resources = stack.pop_all()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        # Closing the connection returns anything still unacknowledged to the queue.
        if self._intake is not None:
            await self._intake.close()
        await self._resources.aclose()

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set; then stop consuming, write and acknowledge what is held.

        Held events are given ``settings.shutdown_grace`` seconds to be written after ``stop``;
        what cannot be written by then stays unacknowledged and is delivered again later.
        """
        if self._pool is None:
            raise RuntimeError("use `async with Accountant(settings) as accountant` first")
        consumer = asyncio.create_task(self._consume())
        stopper = asyncio.create_task(self._stop_consuming(stop))
        reconciler = asyncio.create_task(self._reconcile_until(stop))
        try:
            await self._write_until_stopped()
        finally:
            for task in (reconciler, stopper, consumer):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def reconcile_spend(self) -> list[Correction] | None:
        """Reconcile this month's spend ledger of every budgeted team (and capped model) with
        usage_log now; None when another accountant is at it. Raises what Redis or
        PostgreSQL raise (``run`` calls it every ``settings.spend_reconcile_interval``)."""
        assert self._pool is not None and self._redis is not None
        scopes = [
            scope
            for team in await list_teams(self._pool)
            for scope in (
                ([Scope(team.name)] if team.config.budget_usd is not None else [])
                + [
                    Scope(team.name, model)
                    for model, limits in team.config.models.items()
                    if limits.budget_usd is not None
                ]
            )
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

    def is_ready(self) -> bool:
        """Connected to the broker and consuming: what ``/readyz`` reports."""
        intake = self._intake
        return intake is not None and intake.is_open and not self._stopping

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

    async def _declare(self) -> None:
        # On a connection of its own: declarations are rare, and aio-pika does them well.
        connection = await connect(self.settings.amqp_url, name="queuegate-accounting-declare")
        async with connection:
            await self.topology.declare_usage(await connection.channel())

    async def _consume(self) -> None:
        """Consume on a connection of our own, and again on a new one whenever it ends (the
        broker away, the queue deleted): each declares the queue before consuming it."""
        loop = asyncio.get_running_loop()
        delay = BACKOFF_FIRST
        declared = True  # __aenter__ has just declared the queue
        while not self._stopping:
            try:
                if not declared:
                    # Bounded: a robust connection lost mid-declare would wait for its return.
                    async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                        await self._declare()
                declared = False
                intake = await Intake.open(
                    self.settings.amqp_url,
                    self.topology.accounting_queue,
                    # Four batches: deliveries go on arriving while one is written and
                    # acknowledged (with two, the bench wrote 40 % fewer events/s).
                    4 * self.settings.accounting_batch,
                    self._on_deliveries,
                    name="queuegate-accounting",
                )
            except _BROKER_ERRORS as exc:
                self._broker.failed(exc)
            else:
                self._intake, opened = intake, loop.time()
                self._broker.recovered()
                reason = await asyncio.shield(intake.closed)  # a cancel here must not close it
                if not self._stopping:
                    self._broker.failed(reason or IntakeClosed("closed"))
                # A connection the broker ends at once (a channel closed on every consume) is
                # retried with backoff too; one that lasted starts its outage's backoff afresh.
                if loop.time() - opened > BACKOFF_CAP:
                    delay = BACKOFF_FIRST
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_CAP)

    def _on_deliveries(self, intake: Intake, deliveries: list[Delivery]) -> None:
        # Called with every read's deliveries, so it must stay synchronous and cheap.
        inbox = self._inbox
        for delivery in deliveries:
            try:
                event = UsageEvent.model_validate_json(delivery.body)
            except ValidationError as exc:
                self._reject_malformed(intake, delivery, exc)
                continue
            inbox.append(_Delivery(intake, delivery.tag, event))
            self.events_received += 1
        if len(inbox) >= self._wanted:
            self._arrived.set()
        if self._waiters:
            self._notify()

    def _reject_malformed(self, intake: Intake, delivery: Delivery, exc: ValidationError) -> None:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        log.warning(
            "dead-lettering a usage message that is not a UsageEvent"
            " (message_id=%s, %d bytes, %d errors): %s: %s",
            delivery.message_id(),
            len(delivery.body),
            exc.error_count(),
            where,
            first["msg"],
        )
        _settle(intake.reject, delivery.tag, "reject")
        self.events_rejected += 1

    async def _stop_consuming(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._stopping = True
        self._stop_deadline = asyncio.get_running_loop().time() + self.settings.shutdown_grace
        intake = self._intake
        if intake is not None and intake.is_open:
            try:
                async with asyncio.timeout(CANCEL_TIMEOUT):
                    await intake.cancel()
            except (IntakeClosed, TimeoutError) as exc:
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
            started = time.time_ns()
            try:
                inserted, unstorable = await self._write(batch)
                break
            except DB_ERRORS as exc:
                self._postgres.failed(exc)
                if is_unreachable(exc):
                    assert self._pool is not None
                    await reconnect(self._pool)
            grace = self._stop_deadline - asyncio.get_running_loop().time()
            if grace <= 0:
                log.warning(
                    "stopping with %d usage events unwritten: the broker delivers them again",
                    len(batch),
                )
                return False
            await asyncio.sleep(min(delay, grace))
            delay = min(delay * 2, BACKOFF_CAP)
        self._postgres.recovered()
        written = [d for d in batch if (d.event.team, d.event.job_id) not in unstorable]
        if tracing.ON:
            _traced_write(written, len(batch), started, time.time_ns())
        # Settlements are written in the order made: these rejects reach the broker before the
        # multiple ack below, which would otherwise have settled their tags already.
        for delivery in batch:
            if (delivery.event.team, delivery.event.job_id) in unstorable:
                _settle(delivery.intake.reject, delivery.tag, "reject")
        if written:
            # Deliveries reach the inbox in delivery-tag order and batches are settled in that
            # order, so on the last delivery's connection every earlier tag is in this batch or
            # already settled: one multiple ack covers exactly this batch. Deliveries from a
            # connection lost since cannot be acknowledged; the insert ignores their redelivery.
            last = written[-1]
            _settle(partial(last.intake.ack, multiple=True), last.tag, "acknowledge")
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
        except DB_ERRORS as exc:
            if not _is_unstorable(exc):
                raise
        # One value PostgreSQL refuses fails the whole statement. Row by row finds it, so the
        # rest are written and only that event is dead-lettered instead of blocking the queue.
        inserted = 0
        unstorable: set[tuple[str, str]] = set()
        for event in first_per_job(events):
            try:
                inserted += await insert_usage(self._pool, [event])
            except DB_ERRORS as exc:
                if not _is_unstorable(exc):
                    raise
                log.error(
                    "usage event %s cannot be stored, dead-lettering it: %s", event.job_id, exc
                )
                unstorable.add((event.team, event.job_id))
        return inserted, unstorable

    def _notify(self) -> None:
        # Synchronous and a no-op without waiters: it runs for every delivery.
        for predicate, future in self._waiters:
            if not future.done() and predicate():
                future.set_result(None)


def _traced_write(written: list[_Delivery], size: int, started: int, ended: int) -> None:
    """A batch's write in the trace of each job written that was recorded, as a child of the
    job's span: one statement wrote the batch of ``size``, so each span is that statement's."""
    for delivery in written:
        event = delivery.event
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
            "settles): Redis had counted $%s",
            what,
            correction.month,
            -drift,
            correction.after,
            correction.before,
        )


def _settle(action: Callable[[int], None], tag: int, verb: str) -> None:
    # A settlement fails only when its connection is gone: the broker then delivers the
    # message again, and the insert is idempotent, so that is no error.
    try:
        action(tag)
    except IntakeClosed as exc:
        log.info("could not %s usage deliveries (%s); they are delivered again", verb, exc)


def _is_unstorable(exc: BaseException) -> bool:
    """Whether a write failed because of a value in it rather than PostgreSQL's availability.

    asyncpg raises DataError also for a Python value it cannot encode (an int out of range).
    """
    return isinstance(exc, asyncpg.DataError | asyncpg.IntegrityConstraintViolationError)
