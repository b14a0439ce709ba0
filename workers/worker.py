"""The worker: consumes the team queues it serves and runs each job through the processor."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from queuegate.broker import connect
from queuegate.db import create_pool
from queuegate.keys import Keys
from queuegate.registry import list_teams
from queuegate.settings import Settings
from queuegate.topology import Topology
from router import Router
from workers.batch_cancel import BatchCancels
from workers.processor import JobProcessor
from workers.publisher import Publisher
from workers.store import OutcomeStore

log = logging.getLogger(__name__)


class Worker:
    """Serves the jobs of some teams (``teams``) or of every enabled team in the registry.

    Each team queue gets its own consumer with ``settings.prefetch`` slots, so a team with a
    deep queue can occupy only its own slots and never starve the others::

        stop = asyncio.Event()
        async with Router(catalog, os.environ) as router:
            await Worker(settings, router, teams=["search"]).run(stop)  # until stop is set

    On stop it cancels its consumers, gives in-flight jobs ``settings.shutdown_grace``
    seconds, and closes its channel, which returns every unfinished job to its queue.
    """

    def __init__(
        self,
        settings: Settings,
        router: Router,
        *,
        teams: Sequence[str] | None = None,
        name: str | None = None,
    ) -> None:
        self._settings = settings
        self._router = router
        self._fixed_teams = list(teams) if teams else None
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self._topology = Topology(settings.namespace, settings.delivery_limit)
        self._consumers: dict[str, tuple[AbstractQueue, str]] = {}
        self._inflight: set[asyncio.Task[Any]] = set()
        self._processor: JobProcessor | None = None
        self._registry_down = False
        self.ready = asyncio.Event()
        """Set once the worker consumes every team it serves."""

    @property
    def teams(self) -> list[str]:
        return sorted(self._consumers)

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    async def run(self, stop: asyncio.Event) -> None:
        s = self._settings
        connection = await connect(s.amqp_url, name=f"worker:{self.name}")
        redis = aioredis.from_url(s.redis_url)
        pool: asyncpg.Pool | None = None
        try:
            consume = await connection.channel()
            await consume.set_qos(prefetch_count=s.prefetch)
            publish = await connection.channel(publisher_confirms=True, on_return_raises=True)
            usage = await self._topology.declare_usage(publish)
            dead = await self._topology.declare_dead(publish)
            self._processor = JobProcessor(
                router=self._router,
                store=OutcomeStore(redis, Keys(s.redis_prefix), s.result_ttl),
                publisher=Publisher(publish, usage, dead),
                worker=self.name,
                max_job_bytes=s.max_job_bytes,
                cancels=BatchCancels(redis, Keys(s.redis_prefix)),
            )
            if self._fixed_teams is None:
                pool = await create_pool(s)
            await self._serve_teams(consume, pool)
            self.ready.set()
            log.info("worker %s serving %s", self.name, ", ".join(self.teams) or "no team yet")
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=s.teams_refresh)
                if not stop.is_set() and pool is not None:
                    await self._serve_teams(consume, pool)
            await self._drain()
        finally:
            await connection.close()
            await redis.aclose()
            if pool is not None:
                await pool.close()

    async def _serve_teams(self, channel: AbstractChannel, pool: asyncpg.Pool | None) -> None:
        wanted = self._fixed_teams if pool is None else await self._registry_teams(pool)
        if wanted is None:
            return
        for team in wanted:
            if team not in self._consumers:
                queue = await self._topology.declare_team_queue(channel, team)
                tag = await queue.consume(self._callback(team, queue.name))
                self._consumers[team] = (queue, tag)
                log.info("now serving team %s", team)
        for team in set(self._consumers) - set(wanted):
            queue, tag = self._consumers.pop(team)
            await queue.cancel(tag)
            log.info("stopped serving team %s (disabled)", team)

    async def _registry_teams(self, pool: asyncpg.Pool) -> list[str] | None:
        try:
            teams = [team.name for team in await list_teams(pool, enabled_only=True)]
        except (OSError, asyncpg.PostgresError) as exc:
            if not self._registry_down:
                log.warning("team registry unreadable (%s); serving the teams I have", exc)
            self._registry_down = True
            return None
        self._registry_down = False
        return teams

    def _callback(
        self, team: str, queue: str
    ) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
        async def on_job(message: AbstractIncomingMessage) -> None:
            assert self._processor is not None
            task = asyncio.current_task()
            assert task is not None
            self._inflight.add(task)
            try:
                await self._processor.process(message, team, queue)
            finally:
                self._inflight.discard(task)

        return on_job

    async def _drain(self) -> None:
        """Stop taking jobs, let in-flight ones finish within the grace period, cancel the rest."""
        for queue, tag in self._consumers.values():
            with contextlib.suppress(Exception):
                await queue.cancel(tag)
        self._consumers.clear()
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
