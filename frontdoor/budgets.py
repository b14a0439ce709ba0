"""An early refusal of a team whose budget is spent: 402 before anything is published.

A worker refuses such a job anyway (its admission reserves the job's estimated cost in the
team's spend ledgers, and stays the authority), but only after the broker, the worker and a
usage row: a flood of refused requests would cost every team that much. The front door
reads the same ledgers (``queuegate.spend.ledgers_in_force``) and refuses a job that the
worker's reserve would refuse, with the same estimate and the same answer::

    gate = BudgetGate(pool, redis, keys, catalog, settings)
    await gate.refuse_spent(team, job)     # BudgetExhausted when its budget cannot take it

What it reads of the ledgers is at most ``SPENT_TTL`` old, so a new month or a
reconciliation lets jobs through within a second or so. The team's config is read again as
soon as ``teams set`` changes it (``gate.forget``, told by ``RegistryChanges``), else every
``teams_refresh``: a budget lowered is refused here from the next request, not left to the
workers, which would refuse it with a usage row each. A ledger Redis does not hold (a team
that had no budget, or Redis lost it) counts what usage_log holds, as the worker's rebuild
of it would, at least. Best effort: while Redis or PostgreSQL cannot be read it refuses
nothing, and the workers decide.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
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
from queuegate.spend import (
    budget_scopes,
    current_month,
    exhausted,
    ledgers_in_force,
    month_spend,
    to_nano,
)
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
        self._configs = Fresh(settings.teams_refresh, self._config)
        self._spent = Fresh(SPENT_TTL, self._ledgers)

    async def refuse_spent(self, team: str, job: ChatJob) -> None:
        """Raise BudgetExhausted when a worker would refuse the job for its budget now."""
        month = current_month()
        try:
            config = await self._configs.get(team)
            scopes = budget_scopes(config, job.model)
            if not scopes:
                return
            # By ledger, not by job model: every model without a cap shares the team's.
            models = tuple(scope_model for scope_model, _ in scopes)
            spent = await self._spent.get((team, month, models))
        except UNREADABLE as exc:
            log.debug("budget of team %s not checked: %s", team, exc)
            return
        needed = estimate(job, self._catalog, config, self._expected_output).cost_nano
        for scope, scope_spent in zip(scopes, spent, strict=True):
            if scope_spent + needed > to_nano(scope[1]):
                raise exhausted(
                    team, month, model=job.model, scope=scope, spent=scope_spent, needed=needed
                )

    def forget(self, team: str | None) -> None:
        """Read ``team``'s config again at its next request (every team's for None): it
        changed, or may have."""
        self._configs.forget(team)

    async def _config(self, team: str) -> TeamConfig:
        found = await get_team(self._pool, team)
        return found.config if found is not None else TeamConfig()

    async def _ledgers(self, ledgers: tuple[str, str, tuple[str | None, ...]]) -> list[int]:
        team, month, models = ledgers
        # Settled spend, as a worker's reserve refuses on: a job the other jobs' open
        # reservations keep out waits for them in a worker, it is not refused.
        spent = await ledgers_in_force(self._client, self._keys, team, month, models, settled=True)
        # No ledger is not nothing spent: a worker's first reserve makes it from usage_log.
        return [
            to_nano(await month_spend(self._pool, team, month, model)) if nano is None else nano
            for model, nano in zip(models, spent, strict=True)
        ]


class Fresh(Generic[K, V]):
    """Values by key, each read by ``read`` and kept ``ttl`` seconds; the requests that miss
    one at once share one read (a burst asks PostgreSQL or Redis once, not once each). Only
    the values read within ``ttl`` are held: older ones are dropped as the next is asked for,
    so past months and teams gone leave nothing behind."""

    def __init__(
        self,
        ttl: float,
        read: Callable[[K], Awaitable[V]],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl = ttl
        self._read = read
        self._clock = clock
        self._values: OrderedDict[K, tuple[float, V]] = OrderedDict()
        """Oldest read first (nearly: reads end in any order), so the stale ones are in front."""
        self._reading: dict[K, asyncio.Future[V]] = {}

    def __len__(self) -> int:
        return len(self._values)

    def forget(self, key: K | None) -> None:
        """Drop ``key``'s value (every value for None) and a read of it under way, which may
        have read what is now out of date: asked again, it is read again."""
        if key is None:
            self._values.clear()
            self._reading.clear()
        else:
            self._values.pop(key, None)
            self._reading.pop(key, None)

    async def get(self, key: K) -> V:
        now = self._clock()
        while self._values:
            oldest, (at, _) = next(iter(self._values.items()))
            if now - at <= self._ttl:
                break
            del self._values[oldest]
        kept = self._values.get(key)
        if kept is not None and now - kept[0] <= self._ttl:
            return kept[1]
        reading = self._reading.get(key)
        if reading is None:
            reading = self._reading[key] = asyncio.ensure_future(self._read_into(key))
        # Shielded: one caller hanging up does not cancel the others' read.
        return await asyncio.shield(reading)

    async def _read_into(self, key: K) -> V:
        this = asyncio.current_task()
        try:
            at = self._clock()
            value = await self._read(key)
            if self._reading.get(key) is this:  # not forgotten meanwhile
                self._values[key] = (at, value)
                self._values.move_to_end(key)
            return value
        finally:
            if self._reading.get(key) is this:
                del self._reading[key]


__all__ = ["BudgetGate"]
