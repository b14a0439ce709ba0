"""Admission: the gate every job passes before a provider is called, and settles after.

    ticket = await admission.admit(job, deadline)       # budget, then the team's buckets
    routed = await router.complete(job, deadline=deadline, gate=ticket)  # + each deployment's
    await ticket.settle(routed)                          # real usage replaces the estimates

A job over its limit waits here, in its own consumer's slot, for as long as the buckets
say, so other teams' jobs keep flowing; less when the jobs ahead settle for fewer tokens
than they took (``Ticket._sleep``). It never waits past its deadline or
``settings.admission_max_wait`` (far inside the broker's consumer timeout): past that it is
answered ``rate_limited`` with the wait it would have needed, and never requeued.

A job whose budget has room on its settled spend but not beside the open reservations of the
team's other jobs in flight waits here too, holding nothing, until enough of those settle
(most of an estimate comes back) or lapse; then it is reserved, or refused if the settled
spend cannot take it. So does a job without an output limit near its budget's edge, while
any other job's reservation is open there (it goes alone: ``budgets``). Only the first of a
process's jobs waiting on the same ledgers asks Redis, woken by this process's settles in
them and polling for other processes'; once it has waited a claim lease, it ends the
reservations of jobs whose workers died or stalled (their claims lapsed), whose next
deliveries may be queued behind it, each counted as spent at its estimate until it settles
(an unbounded job's excess still holding jobs back near the edge).
Past its deadline it is answered ``deadline_exceeded``, past the maximum wait
``rate_limited``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from decimal import Decimal
from functools import partial
from typing import Any, NamedTuple, TypeVar

import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from queuegate.errors import Billed, DeadlineExceeded, JobError, RateLimited, ServiceUnavailable
from queuegate.keys import Keys
from queuegate.livestats import LiveStatsWriter
from queuegate.messages import ChatJob
from queuegate.metrics import keep_bucket_fills, observe_bucket_wait
from queuegate.outage import OutageLog
from queuegate.registry import ModelLimits, TeamConfig, default_burst
from queuegate.runtime import until_set
from queuegate.settings import Settings
from queuegate.spend import budget_scopes, current_month, ledger_scopes, to_nano
from router import Catalog, Deployment, Routed
from workers.admission.buckets import (
    Buckets,
    Limit,
    Take,
    lined,
    refunded,
    settle_call,
    take_call,
    taken,
)
from workers.admission.budgets import (
    BudgetHeld,
    Budgets,
    Reservation,
    Reserving,
    held_back,
    lost_ledger,
)
from workers.admission.estimate import Estimate, estimate
from workers.admission.line import Line
from workers.admission.policy import MEANWHILE, RETRY_SECONDS, LocalBuckets
from workers.admission.scripts import Call, Scripts, once

log = logging.getLogger(__name__)

T = TypeVar("T")

LEASE_SLACK = 60.0
"""Seconds a job's budget reservation outlives its time limit before it lapses."""
DEADLINE_SLACK = 10.0
"""Seconds it outlives its job's deadline, when that comes first: the job's call is cut at
the deadline and its settle follows within milliseconds; one later still finds its cost
brought in by reconciliation."""

RESTORING_INTERVALS = 2
"""Live-stats intervals a ledger made again after a Redis loss holds its reserves back: every
live worker flushes its live stats (and puts its jobs back: ``Admission.put_back``) within
one, the second is slack for a flush that runs late."""

BUDGET_POLL = 0.05
"""Seconds the first job waiting for its budget's reservations waits before it asks again,
doubled after each try up to ``RETRY_SECONDS``: a settle of this process's in the ledger that
held it wakes it at once, another process's is seen within that."""

CHECK_SECONDS = 1.0
"""How often a job waiting for its buckets or budget runs its checks (its batch not canceled,
its team still served, its budget still covering it): a job that must not be served any more
leaves within that, not when its turn comes."""

UNREGISTERED = TeamConfig()
"""The config of a team the registry does not list (``--teams``; no limits, no budget):
one, frozen, for every job, rather than one made anew at each of a job's five or more looks
(1.5 us each) and held by the job until it ends (0.8 KB a job, 4 MB with 5,000 held)."""

Check = Callable[[], Awaitable[None]]
"""Raises a JobError when the job must not be served any more (its batch was canceled)."""


class TeamStopped(ServiceUnavailable):
    """The worker stopped serving the job's team (disabled, or the worker drains:
    ``Admission.stop``) while the job waited for admission: the job goes back to its queue
    uncalled, as the queued jobs of the team stay."""


class BudgetCut(ServiceUnavailable):
    """The job's budgets changed while it waited for its buckets, and the reservations of
    its team's jobs in flight hold them: the job goes back to its queue uncalled, to wait
    for its budget holding nothing."""


class Admission:
    """One per worker process; ``update`` hands it the registry's team configs."""

    def __init__(
        self,
        settings: Settings,
        client: aioredis.Redis,
        pool: asyncpg.Pool,
        catalog: Catalog,
        *,
        view: LiveStatsWriter | None = None,
    ) -> None:
        """``view``: says whether the registry configs ``update`` gave may be admitted under
        (``LiveStatsWriter.current``); None: always."""
        self._view = view
        self._keys = Keys(settings.redis_prefix)
        self._scripts = Scripts(client, self._keys)
        self._settings = settings
        self._catalog = catalog
        self._buckets = Buckets(self._scripts)
        # A reservation lapses once its job cannot be running any more: the worker bounds a
        # job by its time limit and its deadline, and publishing its outcome takes far less
        # than the slacks.
        self._budgets = Budgets(
            client,
            self._scripts,
            self._keys,
            pool,
            lease=settings.job_time_limit + LEASE_SLACK,
            slack=DEADLINE_SLACK,
            hold=RESTORING_INTERVALS * settings.stats_interval,
        )
        self._local = LocalBuckets(share=1 / settings.admission_workers)
        self.policy = settings.redis_outage
        self.outage = OutageLog(log, "Redis", MEANWHILE[self.policy])
        self._postgres = OutageLog(
            log, "PostgreSQL (budget ledger rebuild)", "jobs of teams whose ledger is lost wait"
        )
        self._put_back = OutageLog(
            log,
            "PostgreSQL (budget ledger put-back)",
            "the jobs this worker settled come back into a ledger made again at its next "
            "reserve there, or as accounting writes them",
        )
        self._configs: Mapping[str, TeamConfig] = {}
        self._changed: dict[str, TeamConfig] = {}
        """Teams whose config ``update`` changed since the last ``hold_in_flight``, each with
        its config before (``UNREGISTERED`` if none)."""
        self._stopped: set[str] = set()
        """Teams whose consumers this worker cancelled (disabled): their held jobs go back."""
        self._stop = asyncio.Event()
        """Set as the worker drains (``stop``): every held job goes back."""
        self._lines: dict[tuple[str, ...], Line] = {}
        self._settles: dict[str, asyncio.Event] = {}
        """Per budget ledger a job waited on (``_wait_for_budget``), set by each settle of this
        process's in it: one per team, month and capped model."""
        self._refunds: dict[str, asyncio.Event] = {}
        """Per bucket a reservation waits on (``Ticket._sleep``), set and dropped by the next
        settle of this process's giving tokens back to it (``refunds``)."""
        self._deployment_limits: dict[str, Limit | None] = {}
        self._in_flight: weakref.WeakKeyDictionary[Ticket, ChatJob] = weakref.WeakKeyDictionary()
        """The jobs admitted and not settled yet, by ticket (weakly: one a path never settles
        goes with it), for ``hold_in_flight``."""
        self._swept: dict[str, float] = {}
        """Per budget ledger a job waited on, when this process last looked in it for the
        reservations of dead workers' jobs (``_drop_dead``)."""

    def update(self, configs: Mapping[str, TeamConfig]) -> None:
        """Admit under ``configs`` from now on; then ``hold_in_flight``, before the worker
        confirms their registry version."""
        old = self._configs
        # Each read builds every config anew: an unchanged one stays the object it was, so
        # that an admission sees a change by identity and ``hold_in_flight`` looks only at
        # the jobs of teams whose config changed.
        self._configs = {
            team: old[team] if old.get(team) == config else config
            for team, config in configs.items()
        }
        for team, config in self._configs.items():
            if old.get(team) is not config:
                self._changed.setdefault(team, old.get(team) or UNREGISTERED)
        self._stopped -= set(configs)

    async def hold_in_flight(self) -> None:
        """Reserve each admitted job's estimate in the ledgers its team's config (``update``)
        gives it that it holds no entry in: a team given a budget or a model cap it had none
        of admitted it reserving nothing there, and a ledger made from usage_log as the
        change commits misses it until it settles. The worker confirms the registry version
        only once this returns (``teams set`` waits for that), so every admission after the
        change is in force counts them; their settles replace the reservations with what
        they cost, as any job's. Made past the limits: the jobs are in their calls. A reserve
        lost to an outage leaves its job to count once it settles, as before.

        Then the jobs of the team this worker settled reserving nothing there (remembered:
        ``Budgets.remember``) go back into each ledger the team gained, unless usage_log
        holds them: accounting, behind or down, may not have written them when the ledger
        was made. Last, so a job that settles meanwhile is remembered by then. Lost to an
        outage, those count once accounting writes them."""
        changed, self._changed = self._changed, {}
        for ticket, job in list(self._in_flight.items()):
            if job.team not in changed:
                continue
            config = self.config(job.team)
            ledgers = set(self._budgets.ledgers(job.team, job.model, config))
            held = set(ticket.budget.keys[::2]) if ticket.budget is not None else set()
            if not held < ledgers or not ticket.budgeting:
                continue  # no ledger it misses, or a dropped one: its checks reserve anew
            try:
                reservation, _ = await self._budgets.reserve(
                    job.team,
                    job.model,
                    config,
                    ticket.reserving,
                    job.job_id,
                    deadline=job.ends_by,
                    forced=True,
                    room=ticket.room,
                )
            except (RedisError, ServiceUnavailable) as exc:
                log.warning(
                    "cannot reserve job %s of team %s, in flight as its budget changed, in its "
                    "new ledgers (%s): they count it once it settles",
                    job.job_id,
                    job.team,
                    exc,
                )
                continue
            if reservation is not None:
                await self.settle(ticket.rebudgeted(reservation))
        for team, before in changed.items():
            had = set(ledger_scopes(team, before))
            gained = [scope for scope in ledger_scopes(team, self.config(team)) if scope not in had]
            if not gained:
                continue
            try:
                await self._budgets.restore(team, gained)
            except (RedisError, ServiceUnavailable) as exc:
                log.warning(
                    "cannot put the jobs of team %s this worker settled back into the budget "
                    "ledgers it gained (%s): they count once accounting writes them",
                    team,
                    exc,
                )

    def current(self) -> bool:
        """Whether jobs may be admitted under this process's registry configs now: a clock
        read, no coroutine, as the hot path asks it of every job (``until_current`` else)."""
        return self._view is None or self._view.current()

    async def until_current(self, deadline: float | None) -> None:
        """Wait until ``current``: a worker whose live snapshot may have lapsed (cut off from
        Redis) reads the registry again first, as a `teams set` meanwhile returned without
        waiting for it. Until the job's deadline or the maximum wait, as for any outage
        (then RateLimited or DeadlineExceeded)."""
        view = self._view
        if view is None:
            return
        until = time.monotonic() + self._settings.admission_max_wait
        if deadline is not None:
            until = min(until, deadline)
        if await view.until_current(until):
            return
        raise _late(
            deadline,
            until,
            "the team registry (PostgreSQL) could not be read again since this worker's live "
            "entry in Redis lapsed, so a team's config changed meanwhile may not be applied",
        )

    def stopped(self, team: str) -> None:
        """The worker no longer takes ``team``'s jobs (disabled): those waiting for its
        buckets go back to its queue at their next check, uncalled."""
        self._stopped.add(team)

    def stop(self) -> None:
        """The worker drains: no job is admitted from now on, and every job waiting for
        admission (its buckets, its budget) goes back to its queue at once, uncalled and
        holding nothing, as a disabled team's do (TeamStopped). Once this returns no job is
        admitted: the stop is the last thing an admission looks at, after its last wait
        (``_recheck``)."""
        self._stop.set()

    async def pause(self, seconds: float, *events: asyncio.Event) -> None:
        """Wait ``seconds``, or until one of ``events`` is set or the worker drains (``stop``:
        the job waiting then runs its checks, which send it back)."""
        await until_set(seconds, self._stop, *events)

    @property
    def stopping(self) -> bool:
        """Whether the worker drains (``stop``)."""
        return self._stop.is_set()

    async def until_stopped(self) -> None:
        """Return once the worker drains (``stop``)."""
        await self._stop.wait()

    async def refresh_fills(self) -> None:
        """Read every rate-limited team's bucket fill as of now into its metric (and so the
        live stats ``queuegate status`` shows), rather than as of its last take; a team
        with no limits any more has none."""
        keep_bucket_fills([team for team, config in self._configs.items() if _limited(config)])
        await self._buckets.refresh_fills(
            [
                _team_limit(team, self._keys.team_bucket(team), f"team {team}", config)
                for team, config in self._configs.items()
                if config.rpm or config.tpm
            ]
        )

    def remembered(self, team: str, job_id: str) -> int | None:
        """What job ``job_id`` of ``team`` cost (nano-USD) when this worker settled it within
        the hour (``Budgets.remember``); None when it does not remember it."""
        return self._budgets.remembered(team, job_id)

    async def put_back(self) -> None:
        """Put the jobs this worker settled that accounting has not written back into their
        ledgers another worker made again after a Redis loss (``Budgets.put_back``): called
        on each live-stats flush, within the interval, as that ledger holds its reserves back
        for ``RESTORING_INTERVALS``. Lost to an outage or cut off by the interval, it is tried
        again at the next flush. A RedisError is the flush's too, which says so once."""
        try:
            async with asyncio.timeout(self._settings.stats_interval):
                await self._budgets.put_back()
        except (ServiceUnavailable, TimeoutError) as exc:
            self._put_back.failed(exc)
        else:
            self._put_back.recovered()

    def config(self, team: str) -> TeamConfig:
        return self._configs.get(team) or UNREGISTERED

    def deployment_limit(self, deployment: Deployment) -> Limit | None:
        """The bucket of the provider account's own limits, if the catalog gives it any."""
        name = deployment.name
        if name not in self._deployment_limits:
            self._deployment_limits[name] = (
                None
                if not deployment.limited
                else Limit(
                    self._keys.deployment_bucket(name),
                    f"deployment {name}",
                    deployment.rpm,
                    deployment.tpm,
                    deployment.request_burst,
                    line=self._keys.deployment_line(name),
                )
            )
        return self._deployment_limits[name]

    def straight(
        self, job: ChatJob, deployment: Deployment, ahead: Ahead | None = None
    ) -> Estimate | None:
        """The job's estimate when admission has nothing to wait for between its claim and
        its call to ``deployment``: no bucket of its team's, nor of the deployment's, nor
        jobs waiting for its budget (a held-back reserve of ``ahead``'s stops its claim's round
        trip before the call's record). None otherwise, or when its estimate is refused
        (``admit`` refuses it in its turn).

        ``ahead``: the job's, whose estimate is the same (made once, not twice), and which
        takes its team's buckets with its claim: then the deployment's are taken there too,
        after them (``_take_ahead``), and the call is recorded only if both let it go."""
        limit = self.deployment_limit(deployment)
        if ahead is not None:
            return ahead.estimate if self._take_ahead(ahead, limit) else None
        config = self.config(job.team)
        # The deployment's first: a lookup, where the team's limits are made anew.
        if limit is not None or self._team_limits(job, config):
            return None
        if self._budget_waited(self._budgets.ledgers(job.team, job.model, config)):
            return None
        try:
            return self._estimate(job, config)
        except JobError:
            return None

    def _take_ahead(self, ahead: Ahead, limit: Limit | None) -> bool:
        """Whether a job whose reserve and first take ride with its claim (``ahead``) meets
        nothing else to wait for before its call: its team's buckets are taken there (it has
        none, or no job of this process waits for them), and so are the deployment's
        (``limit``; None: it has none), whose take is added to ``ahead``'s calls unless jobs of
        this process wait for it. A third round trip, right before the call, otherwise."""
        if ahead.limits and len(ahead.calls) < 2:
            return False  # its team's jobs wait in line: so will it
        if limit is None:
            return True
        team = ahead.reserving.held.team
        if self.line([limit], team).locked():
            return False
        # Never into the deployment's line across processes (patience 0): refused, the job
        # takes its turn there as any other, once admitted (Ticket.enter).
        ahead.calls.append(take_call([limit], ahead.estimate.tokens, team=team))
        ahead.deployment = limit
        return True

    def line(self, limits: list[Limit], team: str) -> Line:
        """Where this process's jobs of ``team`` wait their turn for the same buckets, first
        come, first served (see Ticket.take). One per team: a deployment's buckets, shared by
        teams, give the teams their turns themselves, across processes (``lua/take.lua``)."""
        return self._line_at((*(limit.key for limit in limits), team))

    def _budget_waited(self, ledgers: tuple[str, ...]) -> bool:
        """Whether jobs of this process wait for ``ledgers`` (``_wait_for_budget``): a job
        reserving in them goes behind those, rather than take what they wait for."""
        line = self._lines.get(ledgers)
        return line is not None and line.locked()

    def refunds(self, limits: Sequence[Limit]) -> list[asyncio.Event]:
        """Events set by this process's next settle giving tokens back to each bucket of
        ``limits`` with a token limit. Each is set once, then replaced: taken before a look
        at the buckets (``due``), one set by a settle during that look is not missed."""
        events = []
        for limit in limits:
            if limit.tpm:
                event = self._refunds.get(limit.key)
                if event is None:
                    event = self._refunds[limit.key] = asyncio.Event()
                events.append(event)
        return events

    async def due(self, limits: Sequence[Limit], marks: Sequence[int]) -> float | None:
        """Seconds a reservation of ``limits`` (its take's ``marks``) has still to wait
        (``Buckets.due``); None when Redis could not tell (it waits as its take said)."""
        try:
            due_ms = await self._buckets.due(limits, marks)
        except RedisError as exc:
            self.outage.failed(exc)
            return None
        self.outage.recovered()
        return due_ms / 1000

    def _line_at(self, key: tuple[str, ...]) -> Line:
        """Where this process's jobs wait their turn for the same keys: buckets and team, or
        budget ledgers (``_wait_for_budget``; a team's own)."""
        line = self._lines.get(key)
        if line is None:
            line = self._lines[key] = Line()
        return line

    async def admit(
        self,
        job: ChatJob,
        deadline: float | None,
        check: Check | None = None,
        lost: Decimal | None = None,
        ahead: Ahead | None = None,
        *,
        estimated: Estimate | None = None,
    ) -> Ticket:
        """Reserve the job's budget, then wait until the team's buckets admit it.

        ``ahead``: its reserve and first take, as they ran with the job's claim
        (``Admission.ahead``); admitting the job takes them over from the claim's undo.
        ``estimated``: the job's estimate, made already (``straight``), for a job without
        ``ahead``: not made twice (a PDF's pages are counted in it).

        ``check`` runs while the job waits for a bucket and once it is admitted: what it
        raises ends the wait, and gives back what the job took. ``lost``: the estimates of
        calls lapsed owners of the job made, charged with whatever it costs, or alone when
        it is refused (``charge``); None when it has no lapsed owner.

        Raises BudgetExhausted, RateLimited, or InvalidRequest (larger than a bucket).
        """
        config = self.config(job.team)
        until = time.monotonic() + self._settings.admission_max_wait
        if deadline is not None:
            until = min(until, deadline)
        try:
            needed = (
                ahead.estimate if ahead is not None else estimated or self._estimate(job, config)
            )
            ticket = Ticket(
                self,
                job.team,
                needed,
                until,
                lost=to_nano(lost or Decimal(0)),
                inherits=lost is not None,
            )
            ticket.deadline = deadline
            ticket.priced = ahead.config if ahead is not None else config
            ticket.served = partial(self._served, job, check)
            # Checked while the job waits, and once admitted: its batch, and its team's
            # config as the registry's notification brings it (never a round trip per tick).
            ticket.check = partial(self._recheck, job, config, ticket, check)
            tokens = ticket.estimate.tokens
            # Made with the claim already, unless its ledger was lost: then it is made here, as
            # any other, its rebuild under the outage policy (PostgreSQL may be away too).
            # Held back by other jobs' reservations, it waits for them here, as any other.
            with_claim = bool(
                ahead
                and ahead.replies
                and not lost_ledger(ahead.replies[0])
                and not held_back(ahead.replies[0])
            )
            if ahead is not None and with_claim:
                # Its buckets as they were taken (the team's limits may have changed since).
                limits = ahead.limits
                ticket.budget = await self._budgets.reserved(ahead.reserving, ahead.replies[0])
                # Reserved under the config of its claim's time: a change that came during
                # the claim's round trip is its checks' to apply, as for a job held since
                # (``_rebudget``), or it is called past a budget cut before its admission.
                ticket.config = ahead.config
                tried = ahead.team_take()
            else:
                # The first try at the team's buckets rides with the budget's reservation, in
                # one round trip.
                limits = self._team_limits(job, config)
                first = self._first_take(limits, tokens, job.team)
                ticket.budget, tried = await self._reserve(job, config, ticket, None, first)
        except Exception:
            # Refused before it reserved (too large, over budget): its lapsed owners' calls
            # are charged all the same.
            await self.charge(job.team, job.model, job.job_id, lost)
            raise
        try:
            if tried is not None and taken(limits, tokens, tried).taken:
                ticket.team_limits = limits  # what it holds: settled however the job ends
            if ahead is not None and with_claim:
                ticket.deployment_ahead = ahead.deployment_taken()
            if with_claim and ticket.budget is not None and lost:
                # Reserved with the claim, before the claim said its lapsed owners made calls:
                # again, with them (as a redelivery's reserve is made), so a job called again
                # is let through only if the budget holds its lost calls too.
                ticket.budget, _ = await self._reserve(job, config, ticket, ticket.budget)
            if not ticket.team_limits:
                now = partial(self._limits_now, job, config)
                _, ticket.team_limits = await ticket.take(
                    limits, tried=tried is not None, follow=now
                )
            # Again once admitted: the job may have waited long after its batch was canceled
            # or its team changed. Its request, tokens and budget go back in one round trip.
            # Again if its team's config changed during the check: a ``hold_in_flight`` since
            # did not see the job.
            try:
                while True:
                    seen = self._configs.get(job.team)
                    await ticket.check()
                    if self._configs.get(job.team) is seen:
                        break
            except BaseException:
                await self.settle(ticket.settlement(None, give_back=True))
                raise
            self._in_flight[ticket] = job
        except BaseException:
            await ticket.settle(None)
            raise
        return ticket

    async def _recheck(
        self, job: ChatJob, admitted: TeamConfig, ticket: Ticket, check: Check | None
    ) -> None:
        """A held job's checks: its own (``check``), then its team's config from this
        process's registry. A team no longer served sends it back to its queue (TeamStopped);
        a change of its budgets reserves it again under the new ones, refuses it
        (BudgetExhausted) as any job over budget is, or sends it back to its queue while
        other jobs' reservations hold them (BudgetCut)."""
        await self._served(job, check)
        await self._rebudget(job, admitted, ticket)
        # Last, after the reserve's round trip: the last look of an admission (``admit``), so
        # no job is admitted once a drain began (``stop``), however long it waited.
        self._serving(job)

    async def _rebudget(self, job: ChatJob, admitted: TeamConfig, ticket: Ticket) -> None:
        """Reserve a held job again when its team's budgets changed (see ``_recheck``)."""
        config = self._configs.get(job.team)
        held = ticket.config or admitted
        if config is None or config is held:
            return  # not in the registry (a fixed team not enabled): served as admitted
        ticket.config = config
        before, after = budget_scopes(held, job.model), budget_scopes(config, job.model)
        if before == after:
            return
        budget = ticket.budget
        if budget is not None and [m for m, _ in before] != [m for m, _ in after]:
            # Other ledgers: what it holds in the old ones goes back before it reserves anew.
            await self.settle(self.settlement([], budget, 0))
            ticket.budget = budget = None
        # The reserve replaces the job's entry in a ledger it holds one in (spend.lua), so it
        # tries even behind jobs waiting for the budget (they may wait for this very entry).
        try:
            ticket.budget, _ = await self._reserve_once(job, config, ticket, budget)
        except BudgetHeld as exc:
            # Waiting here, it would keep its place in its rate's line, which the jobs whose
            # reservations hold the budget may be waiting behind; in its queue it holds
            # nothing, and comes back to wait for the budget first, as any job does.
            await self.settle(self.settlement([], budget, 0))
            ticket.budget = None
            raise BudgetCut(
                f"team {job.team}'s budgets changed while the job waited for its rate limit, "
                "and its jobs in flight hold them; it goes back to its queue"
            ) from exc

    async def _served(self, job: ChatJob, check: Check | None) -> None:
        """A held job's checks but its budget's: its own (``check``), then whether its team is
        still served (``_serving``)."""
        if check is not None:
            await check()
        self._serving(job)

    def _serving(self, job: ChatJob) -> None:
        """TeamStopped when the worker no longer serves the job's team: disabled, or the
        worker drains."""
        if self._stop.is_set():
            raise TeamStopped(
                "the worker began to drain while the job waited for admission; it goes back "
                "to its queue"
            )
        if job.team in self._stopped:
            raise TeamStopped(
                f"team {job.team} was disabled while the job waited for its rate limit or "
                "budget; it goes back to its queue"
            )

    async def _reserve(
        self,
        job: ChatJob,
        config: TeamConfig,
        ticket: Ticket,
        held: Reservation | None,
        then: Call | None = None,
    ) -> tuple[Reservation | None, list[int] | None]:
        """Reserve what ``ticket`` may cost against ``config``'s budgets (replacing the job's
        entry), with ``then`` in the same round trip; under the outage policy, ``held`` (what
        the job holds already) when Redis is away and the job goes on. While the other jobs'
        open reservations hold the budget it waits (``_wait_for_budget``), and ``then`` does
        not run.

        A job that may inherit its lapsed owners' entry tries first even behind waiters: its
        reserve replaces that entry (spend.lua leaves it out), so the waiters may be waiting
        for it, and behind them it would wait for itself. Held all the same, it settles that
        entry to the calls its lapsed owners made before it waits: a waiting job holds no
        reservation, so no waiter's turn waits for a job waiting behind it."""
        ledgers = self._budgets.ledgers(job.team, job.model, config)
        # Once tried, its entry is its own: its reservation, or spend.
        inherits, ticket.inherits = ticket.inherits, False
        if inherits or not self._budget_waited(ledgers):
            try:
                return await self._reserve_once(job, config, ticket, held, then)
            except BudgetHeld:
                if inherits:
                    await self._charge(job.team, job.model, config, ticket.lost_nano, job.job_id)
        line = self._line_at(ledgers)
        return await self._wait_for_budget(job, config, ticket, held, line), None

    async def _wait_for_budget(
        self,
        job: ChatJob,
        admitted: TeamConfig,
        ticket: Ticket,
        held: Reservation | None,
        line: Line,
    ) -> Reservation | None:
        """Wait in ``line`` (the job's ledgers') for the reservations holding the job's budget
        to settle or lapse, then reserve it under its team's config as it is then: refused
        (BudgetExhausted) if the settled spend cannot take it, DeadlineExceeded or RateLimited
        once its deadline or the maximum wait comes first. Meanwhile the job holds nothing it
        did not hold already, nor a connection: only the first in line asks Redis."""
        what = "its budget is held by the reservations of its team's jobs in flight"
        since = time.monotonic()
        await ticket.join(line, partial(ticket.late, what), ticket.served)
        try:
            delay, checked = BUDGET_POLL, time.monotonic()
            while True:
                config = self._configs.get(job.team) or admitted
                ledgers = self._budgets.ledgers(job.team, job.model, config)
                # Cleared before the reserve, so a settle while it runs is not missed.
                for ledger in ledgers:
                    self._settle_event(ledger).clear()
                try:
                    reserved, _ = await self._reserve_once(job, config, ticket, held)
                except BudgetHeld as exc:
                    cause = exc
                else:
                    ticket.config = config  # what its recheck compares with from now on
                    return reserved
                left = ticket.until - time.monotonic()
                if left <= 0:
                    raise ticket.late(str(cause)) from cause
                sweep = self._sweep_in(cause, since)
                if sweep <= 0 and await self._drop_dead(cause):
                    continue
                # Not asyncio.wait_for: on Python 3.11 it drops a cancel (the worker's stop)
                # that comes as the settle does, and the job would wait on for its budget.
                await self.pause(
                    min(delay, left, sweep if sweep > 0 else self._settings.claim_lease / 2),
                    self._settle_event(cause.ledger),
                )
                delay = min(delay * 2, RETRY_SECONDS)
                if time.monotonic() - checked >= CHECK_SECONDS or self.stopping:
                    # Its own checks only: its budget's would reserve it again, in this line.
                    await ticket.served()
                    checked = time.monotonic()
        finally:
            line.release()

    def _sweep_in(self, held: BudgetHeld, since: float) -> float:
        """Seconds until the reservations that ``held`` a job waiting ``since`` then are to be
        looked at for dead ones (``_drop_dead``): once it waited a claim lease (a dead
        worker's claims lapse within one), then every half lease per ledger and process."""
        lease = self._settings.claim_lease
        last = self._swept.get(held.ledger)
        due = since + lease if last is None else max(since + lease, last + lease / 2)
        return due - time.monotonic()

    async def _drop_dead(self, held: BudgetHeld) -> bool:
        """End the reservations that ``held`` a job whose workers died: whether any ended."""
        self._swept[held.ledger] = time.monotonic()
        try:
            return await self._budgets.drop_dead(held) > 0
        except RedisError as exc:
            # They lapse in time anyway; the next look comes half a lease later.
            log.warning("cannot look for dead jobs' budget reservations (%s)", exc)
            return False

    def _settle_event(self, ledger: str) -> asyncio.Event:
        event = self._settles.get(ledger)
        if event is None:
            event = self._settles[ledger] = asyncio.Event()
        return event

    async def _reserve_once(
        self,
        job: ChatJob,
        config: TeamConfig,
        ticket: Ticket,
        held: Reservation | None,
        then: Call | None = None,
    ) -> tuple[Reservation | None, list[int] | None]:
        """One reserve of ``_reserve``'s, under the outage policy; BudgetHeld when the job is
        to wait."""
        # One name for every try, so a try after an error does not take again what the one
        # before took (its reply lost with its connection).
        name = once()
        return await self._guard(
            lambda: self._budgets.reserve(
                job.team,
                job.model,
                config,
                ticket.reserving,
                job.job_id,
                then=then,
                name=name,
                deadline=job.ends_by,
                room=ticket.room,
            ),
            lambda: (held, None),
            ticket.until,
        )

    def _limits_now(self, job: ChatJob, admitted: TeamConfig) -> list[Limit]:
        """The job's team buckets under its team's limits as this process's registry has them
        now (as admitted when the registry does not list the team; see ``_recheck``)."""
        return self._team_limits(job, self._configs.get(job.team) or admitted)

    def ahead(self, job: ChatJob) -> Ahead | None:
        """The job's budget reserve and first take of its team's buckets as script calls, to
        ride with its claim (``Claims.take``), which runs them only when this delivery wins
        it; None when the team has no budget, or the job's estimate is refused (as ``admit``
        then refuses it, in its turn)."""
        config = self.config(job.team)
        if not budget_scopes(config, job.model):
            return None  # nothing to reserve: not worth the estimate
        try:
            needed = self._estimate(job, config)
        except JobError:
            return None
        reserving = self._budgets.reserving(
            job.team,
            job.model,
            config,
            needed.cost_nano,
            job.job_id,
            deadline=job.ends_by,
            room=needed.room_nano,
        )
        if reserving is None or self._budget_waited(tuple(reserving.held.keys[::2])):
            return None  # jobs wait for its budget already: it goes behind them (admit)
        limits = self._team_limits(job, config)
        first = self._first_take(limits, needed.tokens, job.team)
        calls = [reserving.call] + ([first] if first is not None else [])
        return Ahead(self, calls, reserving, needed, limits, config=config)

    def _estimate(self, job: ChatJob, config: TeamConfig) -> Estimate:
        """What ``job`` of a team with ``config`` is reserved at, and its room (``estimate``)."""
        settings = self._settings
        return estimate(
            job,
            self._catalog,
            config,
            settings.expected_output_tokens,
            settings.unbounded_output_tokens,
        )

    def undo(self, ahead: Ahead, lost: Decimal) -> Settlement | None:
        """``Ahead.undo``: what ``admit`` settles for a job its check ends once admitted, as
        the ticket ``admit`` would have made of ``ahead``."""
        replies = ahead.replies
        if not replies or replies[0][0] != 0:
            return None  # not run, or refused: nothing held
        team = ahead.reserving.held.team
        # Never admitted, so it never waits: no time to wait until.
        ticket = Ticket(self, team, ahead.estimate, until=0.0, lost=to_nano(lost))
        ticket.budget = self._budgets.made(ahead.reserving, replies[0])
        tried = ahead.team_take()
        if tried is not None and tried[0] == 1:
            ticket.team_limits = ahead.limits
        ticket.deployment_ahead = ahead.deployment_taken()
        return ticket.settlement(None, give_back=True)

    def _first_take(self, limits: list[Limit], tokens: int, team: str) -> Call | None:
        """A job's first try at its team's buckets, to ride with its budget's reservation,
        unless jobs already wait in line for them (see Ticket.take)."""
        return (
            take_call(limits, tokens) if limits and not self.line(limits, team).locked() else None
        )

    async def take(
        self,
        limits: list[Limit],
        tokens: int,
        within_ms: int,
        until: float,
        *,
        then: Call | None = None,
        team: str = "",
    ) -> Take:
        """Take a request and ``tokens`` from every bucket of ``limits`` if they have them
        within ``within_ms``, under the outage policy (this process's share of the limits
        while Redis is away, when failing open); ``then`` runs in the same round trip once
        taken (``Buckets.take``). ``team``: whose turn it must be in their line, when the
        buckets are a deployment's (``take_call``), which it waits in until ``until``."""
        name = once()  # the same for every try (see admit)
        patience = max(0, math.floor((until - time.monotonic()) * 1000))
        return await self._guard(
            lambda: self._buckets.take(
                limits, tokens, within_ms, name=name, then=then, team=team, patience_ms=patience
            ),
            lambda: self._local.take(limits, tokens, within_ms),
            until,
        )

    async def charge(
        self, team: str, model: str, job_id: str, lost: Decimal | None, *, running: bool = False
    ) -> None:
        """Charge ``lost`` to the budget entry of ``team``'s job ``job_id`` asking for
        ``model`` (what its lapsed owners reserved; 0 removes it), for a job refused before
        its own reservation, or swept: the ledger holds what its usage row does (as for one
        held back before it waits: ``_reserve``). None: no lapsed owner, so no entry to
        replace. ``running``: its lost calls may still be running (a swept job's owner may
        only have stalled), and the entry keeps their excess (``Budgets.settle_call``)."""
        if lost is not None:
            await self._charge(
                team, model, self.config(team), to_nano(lost), job_id, running=running
            )

    async def _charge(
        self,
        team: str,
        model: str,
        config: TeamConfig,
        nano: int,
        job_id: str,
        *,
        running: bool = False,
    ) -> None:
        call = self._budgets.charge_call(team, model, config, nano, job_id, running=running)
        if call is not None:
            await self.settle(Settlement([call], lambda _: None))

    async def give_back(self, limits: list[Limit], tokens: int) -> None:
        """Return the request and ``tokens`` a job took from ``limits`` for a call it will
        not make."""
        call = _give_back_call(limits, tokens)
        if call is not None:
            await self.settle(self.settlement([call], None, 0))

    async def drain(self, limit: Limit) -> None:
        await self._best_effort(partial(self._buckets.drain, [limit]))

    def settlement(
        self, buckets: list[Call], budget: Reservation | None, actual_nano: int
    ) -> Settlement | None:
        """A job's settles (``buckets``' calls, then its budget's), for one round trip; None
        when there is nothing to settle."""
        spend = self._budgets.settle_call(budget, actual_nano) if budget is not None else None
        calls = buckets if spend is None else [*buckets, spend]
        if not calls:
            return None

        def done(replies: Sequence[Any]) -> None:
            for key in refunded(buckets):
                waiting = self._refunds.pop(key, None)
                if waiting is not None:
                    waiting.set()  # a reservation waiting for the bucket may go now
            if budget is not None and spend is not None and len(replies) == len(calls):
                self._budgets.settled(budget, replies[-1])
                for ledger in budget.keys[::2]:
                    event = self._settles.get(ledger)
                    if event is not None:
                        event.set()  # a job waiting for the ledger may fit now

        return Settlement(calls, done)

    def landed(self, ticket: Ticket) -> ChatJob | None:
        """``ticket``'s job is settled: ``hold_in_flight`` leaves it. The job, if it was
        admitted."""
        return self._in_flight.pop(ticket, None)

    def remember(self, job: ChatJob, nano: int) -> None:
        """``job`` settled for ``nano`` (> 0) reserving nothing: kept for a ledger its team
        may gain (``Budgets.remember``)."""
        self._budgets.remember(job.team, current_month(), job.model, job.job_id, nano)

    async def settle(self, settlement: Settlement | None) -> None:
        """Run a job's settles in one round trip of their own."""
        if settlement is None:
            return

        # A settle lost to a Redis error is not retried: the job's entry lapses, and
        # accounting's reconciliation brings the job's real cost in from its usage row.
        async def run() -> None:
            settlement.done(await self._scripts.run_all(settlement.calls))

        await self._best_effort(run)

    def _team_limits(self, job: ChatJob, config: TeamConfig) -> list[Limit]:
        limits = []
        if config.rpm or config.tpm:
            key = self._keys.team_bucket(job.team)
            limits.append(_team_limit(job.team, key, f"team {job.team}", config))
        model = config.models.get(job.model)
        if model is not None and (model.rpm or model.tpm):
            key = self._keys.team_bucket(job.team, job.model)
            scope = f"team {job.team} on {job.model}"
            limits.append(_team_limit(job.team, key, scope, model))
        return limits

    async def _guard(
        self, call: Callable[[], Awaitable[T]], fail_open: Callable[[], T], until: float
    ) -> T:
        """``call`` under the outage policy: retried until ``until``, or ``fail_open()``.

        A budget ledger Redis lost is rebuilt from PostgreSQL: while that is unreachable too,
        the job is held and retried until ``until`` whatever the policy (a job given back to
        its queue would come straight back, over and over).
        """
        while True:
            try:
                result = await call()
            except ServiceUnavailable as exc:
                self._postgres.failed(exc)
                await _pause(
                    until,
                    exc,
                    "the team's budget ledger could not be rebuilt: PostgreSQL was unreachable",
                )
                continue
            except RedisError as exc:
                self.outage.failed(exc)
                if self.policy == "fail_open":
                    return fail_open()
                await _pause(until, exc, "Redis, which holds the limits, was unreachable")
                continue
            self.outage.recovered()
            self._postgres.recovered()
            return result

    async def _best_effort(self, call: Callable[[], Awaitable[None]]) -> None:
        """A settle or drain lost to an outage leaves a bucket one estimate error off, or full."""
        try:
            await call()
        except RedisError as exc:
            self.outage.failed(exc)
        else:
            self.outage.recovered()


def _late(deadline: float | None, until: float, what: str) -> JobError:
    """The refusal of a job that waited for ``what`` until ``until``: its deadline passed (as
    a job whose deadline passes in its queue), or the maximum wait."""
    if deadline is not None and deadline <= until:
        return DeadlineExceeded(f"the job's deadline passed while it waited: {what}")
    return RateLimited(
        f"the job waited the maximum wait: {what}", retry_after_ms=RETRY_SECONDS * 1000
    )


async def _pause(until: float, cause: Exception | None, what: str) -> None:
    """Wait before the next try, or raise RateLimited when ``until`` has come."""
    left = until - time.monotonic()
    if left <= 0:
        raise RateLimited(
            f"{what} until the job's deadline or the maximum wait",
            retry_after_ms=RETRY_SECONDS * 1000,
        ) from cause
    await asyncio.sleep(min(RETRY_SECONDS, left))


class Ticket:
    """A job's admission: what it reserved, where; the router's gate before each attempt."""

    def __init__(
        self,
        admission: Admission,
        team: str,
        estimate: Estimate,
        until: float,
        *,
        lost: int = 0,
        inherits: bool = False,
    ) -> None:
        self._admission = admission
        self.lost_nano = lost
        """Nano-USD of the calls lapsed owners of the job made: settled with its own cost."""
        self.inherits = inherits
        """Whether the job's ledgers may hold its lapsed owners' reservation (taken over
        from them), which its reserve replaces (``Admission._reserve``)."""
        self.check: Check = _nothing
        """Run every ``CHECK_SECONDS`` while the job waits, and once it is admitted."""
        self.served: Check = _nothing
        """The job's checks but its budget's, run while it waits for its budget (whose own
        check would reserve it again)."""
        self.deadline: float | None = None
        """The job's deadline (``time.monotonic``), when it has one."""
        self.config: TeamConfig | None = None
        """The team's config as last checked, once it changed since the job's admission, or
        the one its reserve with its claim was made under (``Ahead.config``)."""
        self.priced: TeamConfig | None = None
        """The team's config the job's estimate was made under: a fallback it left out of it
        for its cap (``capped_fallback``) is never tried by the job, its cost reserved by
        nothing, whatever the config says since."""
        self._team = team
        self.estimate = estimate
        self.until = until
        self.budget: Reservation | None = None
        self.team_limits: list[Limit] = []
        """The team's buckets the job holds a request and tokens of (none until a take of
        them admitted it): its settle gives back to these alone."""
        self._deployments: list[tuple[str, Limit]] = []
        """The deployments whose buckets this job took from, by name."""
        self.deployment_ahead: Limit | None = None
        """The deployment's buckets the job took with its claim (``Ahead``), until its first
        call enters them (``enter``): given back, request and tokens, if it never does."""
        self._settled = False
        self._spent: int | None = None
        """Nano-USD its budget entry was settled to, once settled."""
        self._left = False
        """Whether its budget entry is another delivery's to settle (``leave_budget``)."""
        self._answered: int | None = None
        """Nano-USD the job's usage row holds, once a duplicate found it answered
        (``answered``): what its entry settles to, in place of what this delivery spent."""
        self._waited: float | None = None
        """Seconds spent waiting for buckets; None while it met none (no limits)."""

    def late(self, what: str) -> JobError:
        """The refusal of a job that waited for ``what`` until its ``until`` (``_late``)."""
        return _late(self.deadline, self.until, what)

    @property
    def reserving(self) -> int:
        """Nano-USD its budget entry holds while it runs: its estimate, and the calls its
        lapsed owners made (billed with it: the entry is one per job, replaced by each
        delivery's reserve, so without them a redelivery would free what they cost)."""
        return self.estimate.cost_nano + self.lost_nano

    @property
    def room(self) -> int:
        """Nano-USD it may cost at most (``Estimate.room_nano``), the same lost calls with it:
        more than ``reserving`` only for a job without an output limit."""
        return self.estimate.room_nano + self.lost_nano

    def lost(self, usd: Decimal) -> None:
        """Also settle ``usd`` of calls lapsed owners of the job made, found once admitted
        (its claim taken only then: ``Claim.take_up``)."""
        self.lost_nano += to_nano(usd)

    async def claimed(self, take_up: Callable[[], Awaitable[bool]]) -> None:
        """Run ``take_up`` (a missed claim's ``Claim.take_up_before_call``) until it claims
        the job: with ``fail_closed`` no job is called unclaimed, so one whose team and
        deployment have no limits (nothing of its admission needed Redis) waits for Redis
        too, until its deadline or the maximum wait; with ``fail_open`` it is served
        unclaimed after one try."""
        while not await take_up():
            if self._admission.policy == "fail_open":
                return
            await _pause(self.until, None, "Redis, which holds the job's claim, was unreachable")

    def leave_budget(self) -> None:
        """Leave the job's budget entry unsettled: a duplicate's (``Claim.take_up`` found the
        job held by another delivery). One entry per job id, which its reservation replaced
        with the same estimate: the delivery holding the job settles it (given back here, the
        holder's reservation would stop counting while it calls)."""
        self.budget = None
        self._left = True

    @property
    def budgeting(self) -> bool:
        """Whether the job's budget entry is this delivery's to reserve and settle: not a
        duplicate's (``leave_budget``, ``answered``)."""
        return not self._left and self._answered is None

    def rebudgeted(self, reservation: Reservation) -> Settlement | None:
        """Take ``reservation``, made for the job once admitted (``hold_in_flight``): None,
        or, when the job was settled or found a duplicate meanwhile, the settle of it to
        what the job's entry holds (a duplicate's entry is the holder's, with the same
        estimate: left as it is)."""
        if not self.budgeting:
            return None
        if self._spent is not None:
            return self._admission.settlement([], reservation, self._spent)
        self.budget = reservation
        return None

    def answered(self, usd: Decimal | None) -> bool:
        """Settle the job's budget entry to ``usd``, what its usage row holds it cost, with its
        other settles: a duplicate's (``Claim.take_up`` found the job answered). One entry
        per job id, which its reservation replaced (the answer's own settle, or the
        reservation of the delivery that answered it, whose settle may have been lost): left
        as it is, it would hold the estimate against the budget until accounting's
        reconciliation. Whether it will be settled: not when ``usd`` is unknown (then left
        as ``leave_budget`` leaves it), or the job reserved nothing."""
        if usd is None or self.budget is None:
            self.budget = None
            self._left = True
            return False
        self._answered = to_nano(usd)
        return True

    async def enter(self, deployment: Deployment, then: Call | None = None) -> bool:
        """Wait for the deployment's own buckets (the provider account's RPM/TPM); whether
        ``then`` ran, in the round trip of the take that let the call go (it does not when
        the deployment has no buckets, or the call waited for them)."""
        limit = self._admission.deployment_limit(deployment)
        ahead, self.deployment_ahead = self.deployment_ahead, None
        if ahead is not None:
            if ahead is limit:
                # Taken with the claim: ``then`` ran there too, or not at all.
                self._waited = self._waited or 0.0
                self._deployments.append((deployment.name, limit))
                return False
            # The router went elsewhere (its health changed since the claim).
            await self._admission.give_back([ahead], self.estimate.tokens)
        if limit is None:
            return False
        ran, _ = await self.take([limit], then=then)
        self._deployments.append((deployment.name, limit))
        return ran

    async def rate_limited(self, deployment: Deployment) -> None:
        """The deployment answered 429: its provider admits fewer calls at once than the
        bucket let through (a burst set too high, or another client of the same account), so
        the bucket is emptied and the next calls, retries included, go at the rate alone."""
        limit = self._admission.deployment_limit(deployment)
        if limit is not None and limit.rpm is not None:
            await self._admission.drain(limit)

    async def take(
        self,
        limits: list[Limit],
        *,
        tried: bool = False,
        then: Call | None = None,
        follow: Callable[[], list[Limit]] | None = None,
    ) -> tuple[bool, list[Limit]]:
        """Wait for ``limits``' buckets to admit the job; ``tried``: they refused it just now,
        so it goes straight to the line. Whether ``then`` ran with a take that admitted it at
        once (never when it waited), and the buckets it took from.

        ``follow``: the team's buckets as its limits are now (``teams set`` may change them
        while the job waits): a job that waits takes under them when its turn comes, and
        again when they change while it waits for its reservation's turn, giving that back.
        Raising, it holds nothing of them."""
        if not limits:
            return False, limits
        waited = self._waited = self._waited or 0.0
        line = self._admission.line(limits, self._team)
        if not tried and not line.locked():
            take = await self._take(limits, within_ms=0, then=then)
            if take.taken:
                return take.then_ran, limits
        started = time.monotonic()
        try:
            took = await self._wait_in_line(limits, line, follow)
        finally:
            self._waited = waited + time.monotonic() - started
        return False, took

    async def _wait_in_line(
        self, limits: list[Limit], line: Line, follow: Callable[[], list[Limit]] | None
    ) -> list[Limit]:
        # Jobs that must wait queue in this process, each team's first come, first served,
        # and only the first asks Redis. For its team's own buckets it reserves the next
        # request they will have (taken into debt) and holds the line until its turn: one
        # script call per job rather than one per waiter at every refill, and at most one
        # reservation per process and bucket, all a worker that dies while waiting can waste.
        # For a deployment's, shared by teams, it waits its team's turn in their line across
        # processes (``lua/take.lua``), asking again when the buckets will have its request:
        # a reservation would put it ahead of the teams coming after it.
        scopes = ", ".join(limit.scope for limit in limits)

        def late(wait_ms: int) -> RateLimited:
            return RateLimited(
                f"{scopes}: over its rate limit; admitting the job needed "
                f"{wait_ms / 1000:.1f} s more than its deadline or the maximum wait allow",
                retry_after_ms=wait_ms,
            )

        await self.join(
            line,
            lambda: RateLimited(
                f"{scopes}: over its rate limit; the jobs ahead of this one took until its "
                "deadline or the maximum wait"
            ),
            self.check,
        )
        try:
            if lined(limits):
                # Asking before the buckets have what the job ahead took again, it would
                # only be told to wait.
                until = min(line.ready, self.until) - time.monotonic()
                await self._sleep(until, limits, follow, retake=True)
            while True:
                if follow is not None:
                    limits = follow()
                within = max(0, math.floor((self.until - time.monotonic()) * 1000))
                if lined(limits):
                    take = await self._take(limits, within_ms=0)
                    if take.taken:
                        line.ready = time.monotonic() + take.again_ms / 1000
                        return limits
                    if take.wait_ms > within:
                        raise late(take.wait_ms)
                    await self._sleep(take.wait_ms / 1000, limits, follow, retake=True)
                    continue
                take = await self._take(limits, within_ms=within)
                if not take.taken:
                    raise late(take.wait_ms)
                try:
                    if await self._sleep(take.wait_ms / 1000, limits, follow, take.marks):
                        return limits
                except BaseException:
                    # Its reservation is for a call it will not make: the jobs behind have it.
                    await self._admission.give_back(limits, self.estimate.tokens)
                    raise
                # Its team's limits changed meanwhile: its reservation, made under the old
                # ones, goes back, and it takes again under the new.
                await self._admission.give_back(limits, self.estimate.tokens)
        finally:
            line.release()

    async def join(self, line: Line, late: Callable[[], JobError], check: Check) -> None:
        """Wait for ``line`` until the job's deadline or the maximum wait (then raise what
        ``late`` makes), running ``check`` meanwhile: a job that must not be served leaves
        its place, and whoever is behind it moves up, rather than holding the line until its
        turn."""
        acquiring = asyncio.ensure_future(line.acquire())
        stopped = asyncio.ensure_future(self._admission.until_stopped())
        try:
            while True:
                left = self.until - time.monotonic()
                every = min(left, CHECK_SECONDS)
                done, _ = await asyncio.wait(
                    {acquiring, stopped},
                    timeout=max(0.0, every),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if acquiring in done:
                    return
                # First: woken by a drain, the job goes back whatever time it has left.
                await check()
                if left <= every:
                    raise late()
        except BaseException:
            if not acquiring.cancel():  # it got the line meanwhile
                line.release()
            raise
        finally:
            stopped.cancel()

    async def _sleep(
        self,
        seconds: float,
        limits: list[Limit],
        follow: Callable[[], list[Limit]] | None,
        marks: Sequence[int] = (),
        *,
        retake: bool = False,
    ) -> bool:
        """Wait for a reservation's turn, running the job's check meanwhile; False when
        ``follow`` no longer gives the ``limits`` it was made under (cut short).

        ``retake``: a wait to take a deployment's buckets again (in its team's turn, never
        into debt), cut short when a settle of this process's gives tokens back to them.

        With its take's ``marks`` (it waits for tokens), the turn comes sooner when jobs
        that used fewer tokens than they took give them back: it asks Redis how long it has
        still to wait (``Admission.due``) at once when a settle of this process's gives
        tokens back to its buckets, and every ``CHECK_SECONDS`` for other processes'. That
        look (TIME and one HMGET a bucket, replies not kept) costs a round trip a second per
        reservation waiting, at most one per line of a process, as the bucket fills' own
        refresh does per limited team; nothing while none waits. Told by pub/sub instead,
        each refund into a bucket in debt would cost a PUBLISH and every worker a
        subscription kept alive across Redis failovers, to save at most that second of a
        wait that was many before."""
        end = time.monotonic() + seconds
        tick = time.monotonic() + CHECK_SECONDS
        refunds = self._admission.refunds(limits) if marks or retake else []
        while (left := end - time.monotonic()) > 0:
            until_tick = max(0.0, tick - time.monotonic())
            ticked = until_tick < left  # else it sleeps to its turn, not to a tick
            await self._admission.pause(min(left, until_tick), *refunds)
            stopping = self._admission.stopping
            refunded = any(event.is_set() for event in refunds)
            ticked = ticked and not refunded and not stopping
            if retake and refunded and not stopping:
                return True
            if marks and (ticked or refunded):
                # Taken before the look, so a refund while it runs wakes the next pause.
                refunds = self._admission.refunds(limits)
                due = await self._admission.due(limits, marks)
                if due is not None:
                    end = min(end, time.monotonic() + due)
            if ticked or stopping:
                await self.check()
                tick = time.monotonic() + CHECK_SECONDS
                if follow is not None and follow() != limits:
                    return False
        return True

    async def _take(self, limits: list[Limit], within_ms: int, then: Call | None = None) -> Take:
        return await self._admission.take(
            limits, self.estimate.tokens, within_ms, self.until, then=then, team=self._team
        )

    async def settle(self, routed: Routed | Billed | None) -> None:
        """Replace every estimate with the real usage (``None``: nothing served, refund all;
        ``Billed``: a stream that broke, charged for what the provider generated).

        Requests stay taken: a failed call still counted at the provider.
        """
        await self._admission.settle(self.settlement(routed))

    def settlement(
        self, routed: Routed | Billed | None, *, give_back: bool = False
    ) -> Settlement | None:
        """What ``settle`` runs, to run in the round trip of another call (the outcome's
        store); None when settled already, or when there is nothing to settle.

        ``give_back``: the job will make no call, so the request it took of its team's
        buckets goes back too (``Admission.give_back``), in the same round trip.
        """
        if self._settled:
            return None
        self._settled = True
        job = self._admission.landed(self)
        if self._waited is not None:
            observe_bucket_wait(self._team, self._waited)
        used = routed.input_tokens + routed.output_tokens if routed is not None else 0
        back = self.estimate.tokens - used
        # Only buckets of tokens have anything to settle; all in one round trip.
        # A give-back's tokens go with its request (no refund to reservations: take.lua).
        calls = [_give_back_call(self.team_limits, back) if give_back else None]
        if self.deployment_ahead is not None:
            # Taken with the claim for a call that never entered it.
            calls.append(_give_back_call([self.deployment_ahead], self.estimate.tokens))
        # The team's buckets and the served deployment's get the same tokens back: one call
        # settles them all (a call each cost a governed job a script call more). The served
        # deployment's only once in it: a call reads each bucket once, so a key twice in one
        # would be given back once (tried twice, its second entry settles apart, as before).
        backs = [] if give_back else [limit for limit in self.team_limits if limit.tpm]
        merged = False
        for name, limit in self._deployments:
            if limit.tpm:
                served = routed is not None and name == routed.deployment
                if served and not merged:
                    backs.append(limit)
                    merged = True
                else:
                    calls.append(settle_call([limit], back if served else self.estimate.tokens))
        calls.append(settle_call(backs, back))
        actual = self.lost_nano + (to_nano(routed.cost_usd) if routed is not None else 0)
        if self._answered is not None:
            actual = self._answered
        self._spent = actual
        if self.budget is None and actual > 0 and job is not None and self.budgeting:
            # Reserved nowhere (its team has no budget): a ledger it gains counts it all the
            # same (``Admission.hold_in_flight``).
            self._admission.remember(job, actual)
        return self._admission.settlement(
            [call for call in calls if call is not None], self.budget, actual
        )


async def _nothing() -> None:
    """The check of a ticket that has none (``Admission.undo``'s)."""


class Ahead:
    """A job's budget reserve and first take of its team's buckets, to run with its claim
    (``Admission.ahead``, ``Claims.take``)."""

    def __init__(
        self,
        admission: Admission,
        calls: list[Call],
        reserving: Reserving,
        estimate: Estimate,
        limits: list[Limit],
        *,
        config: TeamConfig,
    ) -> None:
        self._admission = admission
        self.calls = calls
        """The reserve, then the first take of the team's buckets (if it has any and no job
        of this process waits for them), then that of the deployment's (``deployment``)."""
        self.reserving = reserving
        self.estimate = estimate
        self.limits = limits
        self.config = config
        """The team's config the reserve (and the take) was made under."""
        self.deployment: Limit | None = None
        """The deployment's buckets whose take is the last of ``calls``, if any
        (``Admission.straight``)."""
        self.replies: Sequence[Any] = ()
        """The replies of ``calls``, once they ran with the claim (none: it was not won)."""

    def team_take(self) -> Any | None:
        """The reply of the first take of the team's buckets, if it ran."""
        return self.replies[1] if self.limits and len(self.replies) > 1 else None

    def deployment_taken(self) -> Limit | None:
        """The deployment's buckets, if their take ran and took (the round trip runs each call
        only when the ones before went through)."""
        replies = self.replies
        if self.deployment is None or len(replies) < len(self.calls) or replies[-1][0] != 1:
            return None
        return self.deployment

    def undo(self, lost: Decimal) -> Settlement | None:
        """What gives back what ran with the claim (its reservation, its take), for a job
        that ends before it is admitted: run with the claim's end (``Claim.settle_with``).
        ``lost``: what the calls of its lapsed owners cost, which its ledger entry keeps (as
        ``Admission.charge`` leaves it)."""
        return self._admission.undo(self, lost)


class Settlement(NamedTuple):
    """A job's settles, run in one round trip (alone or with another call), then ``done``
    with their replies."""

    calls: list[Call]
    done: Callable[[Sequence[Any]], None]


def _give_back_call(limits: list[Limit], tokens: int = 0) -> Call | None:
    """The settle of ``Admission.give_back``: a request, and ``tokens``."""
    return settle_call(limits, tokens, requests_back=1)


def _team_limit(team: str, key: str, scope: str, limits: TeamConfig | ModelLimits) -> Limit:
    """A team's bucket holds a few seconds of its rpm (``default_burst``), not a minute."""
    burst = limits.burst
    if limits.rpm is not None and burst is None:
        burst = default_burst(limits.rpm)
    return Limit(key, scope, limits.rpm, limits.tpm, burst, team)


def _limited(config: TeamConfig) -> bool:
    """Whether the team has buckets: its own, or on a model."""
    return bool(config.rpm or config.tpm) or any(
        model.rpm or model.tpm for model in config.models.values()
    )


def prefetch_for(config: TeamConfig, settings: Settings) -> int:
    """Jobs a worker should hold of a team: no more than its share of the rate admits within
    half the maximum wait.

    Every job a worker holds waits for admission from its delivery on, and RabbitMQ's consumer
    timeout (30 min on 3.10) counts from delivery too; a job the bucket cannot reach within
    the maximum wait would be answered ``rate_limited`` although it could have waited in the
    queue. So a slow team gets few slots and the rest of its backlog stays in the broker.
    """
    if config.rpm is None:
        return settings.prefetch
    per_worker = config.rpm / settings.admission_workers / 60
    return max(1, min(settings.prefetch, math.floor(per_worker * settings.admission_max_wait / 2)))
