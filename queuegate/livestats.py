"""Live stats: what workers are doing right now, kept in Redis for ``queuegate status``.

Each worker buffers counts in memory and writes them every ``settings.stats_interval``
seconds in one pipeline, so a job costs no Redis round trip of its own:

- per team and 10-second window: jobs taken and finished, errors (the rates over a minute),
  as totals and per second (the seconds of the oldest window that are still in the minute);
- per team: the last ``WAIT_SAMPLES`` queue waits (the p50/p99 wait);
- per deployment and window, likewise: provider calls, failed ones (the recent error rate)
  and those answered 429 (``rate_limited``);
- per worker: a snapshot with its in-flight jobs per team, the deployments it called,
  bucket fills and the registry version it serves under (``teams set`` waits for it),
  expiring unless renewed, so a dead worker drops out of the picture by itself; one that
  stops cleanly marks it draining as its drain begins (``withdraw``), at once: out of the
  live workers ``teams set`` waits for, still shown by ``queuegate status`` with the jobs it
  is finishing, and removed once its drain has ended.

Breaker states and 429 pauses are not taken from here: they are shared state in Redis, read
where they are kept (queuegate.deployment_health), since a worker's copy is only what it last
saw and goes with it.

Best effort by design: while Redis is down the counts are dropped, never the jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError

from queuegate.keys import Keys
from queuegate.messages import Attempt, UsageEvent
from queuegate.metrics import BREAKER_STATE, BUCKET_FILL, gauge_values
from queuegate.redis_client import text
from queuegate.registry import Version
from queuegate.runtime import until_set

log = logging.getLogger(__name__)

WINDOW = 10
"""Seconds per counting window. A window's counts are kept twice: as totals, and per second
of it, so that a rate counts the last ``RATE_SPAN`` whole seconds exactly (the totals of the
windows inside them, the seconds still inside of the oldest one) and reads about 7 hashes
per team, not 60. Counting the oldest window whole and dividing by the part of it inside
the minute made a burst read 6.0/s, then 5.4/s..., for what is 5.0/s over the minute."""
RATE_SPAN = 60
"""Seconds the job and error rates are computed over."""
WAIT_SAMPLES = 1000
SPEND_TTL = 40 * 24 * 3600
"""A month's live spend (``Keys.live_spend``, nano-USD: added by workers/lua/finish.lua with
each job's stored outcome, not buffered here, so a worker killed before its next write
loses none of it) outlives the month by a few days, then goes."""
WORKERS_TTL = 3600
"""Workers silent for this long are dropped from the workers set."""


def window_of(now: float) -> int:
    return int(now // WINDOW)


def _by_second(name: str, second: int) -> str:
    """The field of a window's per-second hash counting ``name`` in ``second`` (queuegate/
    lua/live.lua reads it back)."""
    return f"{name}:{second % WINDOW}"


@dataclass
class _Buffer:
    team_counts: defaultdict[tuple[str, int], Counter[str]] = field(
        default_factory=lambda: defaultdict(Counter)
    )
    waits: defaultdict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    deployment_counts: defaultdict[tuple[str, int], Counter[str]] = field(
        default_factory=lambda: defaultdict(Counter)
    )


class LiveStatsWriter:
    """One worker's live stats; ``run(stop)`` writes them until stop, then once more."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keys,
        worker: str,
        interval: float,
        in_flight: Callable[[], dict[str, int]],
        *,
        refresh: Callable[[], Awaitable[None]] | None = None,
        reread: Callable[[], None] | None = None,
    ) -> None:
        """``refresh``: brings gauges the snapshot reads up to date (bucket fills), first.
        ``reread``: asks the worker to read the registry again (``current`` wants it), when
        the snapshot may have lapsed and when it is written again after (or first)."""
        self._client = client
        self._refresh = refresh
        self._keys = keys
        self._worker = worker
        self._interval = interval
        self._in_flight = in_flight
        self._buffer = _Buffer()
        self._deployments: set[str] = set()
        self._down = False
        self._registry: Version | None = None
        self._soon = asyncio.Event()
        self._reread_asked = reread
        self._lapse_told = False
        self._read_at = 0.0
        """When (``time.monotonic``) the read of the registry the worker serves under began."""
        self._shown_since = 0.0
        """When the snapshot was written after it may have lapsed: the start of the stretch
        during which ``teams set`` has seen this worker all along."""
        self._shown_until = math.inf
        """Until when the last snapshot written surely lasts (its write's start + its TTL);
        unbounded before the first write: the registry read at the start is as new as that
        write, unless the write fails (then the worker was unseen from its start)."""
        self._reread = asyncio.Event()
        self._withdrawn = False

    def withdraw(self) -> None:
        """The worker stops taking jobs: its name leaves the live workers now, so that a
        ``teams set`` no longer waits for it nor names it unconfirmed, and its snapshot,
        marked ``draining``, is listed among the draining workers instead (``status`` shows
        what it still has in flight) until the last flush after the stop removes it. One that
        dies as it drains leaves it to lapse, as any other."""
        self._withdrawn = True
        self._soon.set()

    def applied(self, version: Version, read_at: float) -> None:
        """The worker serves under the registry as read at ``version``, a read begun at
        ``read_at`` (``time.monotonic``): written now, not at the next interval, for a
        ``teams set`` waiting for it."""
        self._registry = version
        self._read_at = read_at
        self._reread.set()
        self._reread = asyncio.Event()
        self._soon.set()

    def current(self) -> bool:
        """Whether jobs may be admitted under the registry the worker serves under: a
        ``teams set`` waits for this worker only while its snapshot lasts in Redis
        (``admin.teams.in_force``), and one that did not see it returned without its
        confirmation. So the registry must have been read since the snapshot was written
        after it may have lapsed, or, while it may be lapsed now, since it may have lapsed.
        A clock read, no round trip: the hot path asks it of every job."""
        now = time.monotonic()
        since = self._shown_since if now < self._shown_until else self._shown_until
        return self._read_at >= since

    async def until_current(self, until: float) -> bool:
        """Wait until ``current``, or ``until`` (``time.monotonic``): whether it is."""
        while not self.current():
            left = until - time.monotonic()
            if left <= 0:
                return False
            # Only a registry read makes it current (a write that shows the worker again
            # asks for one: ``reread``).
            await until_set(left, self._reread)
        return True

    def taken(self, team: str) -> None:
        self._buffer.team_counts[(team, int(time.time()))]["taken"] += 1

    def finished(self, usage: UsageEvent, attempts: Iterable[Attempt]) -> None:
        now = time.time()
        counts = self._buffer.team_counts[(usage.team, int(now))]
        counts["finished"] += 1
        if usage.status == "error":
            counts["errors"] += 1
        self._buffer.waits[usage.team].append(round(usage.queued_ms, 1))
        for attempt in attempts:
            self._deployments.add(attempt.deployment)
            calls = self._buffer.deployment_counts[(attempt.deployment, int(now))]
            calls["calls"] += 1
            if attempt.error is not None:
                calls["errors"] += 1
            if attempt.error == "rate_limited":
                calls["rate_limited"] += 1

    async def run(self, stop: asyncio.Event) -> None:
        while True:
            await until_set(self._interval, stop, self._soon)
            self._soon.clear()
            # Begun once stopped: what was counted since the one before is in it.
            last = stop.is_set()
            await self.flush(last=last)
            if last:
                return

    async def flush(self, *, last: bool = False) -> None:
        """Write what was counted since the last flush, and the worker's snapshot; ``last``:
        the worker has stopped, and a withdrawn one's snapshot is removed instead."""
        buffer, self._buffer = self._buffer, _Buffer()
        keys = self._keys
        now = time.time()
        pipe = self._client.pipeline(transaction=False)
        for (team, second), counts in buffer.team_counts.items():
            window = window_of(second)
            _count(
                pipe,
                keys.live_team(team, window),
                keys.live_team_seconds(team, window),
                second,
                counts,
            )
        for team, waits in buffer.waits.items():
            pipe.lpush(keys.live_waits(team), *waits)
            pipe.ltrim(keys.live_waits(team), 0, WAIT_SAMPLES - 1)
        for (deployment, second), counts in buffer.deployment_counts.items():
            window = window_of(second)
            totals = keys.live_deployment(deployment, window)
            _count(pipe, totals, keys.live_deployment_seconds(deployment, window), second, counts)
        ttl = max(5, round(3 * self._interval))
        if self._withdrawn:
            # In this writer's own order, after its earlier writes: none of their snapshots
            # can land after this and list the worker among the live ones again.
            pipe.zrem(keys.live_workers, self._worker)
            if last:
                pipe.zrem(keys.live_draining, self._worker)
                pipe.delete(keys.live_worker(self._worker))
            else:
                await self._show(pipe, now, ttl, keys.live_draining)
        else:
            await self._show(pipe, now, ttl, keys.live_workers)
        sent = time.monotonic()
        try:
            await pipe.execute()
        except (RedisError, OSError) as exc:
            if not self._down:
                log.warning("live stats not written: Redis unavailable (%s)", type(exc).__name__)
            self._down = True
            if self._shown_until == math.inf:
                self._shown_until = 0.0  # unseen from its start: its first write asks a read
            if time.monotonic() >= self._shown_until and not self._lapse_told:
                self._lapse_told = True
                self._ask_reread()
            return
        if self._down:
            log.info("live stats are written again")
        self._down = False
        if self._withdrawn:
            return  # no job admitted any more: ``current`` has nothing to follow
        written = time.monotonic()
        lapsed = written >= self._shown_until
        if lapsed:
            # A `teams set` meanwhile may not have waited for this worker.
            self._shown_since = written
        self._shown_until = sent + ttl
        if lapsed:
            self._lapse_told = False
            self._ask_reread()

    async def _show(self, pipe: Pipeline, now: float, ttl: int, listed: str) -> None:
        """Add the worker's snapshot, lasting ``ttl`` seconds, and its name to the ``listed``
        set (``Keys.live_workers``, or ``live_draining`` once withdrawn) to ``pipe``."""
        if self._refresh is not None:
            # Best effort: the pipeline meets Redis being away and says so once.
            with contextlib.suppress(RedisError, OSError):
                await self._refresh()
        breakers = gauge_values(BREAKER_STATE)
        snapshot = {
            "in_flight": self._in_flight(),
            # Read by gateways of the previous version, while a rolling upgrade mixes them.
            "breakers": breakers,
            "bucket_fill": gauge_values(BUCKET_FILL),
            "deployments": sorted(self._deployments | set(breakers)),
            "registry": self._registry,
            "ts": now,
            "draining": self._withdrawn,
        }
        pipe.set(self._keys.live_worker(self._worker), json.dumps(snapshot), ex=ttl)
        pipe.zadd(listed, {self._worker: now})
        pipe.zremrangebyscore(listed, 0, now - WORKERS_TTL)
        if self._withdrawn:
            # Drains are rare: a set left by workers killed as they drained goes with them.
            pipe.expire(listed, WORKERS_TTL)

    def _ask_reread(self) -> None:
        if self._reread_asked is not None:
            self._reread_asked()


def _count(pipe: Pipeline, totals: str, seconds: str, second: int, counts: Counter[str]) -> None:
    """Add one second's counts to its window's totals and per-second hashes."""
    for name, n in counts.items():
        pipe.hincrby(totals, name, n)
        pipe.hincrby(seconds, _by_second(name, second), n)
    pipe.expire(totals, 2 * RATE_SPAN)
    pipe.expire(seconds, 2 * RATE_SPAN)


@dataclass(frozen=True)
class LiveView:
    """Everything the workers reported, merged across live and draining workers."""

    workers: int
    """Those serving: the draining ones are not counted."""
    draining: dict[str, int]
    """The jobs each draining worker has in flight, by its name: counted in ``in_flight``."""
    teams: list[str]
    in_flight: dict[str, int]
    bucket_fill: dict[str, float]
    deployments: list[str]


@dataclass(frozen=True)
class LiveWorkers:
    """The workers as their live entries say (``read_workers``)."""

    listed: frozenset[str]
    """Those that wrote a snapshot in the last ``WORKERS_TTL`` seconds and did not withdraw
    it: live, or dead with their snapshot lapsed (or about to)."""
    snapshots: dict[str, dict[str, Any]]
    """The snapshot of each live one (its last has not expired), by its name."""
    draining: dict[str, dict[str, Any]]
    """The snapshot of each draining one (withdrawn, its drain not ended, its last snapshot
    not expired), by its name: in neither of the above, which are what a ``teams set``
    waits for."""


async def read_workers(client: aioredis.Redis, keys: Keys) -> LiveWorkers:
    since = time.time() - WORKERS_TTL
    pipe = client.pipeline(transaction=False)
    pipe.zrangebyscore(keys.live_workers, since, "+inf")
    pipe.zrangebyscore(keys.live_draining, since, "+inf")
    serving, withdrawn = ([text(n) for n in names] for names in await pipe.execute())
    names = list(dict.fromkeys(serving + withdrawn))
    raw = await client.mget([keys.live_worker(name) for name in names]) if names else []
    found = {n: json.loads(r) for n, r in zip(names, raw, strict=True) if r is not None}
    # By the snapshot's mark, not by the set: read between the two, a worker that withdrew
    # meanwhile is still in the first, with the snapshot of its drain.
    draining = {n: snap for n, snap in found.items() if snap.get("draining")}
    listed = frozenset(serving) - set(draining)
    return LiveWorkers(listed, {n: snap for n, snap in found.items() if n in listed}, draining)


async def read_view(client: aioredis.Redis, keys: Keys) -> LiveView:
    """Merge the snapshots of the workers that reported recently, draining ones included."""
    live = await read_workers(client, keys)
    snapshots = [*live.snapshots.values(), *live.draining.values()]
    in_flight: Counter[str] = Counter()
    fills: dict[str, float] = {}
    deployments: set[str] = set()
    for snap in snapshots:
        in_flight.update(snap["in_flight"])
        # Buckets are shared state in Redis: every worker reports the same value, give or
        # take an interval; the lowest fill is the safe one to show.
        for team, value in snap["bucket_fill"].items():
            fills[team] = min(value, fills.get(team, 1.0))
        deployments.update(snap["deployments"])
    return LiveView(
        workers=len(live.snapshots),
        draining={name: sum(snap["in_flight"].values()) for name, snap in live.draining.items()},
        teams=sorted(set(in_flight)),
        in_flight=dict(in_flight),
        bucket_fill=fills,
        deployments=sorted(deployments),
    )


def rate_windows(now: float) -> tuple[range, int]:
    """The windows holding the last ``RATE_SPAN`` whole seconds (the current one included),
    oldest first, and where in the oldest those seconds begin (0 to ``WINDOW`` - 1).

    Their counts (of the oldest window, its seconds from there on) over ``RATE_SPAN`` are the
    rates, so jobs finished in a burst read count / span for as long as they are in the span,
    not more while it is young. A job counts until its second leaves the span: ``RATE_SPAN``
    seconds after it finished, less the part of its second already gone then."""
    first = int(now) - RATE_SPAN + 1
    return range(window_of(first), window_of(now) + 1), first % WINDOW
