"""``queuegate status``: what the gateway is doing now, from the broker and Redis.

Queue depth and consumers come from a passive declare of each team queue (no management
plugin needed); in-flight jobs, rates, waits and spend from the live stats workers write to
Redis (queuegate.livestats); each deployment's breaker and 429 pause from the keys the
workers share them by, read as ``queuegate deployments`` reads them
(queuegate.deployment_health). Budgets are shown when the caller has them, and a team's
spend is never less than what usage_log holds of its month, when the caller has read it
(``Accounted``).

    async with StatusReader(settings) as reader:
        status = await reader.read(teams=None, budgets={}, deployments=catalog.deployment_names)
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Self

import aio_pika
import redis.asyncio as aioredis
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from queuegate.broker import connect
from queuegate.deployment_health import read_health
from queuegate.errors import ServiceUnavailable
from queuegate.keys import Keys
from queuegate.livestats import RATE_SPAN, rate_windows, read_view
from queuegate.redis_client import lua_source, redis_for, redis_unreachable, text
from queuegate.settings import Settings
from queuegate.spend import from_nano, teams_in_force
from queuegate.topology import Topology

NO_WORKER = "no worker has reported in the last few seconds"
"""Why a status with no live worker is stale: its in-flight jobs, rates and the spend they
add to are what workers report, and none does (dead, stalled, or cut off from Redis)."""
REDIS_WAIT = 2.0
"""Seconds each of a read's Redis round trips may take: a hung Redis (stopped, partitioned)
then reads as unreachable within seconds instead of holding ``--watch`` and the Live page
for as long as it hangs."""


@dataclass(frozen=True)
class TeamStatus:
    team: str
    queue_depth: int | None
    """Jobs ready in the team queue (not counting those workers hold); None: no such queue."""
    consumers: int | None
    in_flight: int
    jobs_in_per_s: float
    """Jobs taken from the queue by workers, per second over the last minute."""
    jobs_out_per_s: float
    """Jobs finished, per second over the last minute."""
    errors_per_s: float
    wait_p50_ms: float | None
    wait_p99_ms: float | None
    bucket_fill: float | None
    """How full the team's bucket is, 0-1; None until admission control reports it."""
    spend_usd: Decimal
    """This month's spend: the team's budget ledger when it has a budget (reconciled with
    usage_log; jobs in flight count at their estimates, reservations that lapsed with their
    worker do not), else (no budget, a ledger left from one unset included, or budgets not
    read) as the workers saw it since Redis last lost its data; either way never less than
    usage_log's month (``Accounted``), which Redis losing its data does not lose."""
    budget_usd: Decimal | None
    """None: no budget, or not known when the status has a stale ``reason`` (PostgreSQL
    could not be read)."""
    enabled: bool = True
    """False: the team is disabled, listed for the jobs its queue still holds, which no
    worker takes until it is enabled again."""


@dataclass(frozen=True)
class DeploymentStatus:
    deployment: str
    breaker: str
    """``closed``, ``open`` or ``half_open``: the state every worker shares, not a worker's."""
    calls_per_s: float
    error_rate: float | None
    """Failed calls over all calls in the last minute; None without calls."""
    rate_limited: int
    """Calls the provider answered 429 in the last minute."""
    paused_for: float
    """Seconds left of the pause a 429 set: no worker calls the deployment meanwhile (0:
    not paused)."""


@dataclass(frozen=True)
class DrainingWorker:
    """A worker stopped cleanly that is still finishing the jobs it admitted."""

    worker: str
    in_flight: int
    """Its jobs still in flight (counted in their teams' ``in_flight``)."""


@dataclass(frozen=True)
class Status:
    at: datetime
    workers: int
    """Workers serving: those draining are in ``draining``."""
    teams: list[TeamStatus]
    deployments: list[DeploymentStatus]
    draining: list[DrainingWorker] = field(default_factory=list)
    """Workers stopped cleanly (SIGTERM) and still finishing their jobs, by name: each goes
    once its drain ends. No ``teams set`` waits for them (they admit no job)."""
    reason: str | None = None
    """Why the status is stale: some figures could not be read (PostgreSQL's budgets), in
    one line that says what to do, or no worker reports (``NO_WORKER``: none serves, none
    drains); None when every figure is current."""
    invalid_teams: list[str] = field(default_factory=list)
    """Registry rows no worker serves, their name or config invalid (``teams show`` says
    what is wrong): not in ``teams``, which workers' figures fill."""

    @property
    def budgets_read(self) -> bool:
        """Whether the budgets were read: stale only for want of a worker, they were."""
        return self.reason in (None, NO_WORKER)


@dataclass(frozen=True)
class Accounted:
    """Each team's spend in ``month`` (``YYYY-MM``, UTC) as usage_log holds it, teams without
    usage absent: what accounting wrote to PostgreSQL, the least a team's spend shows, which
    Redis losing its data (its ledgers, its live spend) does not lower."""

    month: str
    spend: Mapping[str, Decimal]


def status_record(status: Status) -> dict[str, Any]:
    """The status for programs (``--json``, the Live page's ``live.json``): its fields,
    ``stale`` with the ``reason`` when some figures could not be read, and ``budgets_read``:
    false when a team's ``budget_usd`` null is unknown, not "no budget"."""
    return {
        **dataclasses.asdict(status),
        "stale": status.reason is not None,
        "budgets_read": status.budgets_read,
    }


def watch_record(last: Status | None, reason: str | None, since: datetime | None) -> dict[str, Any]:
    """One refresh of ``status --watch --json``, marked stale as the table watch marks its
    frame (``queuegate.reporting.watch_view``): the last status read (``status_record``;
    ``at`` when it was read), ``stale`` with this refresh's ``reason``, and ``stale_since``
    when the watch went stale (null while fresh). A refresh that failed keeps the figures
    read before it; until one is read there are none, only the stale fields."""
    figures = status_record(last) if last is not None else {}
    return {**figures, "stale": reason is not None, "reason": reason, "stale_since": since}


class StatusReader:
    """Holds one broker connection and one Redis client, so ``--watch`` reads cheaply."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._keys = Keys(settings.redis_prefix)
        self._topology = Topology.of(settings)
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._redis: aioredis.Redis | None = None
        self._live: AsyncScript | None = None

    async def __aenter__(self) -> Self:
        self._connection = await connect(self._settings.amqp_url, name="queuegate-status")
        self._redis = redis_for(self._settings)
        self._live = self._redis.register_script(lua_source("queuegate", "live"))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._redis is not None:
            await self._redis.aclose()
        if self._connection is not None:
            await self._connection.close()

    async def read(
        self,
        teams: Sequence[str] | None = None,
        budgets: Mapping[str, Decimal] | None = None,
        deployments: Sequence[str] = (),
        *,
        stale: str | None = None,
        accounted: Accounted | None = None,
        disabled: Sequence[str] = (),
    ) -> Status:
        """The teams given (the registry's enabled ones: admin.status; those live workers
        serve when None), and those of the ``disabled`` teams whose queues hold jobs, each
        marked disabled; the deployments given (the catalog's: a deployment is listed
        whether or not a running worker has called it) and any other that workers called.
        ``stale``: why the caller could not read the budgets, carried by the status (its
        budgets are then unknown, not absent); else the status is stale when no worker
        reports. ``accounted``: the month's spend in PostgreSQL, the least each team shows
        (none: Redis's figures alone)."""
        try:
            status = await self._read(teams, budgets or {}, deployments, accounted, disabled)
        # TimeoutError, a REDIS_WAIT passed, is an OSError.
        except (RedisError, OSError) as exc:
            raise ServiceUnavailable(redis_unreachable(self._settings, cause=exc)) from exc
        # A draining worker reports: the figures are current, and say that it drains.
        if stale is None and status.workers == 0 and not status.draining:
            stale = NO_WORKER
        return dataclasses.replace(status, reason=stale)

    async def _read(
        self,
        teams: Sequence[str] | None,
        budgets: Mapping[str, Decimal],
        listed: Sequence[str],
        accounted: Accounted | None,
        disabled: Sequence[str],
    ) -> Status:
        assert self._redis is not None and self._live is not None
        keys = self._keys
        now = time.time()
        async with asyncio.timeout(REDIS_WAIT):
            view = await read_view(self._redis, keys)
        month = datetime.now(UTC).strftime("%Y-%m")
        # A disabled team's backlog waits unseen by workers: it is shown, not its idle queue.
        queues = {
            team: await self._queue_counts(self._topology.team_queue(team)) for team in disabled
        }
        held = [team for team, (depth, _) in queues.items() if depth]
        names = sorted(set(teams or view.teams) | set(held))
        deployment_names = sorted(set(listed) | set(view.deployments))
        windows, cut = rate_windows(now)
        oldest, rest = windows[0], windows[1:]
        # One call for every team and deployment (lua/live.lua).
        keys_read = []
        for team in names:
            keys_read += [keys.live_team_seconds(team, oldest)]
            keys_read += [keys.live_team(team, window) for window in rest]
            keys_read += [keys.live_waits(team), keys.live_spend(team, month)]
        for name in deployment_names:
            keys_read += [keys.live_deployment_seconds(name, oldest)]
            keys_read += [keys.live_deployment(name, window) for window in rest]
        async with asyncio.timeout(REDIS_WAIT):
            replies = iter(await self._live(keys=keys_read, args=[len(windows), len(names), cut]))
            # A ledger is believed only while its team has a budget: once unset, nothing keeps
            # it (no reserve, settle or reconciliation), so the one it left stays as it was.
            budgeted = [team for team in names if team in budgets]
            # As the next reserve sees it: a dead worker's lapsed reservations left out, not
            # counted until a job of the team comes to reap them.
            in_force = await teams_in_force(self._redis, keys, budgeted, month)
        ledgers = dict(zip(budgeted, in_force, strict=True))
        # Read for another month (a refresh across midnight on the 1st): not this one's.
        written = accounted.spend if accounted is not None and accounted.month == month else {}
        rows = []
        for team in names:
            ledger = ledgers.get(team)
            sums, waits_seen, seen = next(replies)
            taken = _counts(sums)
            waits = sorted(float(w) for w in waits_seen)
            depth, consumers = (
                queues[team]
                if team in queues
                else await self._queue_counts(self._topology.team_queue(team))
            )
            rows.append(
                TeamStatus(
                    team=team,
                    queue_depth=depth,
                    consumers=consumers,
                    in_flight=view.in_flight.get(team, 0),
                    jobs_in_per_s=taken["taken"] / RATE_SPAN,
                    jobs_out_per_s=taken["finished"] / RATE_SPAN,
                    errors_per_s=taken["errors"] / RATE_SPAN,
                    wait_p50_ms=_percentile(waits, 50),
                    wait_p99_ms=_percentile(waits, 99),
                    bucket_fill=view.bucket_fill.get(team),
                    # The ledger (reconciled with usage_log) when the team has a budget, else
                    # (none, or none known) what the workers saw (nano-USD: exact); never
                    # below what accounting wrote. Once Redis lost its data, the ledger is gone
                    # until it is made again from usage_log and the live spend counts only the
                    # jobs since; otherwise both are ahead by the jobs accounting has yet to write.
                    spend_usd=max(
                        from_nano(ledger if ledger is not None else int(seen or 0)),
                        written.get(team, Decimal(0)),
                    ),
                    budget_usd=budgets.get(team),
                    enabled=team not in queues,
                )
            )
        async with asyncio.timeout(REDIS_WAIT):
            health = await read_health(self._redis, keys, deployment_names)
        deployments = []
        for name in deployment_names:
            calls = _counts(next(replies))
            deployments.append(
                DeploymentStatus(
                    deployment=name,
                    breaker=health[name].state,
                    calls_per_s=calls["calls"] / RATE_SPAN,
                    error_rate=calls["errors"] / calls["calls"] if calls["calls"] else None,
                    rate_limited=calls["rate_limited"],
                    paused_for=health[name].paused_for,
                )
            )
        draining = [DrainingWorker(name, n) for name, n in sorted(view.draining.items())]
        return Status(datetime.now(UTC), view.workers, rows, deployments, draining)

    async def _queue_counts(self, queue: str) -> tuple[int | None, int | None]:
        assert self._connection is not None
        if self._channel is None or self._channel.is_closed:
            self._channel = await self._connection.channel()
        try:
            # robust=False: a robust channel keeps every queue it declared and answers a later
            # passive declare of it from that cache, with the counts of the first read.
            declared = await self._channel.declare_queue(queue, passive=True, robust=False)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            # The broker closed the channel over the missing queue; the next read opens one.
            return None, None
        result = declared.declaration_result
        return result.message_count, result.consumer_count


def _counts(flat: Sequence[Any]) -> Counter[str]:
    """Counts from lua/live.lua's flat list: name, count, name, count..."""
    return Counter({text(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)})


def _percentile(ordered: Sequence[float], pct: int) -> float | None:
    """Nearest-rank percentile of an ascending sequence; None when it is empty."""
    if not ordered:
        return None
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]
