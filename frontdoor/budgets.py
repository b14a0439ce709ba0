"""An early refusal of a team whose budget is spent: 402 before anything is published.

A worker refuses such a job anyway (its admission reserves the job's estimated cost in the
team's spend ledgers, and stays the authority), but only after the broker, the worker and a
usage row: a flood of refused requests would cost every team that much. The front door
reads the same ledgers (``queuegate.spend.ledgers_in_force``) and refuses a job that the
worker's reserve would refuse, with the same estimate and the same answer::

    gate = BudgetGate(pool, redis, keys, catalog, settings)
    await gate.refuse_spent(team, job)     # BudgetExhausted when its budget cannot take it

What it reads is at most ``SPENT_TTL`` old (the team's config, like the workers' copy, at
most ``teams_refresh``), so a budget raised, a new month or a reconciliation lets jobs
through within a second or so. Best effort: while Redis or PostgreSQL cannot be read it
refuses nothing, and the workers decide.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from queuegate.db import DB_ERRORS
from queuegate.keys import Keys
from queuegate.messages import ChatJob
from queuegate.registry import TeamConfig, get_team
from queuegate.settings import Settings
from queuegate.spend import budget_scopes, current_month, exhausted, ledgers_in_force, to_nano
from router import Catalog
from workers.admission.estimate import estimate

log = logging.getLogger(__name__)

SPENT_TTL = 1.0
"""Seconds a team's spend, as read from its ledgers, answers before it is read again."""

UNREADABLE: tuple[type[Exception], ...] = (RedisError, *DB_ERRORS)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BudgetGate:
    def __init__(
        self,
        pool: asyncpg.Pool,
        client: aioredis.Redis,
        keys: Keys,
        catalog: Catalog,
        settings: Settings,
    ) -> None:
        self._pool = pool
        self._client = client
        self._keys = keys
        self._catalog = catalog
        self._expected_output = settings.expected_output_tokens
        self._configs = _Fresh(settings.teams_refresh, self._config)
        self._spent = _Fresh(SPENT_TTL, self._ledgers)

    async def refuse_spent(self, team: str, job: ChatJob) -> None:
        """Raise BudgetExhausted when a worker would refuse the job for its budget now."""
        month = current_month()
        try:
            config = await self._configs.get(team)
            scopes = budget_scopes(config, job.model)
            if not scopes:
                return
            spent = await self._spent.get((team, month, job.model))
        except UNREADABLE as exc:
            log.debug("budget of team %s not checked: %s", team, exc)
            return
        expected = config.expected_output_tokens or self._expected_output
        needed = estimate(job, self._catalog, expected).cost_nano
        for scope, scope_spent in zip(scopes, spent, strict=True):
            if scope_spent is not None and scope_spent + needed > to_nano(scope[1]):
                raise exhausted(
                    team, month, model=job.model, scope=scope, spent=scope_spent, needed=needed
                )

    async def _config(self, team: str) -> TeamConfig:
        found = await get_team(self._pool, team)
        return found.config if found is not None else TeamConfig()

    async def _ledgers(self, scope: tuple[str, str, str]) -> list[int | None]:
        team, month, model = scope
        config = await self._configs.get(team)
        models = [scope_model for scope_model, _ in budget_scopes(config, model)]
        return await ledgers_in_force(self._client, self._keys, team, month, models)


class _Fresh(Generic[K, V]):
    """Values by key, each read by ``read`` and kept ``ttl`` seconds; the requests that miss
    one at once share one read (a burst asks PostgreSQL or Redis once, not once each)."""

    def __init__(self, ttl: float, read: Callable[[K], Awaitable[V]]) -> None:
        self._ttl = ttl
        self._read = read
        self._values: dict[K, tuple[float, V]] = {}
        self._reading: dict[K, asyncio.Future[V]] = {}

    async def get(self, key: K) -> V:
        kept = self._values.get(key)
        if kept is not None and time.monotonic() - kept[0] <= self._ttl:
            return kept[1]
        reading = self._reading.get(key)
        if reading is None:
            reading = self._reading[key] = asyncio.ensure_future(self._read_into(key))
        # Shielded: one caller hanging up does not cancel the others' read.
        return await asyncio.shield(reading)

    async def _read_into(self, key: K) -> V:
        try:
            at = time.monotonic()
            value = await self._read(key)
            self._values[key] = (at, value)
            return value
        finally:
            del self._reading[key]


__all__ = ["BudgetGate"]
