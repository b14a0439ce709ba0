"""What a front-door process holds while it serves: the bridge, keys, outcomes, budgets,
catalog, the request bodies being read.

Opened once per process by the app's lifespan and kept on ``app.state.frontdoor``; routes
reach it through the ``frontdoor`` dependency, as ``Door``::

    async def route(door: Door, ...) -> ...:
        await door.bridge.submit(job, caller)
        state = await door.outcomes.look(caller.team, job_id)
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import Annotated, Self

import asyncpg
import redis.asyncio as aioredis
from fastapi import Depends, Request
from redis.exceptions import RedisError

from frontdoor.auth import KeyBook
from frontdoor.batches.runner import BatchRunner
from frontdoor.body import Bodies
from frontdoor.bridge import Bridge
from frontdoor.budgets import BudgetGate
from frontdoor.failed_keys import FailedKeys
from frontdoor.outcomes import Outcomes, stored_by
from queuegate.db import DB_ERRORS, create_pool
from queuegate.keys import Keys
from queuegate.redis_client import redis_for
from queuegate.registry_changes import RegistryChanges
from queuegate.request_limits import Limits
from queuegate.settings import Settings
from queuegate.status import StatusReader
from router import Catalog

READY_TIMEOUT = 2.0
"""Seconds ``/readyz`` gives Redis and PostgreSQL to answer."""


class FrontDoor:
    def __init__(self, settings: Settings, catalog: Catalog) -> None:
        self.settings = settings
        self.catalog = catalog
        self.limits = Limits.of(settings, catalog)
        self.bodies = Bodies.of(settings)
        self.bridge = Bridge(settings)
        self._redis: aioredis.Redis | None = None
        self._failures: FailedKeys | None = None
        self._pool: asyncpg.Pool | None = None
        self._keys: KeyBook | None = None
        self._outcomes: Outcomes | None = None
        self._budgets: BudgetGate | None = None
        self._changes: RegistryChanges | None = None
        self._batch_runner: BatchRunner | None = None
        self._stop_runner = asyncio.Event()
        self._running: asyncio.Task[None] | None = None
        self._status: StatusReader | None = None

    @property
    def keys(self) -> KeyBook:
        assert self._keys is not None, "use the front door inside `async with`"
        return self._keys

    @property
    def outcomes(self) -> Outcomes:
        assert self._outcomes is not None, "use the front door inside `async with`"
        return self._outcomes

    @property
    def budgets(self) -> BudgetGate:
        assert self._budgets is not None, "use the front door inside `async with`"
        return self._budgets

    @property
    def batch_runner(self) -> BatchRunner:
        assert self._batch_runner is not None, "use the front door inside `async with`"
        return self._batch_runner

    @property
    def redis(self) -> aioredis.Redis:
        assert self._redis is not None, "use the front door inside `async with`"
        return self._redis

    async def status(self) -> StatusReader:
        """The reader of live status (the dashboard's Live page), opened on first use: a
        process that never serves the page holds no second broker connection."""
        if self._status is None:
            reader = StatusReader(self.settings)
            await reader.__aenter__()
            self._status = reader
        return self._status

    @property
    def pool(self) -> asyncpg.Pool:
        assert self._pool is not None, "use the front door inside `async with`"
        return self._pool

    async def __aenter__(self) -> Self:
        s = self.settings
        self._pool = await create_pool(s)
        try:
            self._redis = redis_for(s)
            keys = Keys(s.redis_prefix)
            self._failures = FailedKeys(
                self._redis, keys, limit=s.failed_key_limit, window=s.failed_key_window
            )
            self._keys = KeyBook(self._pool, self._failures, ttl=s.security_cache_ttl)
            self._outcomes = Outcomes(self._redis, keys, ttl=s.result_ttl, late=stored_by(s))
            self._budgets = BudgetGate(self._pool, self._redis, keys, self.catalog, s)
            # A budget lowered by `teams set` is refused here at once, not after the
            # config's refresh: published meanwhile, each job would be a worker's refusal.
            self._changes = await RegistryChanges(s, self._budgets.forget).__aenter__()
            await self.bridge.__aenter__()
            # Batches created over HTTP, this process's and any a stopped process left.
            self._batch_runner = BatchRunner(s, self._pool, self._redis, limits=self.limits)
            self._running = asyncio.create_task(self._batch_runner.run(self._stop_runner))
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._running is not None:
                self._stop_runner.set()
                await self._running
            await self.bridge.__aexit__(exc_type, exc, tb)
        finally:
            await self._close()

    async def _close(self) -> None:
        if self._changes is not None:
            await self._changes.__aexit__(None, None, None)
        if self._status is not None:
            await self._status.__aexit__(None, None, None)
        if self._failures is not None:
            await self._failures.aclose()
        if self._redis is not None:
            await self._redis.aclose()
        if self._pool is not None:
            await self._pool.close()

    async def readiness(self) -> dict[str, bool]:
        """Whether the broker, Redis and PostgreSQL can be reached from here now, said within
        ``READY_TIMEOUT``: Redis and PostgreSQL are asked at once, and a read a hung server
        holds is left to let go in its own time (asyncpg's release of a connection whose
        query was cancelled waits for the server)."""
        asks = (
            asyncio.ensure_future(self._redis_answers()),
            asyncio.ensure_future(self._database_answers()),
        )
        try:
            await asyncio.wait(asks, timeout=READY_TIMEOUT)
        finally:
            for ask in asks:
                ask.cancel()
        redis_ok, db_ok = (ask.done() and not ask.cancelled() and ask.result() for ask in asks)
        return {"broker": self.bridge.connected, "redis": redis_ok, "database": db_ok}

    async def _redis_answers(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except (RedisError, OSError):
            return False

    async def _database_answers(self) -> bool:
        with contextlib.suppress(*DB_ERRORS):
            return bool(await self.pool.fetchval("SELECT 1") == 1)
        return False


async def frontdoor(request: Request) -> FrontDoor:
    """The dependency routes take: this process's front door (a coroutine: FastAPI runs a
    plain function dependency in a worker thread, a thread hop on every request)."""
    door: FrontDoor = request.app.state.frontdoor
    return door


Door = Annotated[FrontDoor, Depends(frontdoor)]
"""A route's parameter for this process's front door."""

__all__ = ["Door", "FrontDoor", "frontdoor"]
