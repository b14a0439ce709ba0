"""The worker: consumes the team queues it serves and runs each job through the processor."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from aio_pika.abc import AbstractRobustChannel
from aiormq import spec
from aiormq.abc import DeliveredMessage

from queuegate.broker import (
    CONNECTION_LOST,
    Consumer,
    Delivery,
    Incoming,
    connect,
    consume,
    nack_window,
    settle,
)
from queuegate.db import DB_ERRORS, wait_for_pool, worker_application_name
from queuegate.errors import ConfigError, ServiceUnavailable
from queuegate.header_bound import bound_headers
from queuegate.keys import Keys
from queuegate.livestats import LiveStatsWriter
from queuegate.metrics import BROKER_RECONNECTS
from queuegate.outage import OutageLog
from queuegate.redis_client import redis_place
from queuegate.registry import TeamConfig, Version, check_team_name, read_registry
from queuegate.registry_changes import RegistryChanges
from queuegate.runtime import serving, until_set
from queuegate.settings import Settings
from queuegate.topology import Topology
from router import Router
from workers.admission import Admission, prefetch_for
from workers.batch_cancel import BatchCancels
from workers.cache import ResponseCache
from workers.claims import Claims
from workers.control import ControlPlane
from workers.eviction_watch import watch_eviction
from workers.gate import Gate
from workers.held_results import HeldResults
from workers.identity import Identities
from workers.job_slots import JobSlots
from workers.processor import JobProcessor
from workers.publisher import Publisher
from workers.reply_queues import ReplyQueues
from workers.team_connections import TeamConnections
from workers.telemetry import Telemetry
from workers.usage_record import UsageRecord

log = logging.getLogger(__name__)

TEAM_CONNECTION_DOWN = (*CONNECTION_LOST, ServiceUnavailable)
"""What serving a team raises while its broker connection (or the worker's) is down."""
TEAM_SERVE_WAIT = 2.0
"""Seconds opening one team's jobs channel and declaring its queue (10-60 ms here) may take
before its connection counts as down.
aio-pika's robust channel waits for its connection to come back and the channel to be
restored, which a team's requests that close its connection again each time it is back can
keep from ever happening: a worker waited there past every `teams set` (exit 3, naming it
stalled) and past its stop, 90 s until the test ended."""
TEAM_RETRY = 1.0
"""Seconds until a team left out (its connection down, or slower than ``TEAM_SERVE_WAIT``) is
tried again, when ``teams_refresh`` is longer: a broker slow for a moment at a start (a queue
declare past 2 s under load) left the team without a consumer until the next refresh."""
SERVE_AT_ONCE = 16
"""Teams a worker starts (or renews) consuming at once, each on its own connection. Served one
after another, each team whose connection stalled or kept closing held every team after it
``TEAM_SERVE_WAIT`` more, at the start and at each renewal (found in an attack). Bounded, so
that a worker of many teams opens their channels a few at a time rather than all at once."""


@dataclass(frozen=True)
class _TeamConsumer:
    queue: str
    prefetch: int
    consumer: Consumer


class Worker:
    """Serves the jobs of some teams (``teams``) or of every enabled team in the registry.

    Each team queue gets its own consumer with at most ``settings.prefetch`` slots (fewer for
    a team whose rate limit could not admit that many in time: see ``prefetch_for``), so a team
    with a deep queue can occupy only its own slots and never starve the others::

        stop = asyncio.Event()
        async with open_router(catalog, os.environ, settings) as router:
            await Worker(settings, router, teams=["search"]).run(stop)  # until stop is set

    Each team's jobs are consumed on a broker connection of that team's own
    (``TeamConnections``), so a fault of the broker's that a team can cause closes only that
    team's consumer. On stop it cancels its consumers, gives in-flight jobs
    ``settings.shutdown_grace`` seconds, and closes the teams' connections, which returns
    every unfinished job to its queue.
    """

    def __init__(
        self,
        settings: Settings,
        router: Router,
        *,
        teams: Sequence[str] | None = None,
        name: str | None = None,
        registered_only: bool = False,
    ) -> None:
        # Before any connection: every team's messages are read on its loop.
        bound_headers()
        self._settings = settings
        self._router = router
        self._fixed_teams = [check_team_name(team) for team in teams] if teams else None
        self._registered_only = registered_only
        """Whether a team of ``teams`` is served only while the registry has an enabled row
        for it (``queuegate worker --teams``), as every team of a worker without ``teams``
        is: a row deleted by hand left it served with no config, its budget gone."""
        self._disabled: set[str] = set()
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self._topology = Topology.of(settings)
        self._consumers: dict[str, _TeamConsumer] = {}
        self._team_connections = TeamConnections(
            settings.amqp_url,
            worker=self.name,
            within=settings.reconnect_wait,
            on_reopen=self._on_reopen,
        )
        self._reopening: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[Any]] = set()
        self._slots: dict[str, JobSlots] = {}
        self._processor: JobProcessor | None = None
        self._admission: Admission | None = None
        self._control: ControlPlane | None = None
        self._live: LiveStatsWriter | None = None
        self._registry = OutageLog(
            log, "The team registry (PostgreSQL)", "the teams I have are served"
        )
        self._connected: asyncio.Event | None = None
        self._changed = asyncio.Event()
        """Set when the registry is to be read again at once (``_refresh_teams``)."""
        self._invalid_rows: set[tuple[str, str]] = set()
        self._draining = False
        self._telemetry = Telemetry(router.catalog.models)
        self._left_out: set[str] = set()
        """Teams to serve that the last pass could not (``TEAM_RETRY``)."""
        self._retry: asyncio.Task[None] | None = None
        """The left-out teams' retry under way (``_retry_left_out``), if any."""
        self._retrying: set[str] = set()
        """The teams it tries again."""
        self.ready = asyncio.Event()
        """Set once the worker consumes every team it serves, or has tried again those it could
        not: a team that keeps its own connection closing holds its own jobs, never the
        worker's readiness."""

    @property
    def teams(self) -> list[str]:
        return sorted(self._consumers)

    @property
    def admission(self) -> Admission | None:
        """The worker's admission gate, once it runs."""
        return self._admission

    @property
    def in_flight(self) -> int:
        """Jobs held: delivered and not yet settled, started or waiting for a slot."""
        return sum(len(slots) for slots in self._slots.values())

    def is_ready(self) -> bool:
        """Connected to the broker and consuming (every team it serves, even if none yet)."""
        connected = self._connected is not None and self._connected.is_set()
        return connected and self.ready.is_set() and not self._draining

    async def _refresh_gauges(self) -> None:
        """The gauges the live stats read that only calls and takes set: bucket fills, and
        breakers whose shared state may have lapsed since. And, on the same tick, this
        worker's settled jobs back into the budget ledgers made again since it used them."""
        if self._admission is not None:
            await self._admission.refresh_fills()
            await self._admission.put_back()
        await self._router.health.refresh_gauges()

    async def run(self, stop: asyncio.Event) -> None:
        s = self._settings
        # The registry: teams to serve (unless fixed) and their security settings. Held open
        # while it runs, named for `teams set` to count it by (worker_application_name).
        pool = await wait_for_pool(s, application_name=worker_application_name(s.namespace))
        try:
            connection = await connect(s.amqp_url, name=f"worker:{self.name}")
        except BaseException:
            await pool.close()
            raise
        self._connected = connection.connected
        connection.reconnect_callbacks.add(
            lambda *_: BROKER_RECONNECTS.labels(connection="worker", team="").inc()
        )
        # One pool per process: the router's, which its opener closes.
        redis = self._router.redis
        live = self._live = LiveStatsWriter(
            redis,
            Keys(s.redis_prefix),
            self.name,
            s.stats_interval,
            self._live_in_flight,
            refresh=self._refresh_gauges,
            reread=self._changed.set,
        )
        self._telemetry.live = live
        claims = Claims(
            redis,
            Keys(s.redis_prefix),
            UsageRecord(pool),
            worker=self.name,
            lease=s.claim_lease,
            wait=s.claim_wait,
            ttl=s.result_ttl,
            lookup_wait=s.job_time_limit,
            delivery_limit=s.delivery_limit,
            fail_open=s.redis_outage == "fail_open",
            # Made below: asked only once jobs are served.
            remembered=lambda team, job: (
                None if self._admission is None else self._admission.remembered(team, job)
            ),
        )
        live_stop = asyncio.Event()
        live_task = asyncio.create_task(live.run(live_stop))
        claims_task = asyncio.create_task(claims.run(live_stop))
        evictions = asyncio.create_task(watch_eviction(redis, redis_place(s), live_stop))
        held = HeldResults(s, redis)
        held_task: asyncio.Task[None] | None = None
        try:
            self._admission = Admission(s, redis, pool, self._router.catalog, view=live)
            publish = await connection.channel(publisher_confirms=True, on_return_raises=True)
            # Declares the dead-letter exchanges too (accounting's letters go there).
            usage = await self._topology.declare_usage(publish)
            dead = await publish.get_exchange(self._topology.dead_exchange, ensure=False)
            identities = Identities(
                pool,
                namespace=s.namespace,
                ttl=s.security_cache_ttl,
                wait=s.job_time_limit,
                operators=s.operators,
                frontdoor=s.frontdoor,
            )
            publisher = Publisher(
                publish,
                usage,
                dead,
                replies=self._team_connections,
                reconnect_wait=s.reconnect_wait,
                nacks_within=nack_window(s.amqp_url),
                user_id=s.amqp_user,
                keeps_results=self._topology.is_results_queue,
                bounded=self._topology.is_team_reply_queue,
                held_full=held.full,
                accounted=claims.accounted,
            )
            self._processor = JobProcessor(
                router=self._router,
                claims=claims,
                replies=ReplyQueues(connection),
                cache=ResponseCache(redis, Keys(s.redis_prefix), s.cache_ttl),
                publisher=publisher,
                admission=self._admission,
                worker=self.name,
                max_job_bytes=s.max_job_bytes,
                max_job_messages=s.max_job_messages,
                gate=Gate(identities),
                telemetry=self._telemetry,
                job_time_limit=s.job_time_limit,
                cancels=BatchCancels(redis, Keys(s.redis_prefix)),
            )
            await claims.start()
            self._control = ControlPlane(s, redis, identities, answers=self._team_connections)
            await self._control.start(await connection.channel())
            # Only now: its first look talks to Redis, and started earlier it was the worker's
            # first word to a hung Redis, so a stop while starting came while the channels
            # above were being opened (each open cancelled, one warning line more).
            held_task = asyncio.create_task(held.run(live_stop))
            await self._serve_teams(pool, stop)
            if not self._left_out:
                self._set_ready(stop)
            await self._refresh_teams(pool, stop)
            # Its consumers, if any, are drained with the rest.
            await self._retried()
            await self._drain()
            await publisher.close()
        finally:
            # Drained: it took jobs (or could have), whose live counts are written.
            await _end_live_stats(live_task, live_stop, served=self._draining)
            await claims_task
            # Not awaited to its end: a look may wait out a hanging Redis or management API.
            await _cancel(held_task)
            await _cancel(evictions)
            # Left only by a fault (raised already): any consumer it made goes with its
            # connection, and what it raised is the same fault's.
            with contextlib.suppress(Exception):
                await _cancel(self._retry)
            await self._team_connections.close()
            await connection.close()
            await pool.close()

    def _set_ready(self, stop: asyncio.Event) -> None:
        if not stop.is_set() and not self.ready.is_set():
            self.ready.set()
            log.info("worker %s serving %s", self.name, ", ".join(self.teams) or "no team yet")

    async def _refresh_teams(self, pool: asyncpg.Pool, stop: asyncio.Event) -> None:
        """Serve the registry's teams under their configs until ``stop``: read again every
        ``teams_refresh``, and at once when a `teams set` is told (a budget lowered holds for
        the next job); the refresh only catches what the listener missed."""
        assert self._processor is not None
        changed = self._changed
        async with RegistryChanges(
            self._settings,
            lambda _team: changed.set(),
            application_name=worker_application_name(self._settings.namespace),
        ):
            while not stop.is_set():
                refresh = self._settings.teams_refresh
                retrying = self._left_out or self._retrying
                soon = min(refresh, TEAM_RETRY) if retrying else refresh
                await until_set(soon, stop, changed)
                changed.clear()
                if stop.is_set():
                    return
                try:
                    await self._serve_teams(pool, stop)
                except TEAM_CONNECTION_DOWN as exc:
                    # The consumers it has come back with their channels (_on_reopen); new
                    # teams and limits next time.
                    log.warning("broker unavailable (%s); teams are refreshed later", exc)
                else:
                    if not self._retrying:  # else once the retry ends (_retry_left_out)
                        self._set_ready(stop)
                # With the refresh: a lapsed claim waits for a sweep, never a job.
                await self._processor.sweep()
                # Nor the connections of the teams being tried again, under the retry.
                await self._team_connections.sweep(keep=self._holding() | self._retrying)

    async def _serve_teams(self, pool: asyncpg.Pool, stop: asyncio.Event) -> None:
        assert self._admission is not None
        serving(stop)  # consumers start here: a stop from now on drains what they take
        read = await self._registry_teams(pool)
        registry, version, read_at = read if read is not None else (None, None, 0.0)
        if registry is not None:
            self._admission.update(registry)
            # Before the version is confirmed below: a team given a budget counts its jobs
            # in flight from the moment `teams set` says it is in force.
            await self._admission.hold_in_flight()
        assert self._control is not None
        # Every registered team's, not only those whose jobs this worker takes: an app asks
        # for its reply queue before it sends a job, whichever workers run.
        await self._control.serve(
            [*(self._fixed_teams or ()), *(registry or ())],
            only=registry is not None,
            disabled=self._disabled,
        )
        wanted = self._fixed_teams or (list(registry) if registry is not None else None)
        if wanted is None:
            return
        if self._registered_only:
            if registry is None:
                return  # the registry unread: served as they were
            wanted = [team for team in wanted if team in registry]
        # Else a team named is served without a registry row (the demo's, before it
        # registers them), but not once an operator disabled it.
        wanted = [team for team in wanted if team not in self._disabled]
        if self._retrying - set(wanted):
            # A team tried again is no longer to be served: its consumer, if the retry makes
            # one, is cancelled below, not left to the next refresh.
            await self._retried()
        else:
            self._retried_error()
        # Those left out by an earlier pass, or being tried again, are not waited for here
        # (below); one left out by this pass is tried again by the next, TEAM_RETRY later.
        again = [team for team in wanted if team in self._left_out]
        fresh = [team for team in wanted if team not in self._left_out | self._retrying]
        # Together, as teams are served: each cancel may wait out a stalled connection.
        gone = set(self._consumers) - set(wanted)
        await _to_their_ends([self._serve_each(fresh, stop), *map(self._stop_serving, gone)])
        if stop.is_set():
            return
        if version is not None and self._live is not None:
            # Only now that every team is served under it: a team added is consumed (but one
            # whose own connection is down, or did not answer within TEAM_SERVE_WAIT, when
            # tried again), one disabled is not, and the next job of each is admitted under
            # its new config.
            self._live.applied(version, read_at)
        if self._retry is None:
            self._left_out -= set(again)
            if again:
                self._retrying = set(again)
                self._retry = asyncio.create_task(self._retry_left_out(again, stop))

    async def _retry_left_out(self, teams: list[str], stop: asyncio.Event) -> None:
        """Try again to serve ``teams``, left out by an earlier pass, beside the passes to
        come: one whose connection a team keeps closing (or that stalls) waits
        TEAM_SERVE_WAIT at each try, and waited for by the pass, held every `teams set`
        behind it that long more (an attack's, with 16 teams' connections stalled, exited 3).
        The worker is ready once they are tried again."""
        try:
            await self._serve_each(teams, stop)
        finally:
            self._retrying = set()
        self._set_ready(stop)

    async def _retried(self) -> None:
        """Wait for the retry under way, if any, raising what it raised."""
        if self._retry is not None:
            await asyncio.wait([self._retry])
            self._retried_error()

    def _retried_error(self) -> None:
        """Raise what the retry that ended raised (a fault of the worker's own), if any."""
        retry = self._retry
        if retry is not None and retry.done():
            self._retry = None
            retry.result()

    async def _stop_serving(self, team: str) -> None:
        """Cancel the consumer of ``team``, disabled or no longer in the registry."""
        assert self._admission is not None
        served = self._consumers.pop(team)
        try:
            async with asyncio.timeout(TEAM_SERVE_WAIT):  # as in _serve_team
                await served.consumer.cancel()
        except TEAM_CONNECTION_DOWN:
            pass  # its connection down, the broker has dropped the consumer already
        except TimeoutError:
            # Its connection stalled: the consumer goes with its channel, once the broker
            # hears of it (its deliveries meanwhile go back: TeamStopped).
            self._team_connections.drop_jobs(team)
        # Only once its consumer is gone: a held job sent back now is not delivered here
        # again. Its connection stays until the jobs it holds are settled on it (closed by a
        # sweep: _holding).
        self._admission.stopped(team)
        why = "disabled" if team in self._disabled else "not in the registry"
        log.info("stopped serving team %s (%s)", team, why)

    async def _serve_each(self, teams: list[str], stop: asyncio.Event) -> None:
        """Consume each of ``teams`` not yet consumed with its slots, ``SERVE_AT_ONCE`` at a
        time, until ``stop`` is set; those whose connection is down go to ``_left_out``."""
        at_once = asyncio.Semaphore(SERVE_AT_ONCE)

        async def serve(team: str) -> None:
            async with at_once:
                await self._serve_one(team, stop)

        await _to_their_ends(map(serve, teams))

    async def _serve_one(self, team: str, stop: asyncio.Event) -> None:
        assert self._admission is not None
        # Serving has begun (runtime.serving): a stop signal sets the stop and cancels
        # nothing, so the stop is what says no consumer more and none announced. The drain
        # ends those already started, and answers the jobs they took.
        if stop.is_set():
            return
        prefetch = prefetch_for(self._admission.config(team), self._settings)
        current = self._consumers.get(team)
        if current is not None and current.prefetch == prefetch:
            return
        try:
            await self._serve_team(team, current, prefetch)
        except (*TEAM_CONNECTION_DOWN, TimeoutError) as exc:
            # Its own connection, closed by the broker (a team can make it close it) and
            # coming back: the other teams are served meanwhile, and it when tried again.
            # Raised, a team's queued requests that close it stopped every worker from
            # starting; waited for, they held the registry's confirm.
            log.warning(
                "team %s not served for now: its broker connection is down (%s); "
                "tried again in %g s",
                team,
                # A TimeoutError says nothing of itself.
                str(exc) or f"no answer within {TEAM_SERVE_WAIT:g} s",
                min(self._settings.teams_refresh, TEAM_RETRY),
            )
            self._left_out.add(team)
            return
        if not stop.is_set():
            log.info("now serving team %s with %d slots", team, prefetch)

    async def _serve_team(self, team: str, current: _TeamConsumer | None, prefetch: int) -> None:
        """Consume ``team``'s queue with ``prefetch`` slots, on its connection."""
        # A consumer's prefetch is fixed when it starts (quorum queues refuse a global one),
        # so a new limit means a new consumer; the old one's held jobs finish and are acked
        # as usual, and count on top of the new slots until then.
        if current is not None:
            del self._consumers[team]
        # Every step is time-boxed: the robust channel's wait for its connection to be back
        # and restored, and on a connection that stalls (bytes held, not closed) the broker's
        # answer never came, and every `teams set` after waited with this pass, and a stop
        # with it (an attack held the consume: the worker froze, every change exited 3).
        try:
            async with asyncio.timeout(TEAM_SERVE_WAIT):
                if current is not None:
                    await current.consumer.cancel()
                channel = await self._team_connections.jobs(team)
                queue = await self._topology.declare_team_queue(channel, team)
                consumer = await self._consume(channel, team, queue.name, prefetch)
        except (*TEAM_CONNECTION_DOWN, TimeoutError):
            # Tried again on a channel of its own: this one may be left closed for good, and
            # a consumer whose cancel or consume was cut off goes with it (its deliveries
            # until then run nowhere: consume).
            self._team_connections.drop_jobs(team)
            raise
        self._consumers[team] = consumer

    async def _consume(
        self, channel: AbstractRobustChannel, team: str, queue: str, prefetch: int
    ) -> _TeamConsumer:
        # On the underlying channel (see consume): _on_reopen consumes again after a reconnect.
        consumer = await consume(channel, queue, self._callback(team, queue), prefetch=prefetch)
        consumer.channel.on_consumer_cancel_callbacks.add(self._on_cancelled)
        return _TeamConsumer(queue, prefetch, consumer)

    async def _on_reopen(self, team: str, channel: AbstractRobustChannel) -> None:
        """The team's jobs channel is back (its connection was, or it was renewed): consume
        its queue there again, unless it is no longer served."""
        current = self._consumers.get(team)
        if self._draining or current is None:
            return
        self._consumers[team] = await self._consume(channel, team, current.queue, current.prefetch)

    def _on_cancelled(self, frame: spec.Basic.Cancel) -> None:
        served = next(
            (c for c in self._consumers.values() if c.consumer.tag == frame.consumer_tag), None
        )
        if served is None:
            return
        log.warning(
            "the broker cancelled the consumer of %s (was the queue deleted?): reopening the"
            " channel, which declares the queues again and consumes",
            served.queue,
        )
        # Not awaited: this runs in the channel's reader, which the close waits for. Kept so
        # that the task is not collected before it is done.
        self._reopening = asyncio.create_task(served.consumer.channel.close())

    async def _registry_teams(
        self, pool: asyncpg.Pool
    ) -> tuple[dict[str, TeamConfig], Version, float] | None:
        """Enabled teams and their configs (the disabled ones' names in ``_disabled``), the
        version they were read at and when the read began (``time.monotonic``); None while
        the registry cannot be read."""
        read_at = time.monotonic()
        try:
            read = await read_registry(pool, on_invalid=self._invalid_row)
        except DB_ERRORS as exc:
            self._registry.failed(exc)
            return None
        self._registry.recovered()
        self._disabled = {team.name for team in read.teams if not team.enabled}
        enabled = {team.name: team.config for team in read.teams if team.enabled}
        return enabled, read.version, read_at

    def _invalid_row(self, name: str, error: ConfigError) -> None:
        # Read every few seconds: said once per row and error, not on every refresh.
        if (name, str(error)) not in self._invalid_rows:
            self._invalid_rows.add((name, str(error)))
            log.error("team registry row %r is not served: %s", name, error)

    def _callback(
        self, team: str, queue: str
    ) -> Callable[[DeliveredMessage], Coroutine[Any, Any, None]]:
        slots = self._slots.get(team)
        if slots is None:
            slots = self._slots[team] = self._team_slots(team, queue)

        async def on_job(delivered: DeliveredMessage) -> None:
            self._telemetry.taken(team)
            slots.arrived(delivered)

        return on_job

    def _team_slots(self, team: str, queue: str) -> JobSlots:
        def released(task: asyncio.Task[None]) -> None:
            self._inflight.discard(task)
            self._telemetry.released(team)
            slots.ended()

        def start(delivered: DeliveredMessage, delivery: Delivery) -> None:
            assert self._processor is not None
            # The processor's coroutine is the task's own, and the job leaves the count by a
            # callback: no frame of the worker's per job held.
            job = self._processor.process(Incoming(delivered), delivery, team, queue)
            # Not in aiormq's task, which it cancels when the channel closes: a job whose
            # provider call is in flight when the connection drops runs on, stores its
            # outcome and keeps its claim, so that its redelivery is answered from it
            # instead of calling again.
            task = asyncio.create_task(job)
            self._inflight.add(task)
            # One callback: each holds a copy of the job's context until the job ends.
            task.add_done_callback(released)

        slots = JobSlots(start, drop=lambda: self._telemetry.released(team))
        return slots

    def _holding(self) -> set[str]:
        """The teams served, and those still holding jobs (a team no longer served settles
        them on its connection)."""
        held = (team for team, n in self._telemetry.in_flight.items() if n)
        return {*self._consumers, *held}

    def _live_in_flight(self) -> dict[str, int]:
        # A draining worker serves none, and ``queuegate status`` shows what it is finishing.
        in_flight = self._telemetry.in_flight
        return {team: in_flight[team] for team in self._holding()}

    async def _drain(self) -> None:
        """Stop taking jobs, return those not yet admitted, let the admitted ones finish
        within the grace period, cancel the rest."""
        self._draining = True
        # First: a job sent back to its queue below must not be delivered here again.
        # Bounded as in _serve_team, and together: a stalled connection held the stop, and one
        # after another each stalled team would add its bound. Its connection closes with the
        # worker's, its consumer with it.
        await asyncio.gather(*(_cancelled(served) for served in self._consumers.values()))
        self._consumers.clear()
        # Waiting for admission: back to the queue at once, uncalled, for another worker.
        # Before the withdraw, with no wait between: once a `teams set` can see the worker
        # gone, it admits no job under the config it had.
        if self._admission is not None:
            self._admission.stop()
        if self._live is not None:
            # Under no config from now on: `teams set` is not to wait for it, nor name it
            # (status shows it draining until its last flush, after the drain).
            self._live.withdraw()
        # Never started: back to the queue at once, for another worker.
        for team, slots in self._slots.items():
            for delivery in slots.take_all():
                self._telemetry.released(team)
                await settle(delivery.nack(requeue=True), f"return job {delivery.message_id}", log)
        if self._inflight:
            log.info(
                "waiting up to %.0f s for %d jobs",
                self._settings.shutdown_grace,
                len(self._inflight),
            )
            _, pending = await asyncio.wait(
                set(self._inflight), timeout=self._settings.shutdown_grace
            )
            for task in pending:
                task.cancel()
            if pending:
                log.warning(
                    "%d jobs did not finish in time; they go back to the queue", len(pending)
                )
                await asyncio.wait(pending)


async def _to_their_ends(steps: Iterable[Awaitable[None]]) -> None:
    """Run ``steps`` at once, each to its end whatever the others raise (a consume or a
    cancel cut off would leave a consumer untracked), then raise the first error, if any."""
    for outcome in await asyncio.gather(*steps, return_exceptions=True):
        if isinstance(outcome, BaseException):
            raise outcome


async def _cancelled(served: _TeamConsumer) -> None:
    """Cancel a team's consumer, giving up after ``TEAM_SERVE_WAIT`` or on any error."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(TEAM_SERVE_WAIT):
            await served.consumer.cancel()


async def _cancel(task: asyncio.Task[None] | None) -> None:
    """Cancel ``task``, if any, and wait for it to end."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _end_live_stats(task: asyncio.Task[None], stop: asyncio.Event, *, served: bool) -> None:
    """Set ``stop`` (the live stats' and the claims' renewal's) once the live stats are done:
    after their last flush, what was served since the one before, if the worker served."""
    if served:
        stop.set()
        await task
        return
    # Stopped before serving: nothing counted to write, and the last flush would hold the
    # stop for as long as a hung Redis takes to fail it (four timeouts). Cancelled before
    # ``stop`` is set: Python 3.11's wait_for, seeing both at once, drops the cancel.
    task.cancel()
    await asyncio.wait([task])
    stop.set()
