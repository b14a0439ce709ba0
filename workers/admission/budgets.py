"""Monthly budgets: a job's estimated cost is reserved before the call and settled after.

The ledgers live in Redis (nano-USD, per team and UTC month, optionally per model), updated
by ``lua/spend.lua`` so concurrent jobs cannot overshoot a budget by more than what they
cost past their estimates (a job's ``max_tokens`` bounds its output; without it, the team's
expected output does not: README, Admission control). A job the settled spend has room
for, but not with the other jobs' open reservations, is not refused: ``BudgetHeld`` says it
is to wait for them to settle (most of an estimate comes back), holding nothing meanwhile.
A job without an output limit may cost far more than its estimate: its ``room`` is its cost
at the output it is assumed able to reach. Beside other jobs' open reservations a job is
admitted only while the budget has room for its own room and what those may cost past their
estimates (their excesses) beside the spend: near the edge an unbounded job goes alone, and
the jobs after it wait for it, so one job at most passes the budget, by its own excess.
Each job holds one entry, which lapses ``lease`` seconds after its reserve (a worker that
died mid-job never settles it) and ``SETTLED_TTL`` after its settle; a reservation whose
job's claim lapsed (its worker died, or stalled) stops holding jobs back sooner, once it
holds one (``drop_dead``), counted as spent at the job's estimate until the job settles, and
its excess held as an open reservation's.
Accounting reconciles every ledger with usage_log (queuegate/spend.py), which also recovers
a settle lost to a Redis error.

When Redis has lost a ledger, the usage_log sum it is made again from misses the jobs
accounting has not written yet. So each worker remembers the jobs it settled, budgeted or
not (up to ``SETTLED_TTL`` and ``SETTLED_KEPT`` per team and month: job id, cost, model),
and the first reserve that finds the ledger missing or made again (a new generation)
reconciles it here, putting those of its scope back as entries unless usage_log holds them:
the ledger stays short only of the reservations of jobs in flight at the loss, until each
settles (its settle puts its cost in the new ledger). The other workers' jobs are put back by
each of them (``put_back``, on its live-stats flush) once it sees the ledger's generation
change; until then, ``hold`` seconds at most, the ledger is restoring and every reserve in it
waits, as one the other jobs' reservations hold does (``BudgetHeld``). A ledger a team gains
(a budget or a model cap set from none), made from usage_log as the change commits, misses
them the same way: each worker puts them back (``restore``) before it confirms the change.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

import asyncpg
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from queuegate.db import DB_ERRORS
from queuegate.errors import ServiceUnavailable
from queuegate.keys import Keys
from queuegate.numbers import plain_decimal
from queuegate.redis_client import lua_source, text
from queuegate.registry import TeamConfig
from queuegate.spend import (
    LEDGER_TTL,
    NANO,
    Scope,
    budget_scopes,
    current_month,
    exhausted,
    ledger_keys,
    reconcile,
    reconciler_token,
    to_nano,
)
from workers.admission.scripts import Call, Scripts

log = logging.getLogger(__name__)

SETTLED_TTL = 3600
"""Seconds a settled job's entry counts before it lapses: accounting reconciles it into the
ledger's base long before, unless it is down that long (then the ledger is short of those
jobs until it returns)."""
SETTLED_KEPT = 20_000
"""Settled jobs a worker remembers per team and month (the newest), to put back into a
ledger Redis lost or the team gained: about 5 MB, job ids included (one per job: 1 µs, about
10,000 instructions). A worker that settles more of one team's jobs than this while
accounting is behind on them leaves the oldest out of such a ledger until accounting
writes them."""
SWEEP_SECONDS = 60
"""How often a worker drops the settled jobs it remembers that have lapsed, of every team and
month: a team gone quiet, or a month gone by, settles nothing that would drop them."""
DEAD_BATCH = 100
"""Reservations ``drop_dead`` looks at per script call: bounded work for Redis."""
LOCK_WAIT = 5.0
"""Seconds a rebuild waits for another reconciler's round (well under a second) to end."""
UNLIMITED = 2**62
"""The limit of a forced reserve, in nano-USD: one no spend reaches."""


class BudgetHeld(Exception):
    """The job's reserve fits the budget's settled spend but not the open reservations of the
    other jobs in flight (with what those may cost past them, and its own room): it waits
    for them to settle or lapse, then reserves again (refused only if the settled spend
    cannot take it then)."""

    def __init__(self, team: str, ledger: str, expiry: str, message: str) -> None:
        super().__init__(message)
        self.team = team
        self.ledger = ledger
        """The one whose reservations held it: a settle in it may let it in."""
        self.expiry = expiry
        """The ledger's expiry set."""


@dataclass(frozen=True)
class Reservation:
    """What a job holds of its budgets until it is settled."""

    keys: list[str]
    """Each scope's ledger and expiry set, in the order spend.lua takes them."""
    team: str
    month: str
    job_id: str
    nano: int
    generations: list[str]
    """Each scope's ledger generation the job reserved in."""
    model: str
    """The job's model: what a ledger on a model cap puts it back by (``Budgets.restore``)."""
    threshold: int = 0
    """The team's alert threshold (nano-USD, 0: none) as the job was reserved: its settle is
    what brings the settled spend across it (spend.lua)."""
    budget: int = 0
    """The team's budget (nano-USD) as the job was reserved, which an alert its settle
    writes names (a settle is refused at no limit: spend.lua reads them for a reserve)."""


Settled = tuple[int, float, str]
"""A job a worker settled (``Budgets.remember``): its cost (nano-USD), when its ledger entry
lapses (epoch seconds: it is forgotten then), its model. A plain tuple: a NamedTuple's cost
0.23 µs more a job, for every job of every team."""


@dataclass(frozen=True)
class _Scoped:
    """What a job of one team's model reserves in, under one config in one month: worked out
    once (``Budgets.reserving``), where it cost 24,000 instructions a job, Decimal
    arithmetic and key formatting."""

    config: TeamConfig
    month: str
    scopes: list[tuple[str | None, Decimal]]
    keys: list[str]
    threshold: int
    limits: list[int]


@dataclass(frozen=True)
class Reserving:
    """A reserve about to run (``Budgets.reserving``): its script call, and what its reply
    is read with."""

    call: Call
    held: Reservation
    """What the job holds once the call made it, but for its generations (the reply's)."""
    model: str
    scopes: list[tuple[str | None, Decimal]]


class Budgets:
    def __init__(
        self,
        client: aioredis.Redis,
        scripts: Scripts,
        keys: Keys,
        pool: asyncpg.Pool,
        *,
        lease: float,
        slack: float,
        hold: float = 0.0,
    ) -> None:
        """``lease``: seconds a reservation lapses after, unless its job's deadline plus
        ``slack`` comes first (a job is never called past its deadline; a stream its chunks
        keep going past it passes ``ChatJob.ends_by``, no deadline). ``hold``: seconds a
        ledger this worker makes again after a loss holds its reserves back, for every other
        worker to put back its jobs (``put_back``) first; 0: none."""
        self._client = client
        self._scripts = scripts
        self._keys = keys
        self._pool = pool
        self._lease_ms = math.ceil(lease * 1000)
        self._slack = slack
        self._token = reconciler_token()
        self._unreserve: AsyncScript = client.register_script(
            lua_source("workers.admission", "unreserve")
        )
        self._hold_ms = math.ceil(hold * 1000)
        self._generations: dict[str, str] = {}
        """Each ledger's generation as this worker last reserved in it."""
        self._ledgers: dict[str, tuple[str, str, str | None]] = {}
        """Each ledger a job of this worker's reserves in: its team, month and model."""
        self._scoped: dict[tuple[str, str], _Scoped] = {}
        """Per team and model, what its jobs reserve in, as of the config last seen."""
        self._settled: dict[tuple[str, str], OrderedDict[str, Settled]] = {}
        """Per team and month, the jobs this worker settled (with a reservation or none),
        oldest first: one memory for all of a team's ledgers, those it has and those it may
        gain, rather than one per ledger."""
        self._swept = 0.0

    async def reserve(
        self,
        team: str,
        model: str,
        config: TeamConfig,
        nano: int,
        job_id: str,
        *,
        then: Call | None = None,
        name: str | None = None,
        deadline: datetime | None = None,
        forced: bool = False,
        room: int | None = None,
    ) -> tuple[Reservation | None, list[int] | None]:
        """Reserve ``nano`` for job ``job_id`` against the team's budget and the model's cap:
        the reservation (None when the team has neither), and the reply of ``then``.

        ``then`` is a call to run in the same round trip once the reservation is made; it does
        not run (its reply is None) when there is nothing to reserve or the reserve fails.
        Raises BudgetExhausted when the budget or the cap cannot take ``nano``, BudgetHeld
        when it can once the other jobs' reservations are settled. ``name``: the
        reservation's, the same on every try (``Scripts.run_all``). ``deadline``: the job's
        (``ChatJob.ends_by``). ``forced``: made past every limit (a job already called).
        ``room``: what the job may cost at most, when more than ``nano`` (``Estimate.room_nano``:
        an unbounded job); None: ``nano``.
        """
        reserving = self.reserving(
            team, model, config, nano, job_id, deadline=deadline, forced=forced, room=room
        )
        if reserving is None:
            return None, None
        calls = [reserving.call] + ([then] if then is not None else [])
        rounds = itertools.count()
        while True:
            # Each round after a rebuild is a new one: the one before was refused.
            replies = await self._scripts.run_all(calls, name=name and f"{name}.{next(rounds)}")
            reservation = await self.reserved(reserving, replies[0])
            if reservation is not None:
                return reservation, replies[1] if then is not None else None

    def ledgers(self, team: str, model: str, config: TeamConfig) -> tuple[str, ...]:
        """The ledgers a job of ``model`` reserves in now (none when the team has neither
        budget nor cap): the jobs waiting for the same ones wait in one line."""
        scoped = self._scope(team, model, config)
        return () if scoped is None else tuple(scoped.keys[::2])

    def reserving(
        self,
        team: str,
        model: str,
        config: TeamConfig,
        nano: int,
        job_id: str,
        *,
        deadline: datetime | None = None,
        forced: bool = False,
        room: int | None = None,
    ) -> Reserving | None:
        """The reserve of ``reserve`` as a script call, to run with another (a job's claim);
        its reply goes to ``reserved``. None when the team has neither budget nor cap."""
        scoped = self._scope(team, model, config)
        if scoped is None:
            return None
        keys, month = scoped.keys, scoped.month
        generations = [self._generations.get(ledger, "") for ledger in keys[::2]]
        held = Reservation(keys, team, month, job_id, nano, generations, model, *_alerting(scoped))
        limits = [UNLIMITED for _ in scoped.limits] if forced else scoped.limits
        entry_ms = self._lease_ms
        if deadline is not None:
            # A job that expires in its queue after its worker died holding it (waiting for a
            # rate limit) has no delivery coming back to settle its entry: it lapses then.
            if deadline.tzinfo is None:
                deadline = deadline.replace(tzinfo=UTC)
            left = (deadline - datetime.now(UTC)).total_seconds() + self._slack
            # Past already: it lapses at once (a reserve in the same millisecond reaps it),
            # not a millisecond later, which a read in that millisecond still counts.
            entry_ms = max(0, min(entry_ms, math.ceil(left * 1000)))
        call = self._call(
            "reserve",
            held,
            nano,
            threshold=scoped.threshold,
            entry_ms=entry_ms,
            limits=limits,
            room=nano if room is None else room,
        )
        return Reserving(call, held, model, scoped.scopes)

    def _scope(self, team: str, model: str, config: TeamConfig) -> _Scoped | None:
        """What a job of ``team``'s ``model`` reserves in now, under ``config``; None when the
        team has neither budget nor cap. Kept while the config (an unchanged team's is kept
        across registry reads) and the month are the same."""
        month = current_month()
        scoped = self._scoped.get((team, model))
        if scoped is not None and scoped.config is config and scoped.month == month:
            return scoped
        scopes = budget_scopes(config, model)
        if not scopes:
            return None
        threshold = (
            to_nano(config.budget_usd * Decimal(str(config.alert_threshold)))
            if config.budget_usd is not None
            else 0
        )
        models = [scope_model for scope_model, _ in scopes]
        keys = ledger_keys(self._keys, team, month, models)
        for ledger, scope_model in zip(keys[::2], models, strict=True):
            self._ledgers[ledger] = (team, month, scope_model)
        limits = [to_nano(limit) for _, limit in scopes]
        scoped = _Scoped(config, month, scopes, keys, threshold, limits)
        self._scoped[(team, model)] = scoped
        return scoped

    async def reserved(self, reserving: Reserving, reply: list[int]) -> Reservation | None:
        """The reservation ``reply`` (of ``reserving.call``) made; None when it found the
        ledger lost or made again, rebuilt now: the call (its generations brought up to
        date) is to run again. Raises BudgetExhausted when it was refused, BudgetHeld when
        the other jobs' open reservations kept it out."""
        held, scopes = reserving.held, reserving.scopes
        _alert(held.team, held.month, reply)
        if lost_ledger(reply):
            scope_model, _ = scopes[int(reply[1]) - 1]
            await self._rebuild(held.team, held.month, scope_model)
            ledgers = held.keys[::2]
            args = reserving.call.args
            args[-len(ledgers) :] = [self._generations.get(ledger, "") for ledger in ledgers]
            return None
        if held_back(reply):
            at = int(reply[1]) - 1
            scope_model, limit = scopes[at]
            why = (
                "the reservations of its jobs in flight"
                if reply[0] == -4
                else "its ledger, made again after Redis lost it, until every worker has put "
                "back the jobs it settled that accounting has not written"
            )
            raise BudgetHeld(
                held.team,
                held.keys[2 * at],
                held.keys[2 * at + 1],
                f"team {held.team}'s {f'{scope_model} cap' if scope_model else 'budget'} "
                f"(${plain_decimal(limit)}) is held by {why} "
                f"(${plain_decimal(Decimal(int(reply[2])) / NANO)} spent and reserved)",
            )
        if reply[0] == -1:
            scope = scopes[int(reply[1]) - 1]
            raise exhausted(
                held.team,
                held.month,
                model=reserving.model,
                scope=scope,
                spent=int(reply[2]),
                needed=held.nano,
            )
        return self.made(reserving, reply)

    def made(self, reserving: Reserving, reply: list[int]) -> Reservation:
        """The reservation of a ``reserving.call`` whose ``reply`` says it was made (status
        0)."""
        held = reserving.held
        ledgers = held.keys[::2]
        generations = [text(gen) for gen in reply[3 : 3 + len(ledgers)]]
        if generations == held.generations:
            return held  # the generations it was made with (all but always): as it is
        self._generations.update(zip(ledgers, generations, strict=True))
        # Made as it is, not by dataclasses.replace: its look at each field costs µs a job.
        return Reservation(
            held.keys,
            held.team,
            held.month,
            held.job_id,
            held.nano,
            generations,
            held.model,
            held.threshold,
            held.budget,
        )

    async def drop_dead(self, held: BudgetHeld) -> int:
        """End the reservations, in the ledger that ``held`` a job, of the jobs whose claims
        lapsed (their workers died, or stalled), each kept as spend at its estimate (its
        excess held) until its settle or its next delivery replaces it
        (``lua/unreserve.lua``): how many. Those jobs' next deliveries, which would end them,
        may be queued behind the very jobs they hold."""
        jobs: list[str] = []
        cursor = 0
        while True:
            cursor, fields = await self._client.hscan(
                held.ledger, cursor, match="r:*", count=10 * DEAD_BATCH
            )
            jobs += [text(field).removeprefix("r:") for field in fields]
            if not cursor:
                break
        dropped = 0
        for at in range(0, len(jobs), DEAD_BATCH):
            batch = jobs[at : at + DEAD_BATCH]
            claims = [self._keys.claim(held.team, job) for job in batch]
            dropped += len(
                await self._unreserve(keys=[held.ledger, held.expiry, *claims], args=batch)
            )
        if dropped:
            log.warning(
                "ended %d budget reservations of team %s whose workers died or stalled (their "
                "claims lapsed) in %s, counted as spent at their estimates until they settle",
                dropped,
                held.team,
                held.ledger,
            )
        return dropped

    def settle_call(
        self, reservation: Reservation, actual_nano: int, *, running: bool = False
    ) -> Call:
        """The script call that replaces the reserved estimate with what the job really cost,
        to run with the job's other settles (its reply then goes to ``settled``). ``running``:
        ``actual_nano`` bills calls as lost that may still be running, whose excess the entry
        keeps (spend.lua's "lost")."""
        if actual_nano > 0:
            self.remember(
                reservation.team,
                reservation.month,
                reservation.model,
                reservation.job_id,
                actual_nano,
            )
        return self._call(
            "lost" if running else "settle",
            reservation,
            actual_nano,
            threshold=reservation.threshold,
            entry_ms=SETTLED_TTL * 1000,
            limits=[reservation.budget, *(0 for _ in reservation.generations[1:])],
        )

    def charge_call(
        self,
        team: str,
        model: str,
        config: TeamConfig,
        nano: int,
        job_id: str,
        *,
        running: bool = False,
    ) -> Call | None:
        """A settle of job ``job_id``'s entry to ``nano`` without a reservation of this
        delivery's (a refused job whose lapsed owners made calls): it replaces what they
        reserved; once that entry has lapsed, the job's usage row brings ``nano`` in at
        reconciliation. None when the team has no budget. ``running``: as ``settle_call``'s."""
        scoped = self._scope(team, model, config)
        if scoped is None:
            return None
        # No generation known: only an entry of the ledger as it is now is replaced.
        generations = ["" for _ in scoped.scopes]
        reservation = Reservation(
            scoped.keys, team, scoped.month, job_id, nano, generations, model, *_alerting(scoped)
        )
        return self.settle_call(reservation, nano, running=running)

    def settled(self, reservation: Reservation, reply: list[int]) -> None:
        _alert(reservation.team, reservation.month, reply)

    def _call(
        self,
        mode: str,
        entry: Reservation,
        nano: int,
        *,
        threshold: int,
        entry_ms: int,
        limits: list[int],
        room: int = 0,
    ) -> Call:
        """spend.lua's call on ``entry``'s ledgers: ``mode`` ("reserve", "settle" or "lost")
        ``nano`` for its job, whose entry lapses ``entry_ms`` later, refused past each scope's limit
        (0: none), alerted once past ``threshold`` (0: never). ``room``: a reserve's job's
        cost at its worst output (no more than ``nano``: none)."""
        team, month = entry.team, entry.month
        args: list[str | int] = [mode, nano, LEDGER_TTL, threshold, team, month, entry.job_id]
        args += [entry_ms, room, *limits, *entry.generations]
        return Call(
            "spend", [self._keys.budget_alerted(team, month), self._keys.alerts, *entry.keys], args
        )

    def remember(self, team: str, month: str, model: str, job_id: str, nano: int) -> None:
        """Keep job ``job_id`` of ``team``'s ``model``, settled for ``nano`` (> 0) in
        ``month``, to put back into a ledger of the team's Redis loses or the team gains
        until accounting writes its usage row: a job of a team without a budget too, which
        has no ledger yet (asked for each of its jobs: a dict's work, no Redis)."""
        now = time.time()
        if now - self._swept > SWEEP_SECONDS:
            self._sweep(now)
        jobs = self._settled.get((team, month))
        if jobs is None:
            jobs = self._settled[team, month] = OrderedDict()
        jobs[job_id] = (nano, now + SETTLED_TTL, model)
        jobs.move_to_end(job_id)  # a job settled again (a redelivery) lapses last
        _forget_lapsed(jobs, now)
        if len(jobs) > SETTLED_KEPT:
            jobs.popitem(last=False)

    def remembered(self, team: str, job_id: str) -> int | None:
        """What job ``job_id`` of ``team`` cost when this worker settled it (``remember``);
        None when it does not remember settling it."""
        for (of, _), jobs in self._settled.items():
            if of == team and job_id in jobs:
                return jobs[job_id][0]
        return None

    def _sweep(self, now: float) -> None:
        """Drop every lapsed job remembered, and each team and month left with none."""
        self._swept = now
        for key, jobs in list(self._settled.items()):
            _forget_lapsed(jobs, now)
            if not jobs:
                del self._settled[key]

    async def restore(self, team: str, scopes: list[Scope]) -> None:
        """Put the jobs this worker settled that usage_log does not hold yet back into
        ``scopes``, ledgers ``team`` gained this month (``Admission.hold_in_flight``): each
        was made from usage_log alone as the change committed. Raises ServiceUnavailable
        (PostgreSQL away, or the reconciler's lock held for ``LOCK_WAIT``) or RedisError."""
        month = current_month()
        jobs = self._settled.get((team, month))
        if not jobs:
            return
        models = {model for _, _, model in jobs.values()}
        for scope in scopes:
            if scope.model is None or scope.model in models:
                await self._rebuild(team, month, scope.model)

    async def put_back(self) -> None:
        """Put the jobs this worker settled that usage_log does not hold yet back into each
        ledger of their team and month that was made again (or lost) since this worker
        reserved in it: another worker's reserve rebuilt it from usage_log and its own jobs
        alone, and holds its reserves back meanwhile (``hold``). Run every live-stats
        interval: one HGET per such ledger, in one round trip. Raises ServiceUnavailable or
        RedisError, as ``restore``."""
        ledgers = [
            ledger for ledger in self._generations if self._settled.get(self._ledgers[ledger][:2])
        ]
        if not ledgers:
            return
        pipe = self._client.pipeline(transaction=False)
        for ledger in ledgers:
            pipe.hget(ledger, "gen")
        generations = await pipe.execute()
        for ledger, generation in zip(ledgers, generations, strict=True):
            if generation is None or text(generation) != self._generations[ledger]:
                await self._rebuild(*self._ledgers[ledger])

    async def _rebuild(self, team: str, month: str, model: str | None) -> None:
        """Reconcile a ledger Redis lost (or made again since this worker reserved in it, or
        the team gained), putting back the jobs of its scope (the team's, or its ``model``'s)
        this worker settled that usage_log does not hold yet. Made again here by a worker
        that used it or settled jobs of its scope, the ledger is lost, not new: it holds its
        reserves back for ``hold`` while the other workers put theirs back."""
        ledger = self._keys.spend(team, month, model)
        jobs = self._settled.get((team, month), OrderedDict())
        now = time.time()
        _forget_lapsed(jobs, now)
        back = {
            job: (nano, math.ceil((lapses - now) * 1000))
            for job, (nano, lapses, of) in jobs.items()
            if model is None or of == model
        }
        lost = bool(back) or bool(self._generations.get(ledger))
        scope = Scope(team, model)
        deadline, delay = time.monotonic() + LOCK_WAIT, 0.02
        while True:
            try:
                corrections = await reconcile(
                    self._client,
                    self._pool,
                    self._keys,
                    [scope],
                    month,
                    token=self._token,
                    restore={scope: back},
                    restoring=self._hold_ms if lost else 0,
                )
            except DB_ERRORS as exc:
                raise ServiceUnavailable(
                    f"cannot rebuild team {team}'s spend for {month} from PostgreSQL ({exc})"
                ) from exc
            if corrections is not None:
                break
            if time.monotonic() >= deadline:
                raise ServiceUnavailable(
                    f"team {team}'s spend ledger for {month} is being reconciled by another "
                    "process; retrying"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
        if not corrections:  # PostgreSQL refused a value of it (reconcile logged which)
            raise ServiceUnavailable(f"cannot rebuild team {team}'s spend for {month}")
        (correction,) = corrections
        self._generations[ledger] = correction.generation
        self._ledgers[ledger] = (team, month, model)
        if correction.before is None:
            log.warning(
                "team %s's spend ledger for %s was missing (Redis lost it): rebuilt from "
                "PostgreSQL at $%s, with the jobs this worker settled that accounting has not "
                "written yet (%d kept); jobs in flight count when they settle",
                team,
                month,
                plain_decimal(correction.after),
                len(back),
            )
        elif back:
            log.info(
                "team %s's spend ledger for %s was made again (or gained) since this worker "
                "used it: put back the jobs it settled that accounting has not written yet "
                "(%d kept)",
                team,
                month,
                len(back),
            )


def lost_ledger(reply: list[int]) -> bool:
    """Whether a reserve's ``reply`` found its ledger lost or made again: to be rebuilt (with
    PostgreSQL's help) before it runs again."""
    return reply[0] in (-2, -3)


def held_back(reply: list[int]) -> bool:
    """Whether a reserve's ``reply`` says the other jobs' open reservations kept it out, or
    its ledger is restoring (made again after a loss): it runs again once they settle, or
    the restoring is over."""
    return reply[0] in (-4, -5)


def _forget_lapsed(jobs: OrderedDict[str, Settled], now: float) -> None:
    """Drop the jobs whose entries would have lapsed from the ledger anyway."""
    while jobs and next(iter(jobs.values()))[1] <= now:
        jobs.popitem(last=False)


def _alerting(scoped: _Scoped) -> tuple[int, int]:
    """A reservation's alert threshold and the budget its alert names: the team ledger's
    (the first scope), when the team has a budget."""
    return scoped.threshold, scoped.limits[0] if scoped.threshold else 0


def _alert(team: str, month: str, reply: list[int]) -> None:
    """Log the alert a reserve or settle emitted when it crossed the team's threshold."""
    if len(reply) > 2 and reply[0] == 0 and reply[2] == 1:
        log.warning(
            "team %s crossed its budget alert threshold for %s: $%s spent",
            team,
            month,
            plain_decimal(Decimal(int(reply[1])) / NANO),
        )
