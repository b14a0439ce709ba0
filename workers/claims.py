"""Per-job claims: one delivery of a job calls a provider; the others answer from its outcome.

A job can be delivered twice at once (the producer's resend after a lost confirm, a broker
restart, a pipeline run again). Before any provider call a delivery claims the job id in
Redis, in the same script call that looks for the job's stored outcome::

    claim = await claims.take(job, redelivered=message.redelivered)
    # Outcome: answered before; IdempotencyConflict, AlreadyAnswered: refused;
    # Busy: another delivery holds it past claim_wait, so this one goes back to its queue
    outcome = ...  # the router called with claim.gate(job, ticket, catalog) as its gate
    outcome = await claim.finish(claim.account(outcome))  # what the job is announced with

- The claim has an owner (the worker and a token of the delivery) and a lease, renewed by
  one task of the worker (``run``) while the job is in flight, however slow its call. When
  the owner dies its lease lapses after ``claim_lease`` seconds and the next delivery takes
  over; a second delivery meanwhile waits for the outcome, polling the claim with backoff.
  (Polling: a blocking wait would hold one of the worker's pooled Redis connections per
  waiting delivery, and a burst of duplicates could starve the jobs they wait for.)
- The claim and the outcome carry the request's fingerprint
  (``queuegate.messages.request_digest``): a different request under a used id is refused
  ``idempotency_conflict``. The HTTP front door binds an Idempotency-Key's job id to its
  request in the same claim before publishing it (``lua/bind.lua``, ``binding``), so it
  refuses a different request itself.
- Each call is recorded in the claim before it leaves; a delivery that takes over a lapsed
  claim accounts the call its owner had in flight (``lost``, priced at its estimate).
- A job with a deadline may expire in its queue after its owner died mid-call: the broker
  dead-letters it, and no delivery comes back to answer it or account the call. Its claim is
  on the namespace's lapsing claims from its first recorded call, with its reply queue (in
  the scripts that record: no round trip of its own), and a worker's sweep (``lapsed``)
  takes it past its deadline and a lease, to be answered and billed as a delivery taking it
  over would (``lua/sweep.lua``). It
  stays there once its outcome is stored, until the usage batch carrying its event is
  confirmed (``accounted``: one command per batch): an owner that died in between, its job
  then expiring, has the stored outcome announced again by a sweep, its result to the reply
  queue stored with it (``Stored``: the claim that kept it is gone) and its usage event.
- Redis remembers outcomes for ``result_ttl``. When it lost its data less than that ago
  (the memory epoch key says when), while that cannot be told (no epoch, PostgreSQL
  unreachable, Redis unreachable), and for every redelivered job, PostgreSQL's usage row is
  checked too: a job accounted there is refused ``already_answered``, not called again. A
  job whose lookup cannot answer waits for it (up to ``lookup_wait``, then goes back to its
  queue uncalled): it is never served on a guess.

Redis being down does not stop jobs: they are served unclaimed, each checked in usage_log,
unless admission holds them until it returns (``fail_closed``): then each is claimed before
it is called (``Claim.take_up_before_call``), and a duplicate that finds it held is a
duplicate again.
A held job is looked up in usage_log at its first miss and once it is claimed, not at each
try meanwhile: 5,000 jobs held through an outage would otherwise ask PostgreSQL 10,000
times a second.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from functools import partial
from typing import Any, NamedTuple, TypeVar, cast

import orjson
import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from queuegate.errors import (
    AlreadyAnswered,
    Billed,
    IdempotencyConflict,
    JobError,
    ServiceUnavailable,
)
from queuegate.keys import Keys
from queuegate.livestats import SPEND_TTL
from queuegate.messages import Attempt, ChatJob, UsageEvent, request_digest, shared_fields
from queuegate.outage import OutageLog
from queuegate.redis_client import lua_source
from queuegate.runtime import until_set
from queuegate.script_calls import ScriptCalls
from queuegate.spend import from_nano, to_nano
from router import Catalog, Deployment, Routed
from router.router import AttemptGate
from workers.admission import Ahead, Settlement, Ticket
from workers.admission.estimate import Estimate
from workers.admission.scripts import Call, Scripts
from workers.outcome import Outcome, as_json, expired_uncalled
from workers.usage_record import UsageRecord

log = logging.getLogger(__name__)

FIRST_POLL = 0.005
LAST_POLL = 0.25
"""Seconds between looks at a claim another delivery holds: doubling from the first."""
FINGERPRINT = 64
"""Characters of a fingerprint (sha256, hex) before a stored outcome's JSON."""
SETTLE = 60.0
"""Seconds a provisional memory epoch lasts (Redis found empty with nothing accounted within
``result_ttl`` before): time for usage events already on their way to be accounted."""


SWEPT = 100
"""Lapsing claims one sweep looks at: the rest wait for the next."""


class ClaimedJob(NamedTuple):
    """What a claim knows of its job: a sweep has no more of it (its message is gone)."""

    team: str
    job_id: str
    model: str
    """The model the job asked for: its budget's scope, and its usage row's."""
    deadline: datetime | None = None
    reply_to: str | None = None
    """Where its result goes (None: nowhere): a sweep that bills it answers it there."""

    @classmethod
    def of(cls, job: ChatJob, reply_to: str | None = None) -> ClaimedJob:
        return cls(job.team, job.job_id, job.model, job.deadline, reply_to)


class Stored(Outcome):
    """A job's outcome as ``Claims.store`` keeps it, with where a sweep answers it."""

    reply_to: str | None = None
    """The reply queue of a job with a deadline, its usage event still to be confirmed when
    stored: should its worker die before publishing its result or before that event is
    confirmed, and the job expire in its queue, a sweep publishes the result there
    (``Claims.lapsed``), for the claim that kept it (``lua/hold.lua``) ends with the store."""


class Unaccounted(NamedTuple):
    """A job answered whose result and usage event may have died with its worker before
    they were confirmed, the job expiring in its queue since: its stored outcome is
    announced again."""

    key: str
    """Its claim's key: its entry on the lapsing claims, removed once that event is
    confirmed (``Claims.accounted``)."""
    outcome: Stored


class Lapsed(NamedTuple):
    """What a sweep found due on the lapsing claims (``Claims.lapsed``)."""

    claims: list[Claim]
    """Held here, their jobs to be answered and their dead owners' calls billed."""
    answered: list[Unaccounted]


class Busy(Exception):
    """Another delivery holds the job beyond the wait: this one goes back to its queue."""


class Duplicate(Exception):
    """A job that missed its claim found, taking it up (``Claim.take_up``), that another
    delivery answered it (``found``: its stored outcome), or why it is refused (a different
    request's id, answered before): it ends as a duplicate does, uncalled."""

    def __init__(self, found: Outcome | JobError) -> None:
        super().__init__(str(found))
        self.found = found
        self.charged = False
        """Whether the job's budget entry was settled to ``answered_usd`` (by the admission
        ticket of this delivery, with its other settles)."""

    @property
    def answered_usd(self) -> Decimal | None:
        """What the job id's usage row holds its answer cost, as the outcome found (the
        job's, or a different request's under its id) or usage_log says; None when not
        known (that request not answered yet)."""
        found = self.found
        if isinstance(found, Outcome):
            return found.usage.cost_usd
        if isinstance(found, AlreadyAnswered | IdempotencyConflict):
            return found.answered_usd
        return None


class Poison(Exception):
    """The job failed more deliveries than the delivery limit: it is dead-lettered, uncalled.

    Counted here, not by the broker: a job that only waited in a worker's prefetch when the
    worker died comes back too, and the broker counts that return as a delivery."""

    def __init__(self, message: str, claim: Claim | None = None) -> None:
        super().__init__(message)
        self.claim = claim
        """The job, held, when its dead owners made calls: billed before it is dead-lettered
        (no delivery of it comes back to take them over)."""


class LostCall(Attempt):
    """A call a lapsed owner of the claim had sent: the provider may bill it, though no
    outcome records it. On the usage event it is an attempt with error ``lost``."""

    cost_usd: Decimal = Decimal(0)
    """Its estimate: the job's estimated tokens at the deployment's prices."""
    input_tokens: int = 0
    output_tokens: int = 0
    cache_write_tokens: int = 0
    """Those tokens (``Estimate.usage``), billed on the job's row with its cost; 0 in a record
    made before they were kept (billed at its cost alone, as then)."""
    claim: str | None = None
    """The claim whose delivery made it (its owner), recorded with it: an owner that lives
    after all finds its calls billed by the taker's outcome (``UsageEvent.covers``)."""

    def attempt(self) -> Attempt:
        return Attempt(
            model=self.model, deployment=self.deployment, provider=self.provider, error="lost"
        )


class Claims:
    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keys,
        usage: UsageRecord,
        *,
        worker: str,
        lease: float,
        wait: float,
        ttl: int,
        lookup_wait: float,
        delivery_limit: int,
        fail_open: bool = False,
        remembered: Callable[[str, str], int | None] = lambda _team, _job: None,
    ) -> None:
        self._client = client
        self._remembered = remembered
        """What a job of a team cost when this worker settled it within the hour, else None
        (``Admission.remembered``): answered, though neither Redis nor PostgreSQL may say so."""
        self.fail_open = fail_open
        """The ``redis_outage`` policy serves a job that missed its claim unclaimed after one
        more try before its call (``fail_open``), or holds it until claimed."""
        self._limit = delivery_limit
        self._keys = keys
        self._usage = usage
        self._worker = worker
        self._lease_ms = int(lease * 1000)
        self._wait = wait
        self._ttl = ttl
        self._lookup_wait = lookup_wait
        turns = ScriptCalls.of(client)
        self._claim = turns.register(lua_source("workers", "claim"))
        self._sweep: AsyncScript = client.register_script(lua_source("workers", "sweep"))
        self._epoch_keys = [keys.memory_epoch, keys.replication]
        self._hold = turns.register(lua_source("workers", "hold"))
        self._finish = turns.register(lua_source("workers", "finish"))
        self._scripts = Scripts(client, keys)
        """For the claim's calls that ride with admission's (``lua/batch.lua``)."""
        self._settle: AsyncScript = client.register_script(lua_source("workers", "settle_epoch"))
        self._epoch_lock = asyncio.Lock()
        self._held: dict[str, str] = {}
        """Claim key → owner, of every job in flight here: renewed together by ``run``."""
        self._outage = OutageLog(
            log, "Redis", "jobs wait to be claimed (or with fail_open are served unclaimed)"
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Renew the leases of the jobs in flight every third of a lease, until ``stop``."""
        every = self._lease_ms / 3000
        while not stop.is_set():
            await until_set(every, stop)
            held = list(self._held.items())
            if not held or stop.is_set():
                continue
            try:
                async with self._client.pipeline(transaction=False) as pipe:
                    for key, owner in held:
                        await self._hold(keys=[key], args=[owner, self._lease_ms, ""], client=pipe)
                    owned = await pipe.execute()
            except RedisError as exc:
                self._outage.failed(exc)
                continue
            for (key, owner), still in zip(held, owned, strict=True):
                if not still and self._held.get(key) == owner:
                    log.warning("claim %s was taken over: its lease lapsed while held", key)
                    del self._held[key]

    def new_owner(self) -> str:
        """A claim's owner: this worker and 48 random bits, as a uuid4's first 12 hex digits
        were, without building a UUID (1.2-1.7 µs against 4.4-6.0)."""
        return f"{self._worker}/{secrets.token_hex(6)}"

    async def take(
        self,
        job: ChatJob,
        *,
        redelivered: bool,
        ahead: Ahead | None = None,
        first: LostCall | None = None,
        reply_to: str | None = None,
    ) -> Claim | Outcome:
        """The job held by this delivery, or its stored outcome; waits while another delivery
        holds it. Raises IdempotencyConflict, AlreadyAnswered, Busy past ``claim_wait``, or
        Poison past the delivery limit.

        ``redelivered``: the job may have been answered by a delivery Redis does not know of,
        so it is looked up in usage_log once claimed, whatever the memory epoch says.

        ``ahead``: the job's budget reserve and first take, run in the first try's round trip
        only if this delivery wins the claim there (``ahead.replies``), and then given back
        with the claim's end unless admission takes them over.

        ``first``: the job's first call, recorded in the claim in the first try's round trip,
        after ``ahead``'s calls and only if they all went through, for a job that goes from
        its claim straight to that call (``Claim.recorded``): its own record would be a round
        trip more right before the call.

        ``reply_to``: where the job's result goes, kept with each call the claim records for
        a job with a deadline, so that a sweep billing it answers it there.

        A miss (Redis not answering) is the job unclaimed, only once usage_log says it was
        not answered, for the memory epoch is unknown too."""
        claimed = ClaimedJob.of(job, reply_to)
        taken = await self._take(job, claimed, redelivered=redelivered, ahead=ahead, first=first)
        if isinstance(taken, Claim) and taken.missed:
            await self._not_accounted(job)
        return taken

    async def _take(
        self,
        job: ChatJob,
        claimed: ClaimedJob,
        *,
        redelivered: bool,
        ahead: Ahead | None,
        first: LostCall | None,
    ) -> Claim | Outcome:
        """As ``take``, a miss not looked up."""
        key = self._keys.claim(job.team, job.job_id)
        result = self._keys.result(job.team, job.job_id)
        failures = self._keys.failures(job.team, job.job_id)
        fingerprint = request_digest(job)
        owner = self.new_owner()
        args: list[str | int] = [owner, self._lease_ms, fingerprint, self._ttl, self._limit]
        give_up = time.monotonic() + self._wait
        pause = FIRST_POLL
        claim_keys, riding = [key, result, *self._epoch_keys, failures], ahead
        replacing = False
        recording = None if first is None else self.hold_call(key, owner, claimed, first)
        while True:
            try:
                reply, recorded = await self._try(claim_keys, args, riding, recording)
                # A second try (the first found it busy) is a claim alone.
                riding = recording = None
            except RedisError as exc:
                self._outage.failed(exc)
                return Claim(self, claimed, fingerprint, key, missed=True)
            self._outage.recovered()
            status = reply[0].decode()
            if status == "conflict":
                raise _conflict(job.job_id, reply)
            if status == "poison":
                raise self._poison(job, claimed, owner, reply)
            if status == "stored":
                taken = self._stored(job, claimed, reply[1], replacing=replacing)
                if taken is not None:
                    return taken
                # Its refusal is an earlier delivery's, this one due later: replaced only
                # while it is the one stored (claim.lua), and this one served.
                args, replacing = [*args, reply[1].decode()], True  # a stored outcome is UTF-8
                continue
            if status == "claimed":
                break
            left = give_up - time.monotonic()
            if left <= 0:
                raise Busy(f"job {job.job_id} is held by {reply[1].decode()}")
            await asyncio.sleep(min(pause, left, int(reply[2]) / 1000))
            pause = min(pause * 2, LAST_POLL)
        lost = _lost(reply[1])
        claim = Claim(
            self,
            claimed,
            fingerprint,
            key,
            owner=owner,
            lost=lost,
            taken_over=reply[3] == 1,
            recorded=first.deployment if recorded and first is not None else None,
        )
        self._held[key] = owner
        if ahead is not None and ahead.replies:
            # Made only if it runs: admission takes over what ran with the claim for all but
            # the jobs that end before it (a governed job built its undo for nothing).
            claim.settle_with(partial(ahead.undo, claim.lost_usd))
        try:
            if redelivered or await self._must_check(reply[2]):
                await self._not_accounted(job)
        except BaseException:
            await claim.abandon()
            raise
        return claim

    def _poison(self, job: ChatJob, claimed: ClaimedJob, owner: str, reply: Any) -> Poison:
        """The job's refusal past the delivery limit (claim.lua's ``poison``), with its claim
        held to bill the calls its dead owners made, if any."""
        key = self._keys.claim(job.team, job.job_id)
        lost = _lost(reply[2])
        held = None
        if lost:
            held = Claim(self, claimed, request_digest(job), key, owner=owner, lost=lost)
            self._held[key] = owner
        return Poison(
            f"job {job.job_id} failed {int(reply[1])} deliveries (died in a provider "
            f"call, or returned on a failure), past the delivery limit of {self._limit}",
            held,
        )

    def _stored(
        self, job: ChatJob, claimed: ClaimedJob, raw: bytes, *, replacing: bool
    ) -> Claim | Outcome | None:
        """What a delivery of ``job`` does with its outcome stored as ``raw``: answer with it,
        serve the job unclaimed (it is unreadable), or None: replace it, unless ``replacing``
        it already (``_published_again``)."""
        stored = stored_outcome(raw)
        if not replacing and _published_again(job, stored):
            return None
        if stored is not None:
            return stored
        log.warning("stored outcome of job %s is unreadable; serving it", job.job_id)
        return Claim(self, claimed, request_digest(job), self._keys.claim(job.team, job.job_id))

    async def _try(
        self,
        keys: list[str],
        args: list[str | int],
        ahead: Ahead | None,
        recording: Call | None,
    ) -> tuple[Any, bool]:
        """One try at the claim, and whether ``recording`` ran with it: ``ahead``'s calls,
        then ``recording``, ride with it, each run only if the claim is won and every call
        before it went through."""
        riding = [*(ahead.calls if ahead is not None else ()), *([recording] if recording else ())]
        if not riding:
            return await self._claim(keys=keys, args=args), False
        # A claim and its call's record, run again by the same delivery (the Redis client
        # sends a command again when its connection broke), find both its own.
        reply, *replies = await self._scripts.run_all(
            [Call("claim", keys, args), *riding], repeatable=ahead is None
        )
        if ahead is not None:
            ahead.replies = replies[: len(ahead.calls)]
        return reply, recording is not None and len(replies) == len(riding) and replies[-1] == 1

    async def lapsed(self) -> Lapsed:
        """Claims of jobs past their deadline and a lease whose dead owners' calls are on
        record, now held here to be answered (at the reply queue the claim kept) and billed:
        their jobs expired in their queues, and no delivery comes back for them. Each one is
        taken once, whichever sweeps or late deliveries race for it (``lua/sweep.lua``).
        One that usage_log records was answered (its outcome's store lost to a Redis fault)
        and is left to lapse, as a redelivery would leave it; one PostgreSQL cannot tell of
        is swept again next time.

        And the stored outcomes of jobs answered whose usage batch was never confirmed (their
        results may never have left either), with the reply queues stored with them, by one
        sweep at a time (each is due again a lease later, should its event's batch fail
        too)."""
        lapsed = Lapsed([], [])
        try:
            due = cast(
                "list[bytes]",
                await self._client.zrangebyscore(
                    self._keys.lapsing, "-inf", time.time() * 1000, start=0, num=SWEPT
                ),
            )
            for raw in due:
                key = raw.decode()
                # The team the key names: the one whose queue the job came on.
                team, job_id = self._keys.claimed(key)
                owner = self.new_owner()
                keys = [key, self._keys.lapsing, self._keys.result(team, job_id)]
                reply = await self._sweep(keys=keys, args=[owner, self._lease_ms])
                if reply[0] == b"stored":
                    outcome = _read_stored(reply[1], Stored)
                    if outcome is not None:
                        lapsed.answered.append(Unaccounted(key, outcome))
                        continue
                    log.warning("stored outcome of job %s is unreadable; not accounted", job_id)
                    await self._client.zrem(self._keys.lapsing, key)
                if reply[0] != b"claimed":
                    continue
                reply_to = reply[4].decode() or None
                job = ClaimedJob(team, job_id, reply[3].decode(), reply_to=reply_to)
                lost = _lost(reply[1])
                claim = Claim(
                    self, job, reply[2].decode(), key, owner=owner, lost=lost, taken_over=True
                )
                self._held[key] = owner
                answered: bool | None
                try:
                    # Not waited for: the sweep runs in the worker's loop of periodic work.
                    cost = await self._usage.accounted(team, job_id, until=time.monotonic())
                    answered = cost is not None
                except ServiceUnavailable:
                    answered = None
                if answered is False:
                    lapsed.claims.append(claim)
                    continue
                await claim.abandon()
                if answered:
                    await self._client.zrem(self._keys.lapsing, key)
        except RedisError as exc:
            self._outage.failed(exc)  # the claims not taken are swept next time
        return lapsed

    async def spent_late(self, usage: UsageEvent) -> None:
        """Add the cost of a stalled owner's late row (``outcome_of_late``: what its calls
        cost past the estimates they were billed at as lost) to its team's live spend, as the
        first store of the job's outcome added the job's (``store``)."""
        spend = self._keys.live_spend(usage.team, usage.ts.strftime("%Y-%m"))
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.incrby(spend, to_nano(usage.cost_usd))
                pipe.expire(spend, SPEND_TTL)
                await pipe.execute()
        except RedisError as exc:
            self._outage.failed(exc)

    def lapsing(self, job: ChatJob | ClaimedJob) -> str | None:
        """The job's entry on the lapsing claims, when it may have one (a deadline): to be
        removed once its usage event is confirmed (``accounted``)."""
        return None if job.deadline is None else self._keys.claim(job.team, job.job_id)

    async def accounted(self, keys: list[str]) -> None:
        """Take the claims of jobs whose usage events a confirmed batch carried off the
        lapsing claims: one command for the batch. Best effort: one left there is swept, its
        event sent again, and accounting keeps a job's first row."""
        try:
            await self._client.zrem(self._keys.lapsing, *keys)
        except RedisError as exc:
            self._outage.failed(exc)

    async def returned(self, team: str, job_id: str) -> None:
        """Count a delivery of the job that a worker returns to its queue on a failure."""
        key = self._keys.failures(team, job_id)
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.incr(key)
                pipe.expire(key, self._ttl)
                await pipe.execute()
        except RedisError as exc:
            self._outage.failed(exc)  # then only the broker's far limit counts it

    async def _not_accounted(self, job: ChatJob) -> None:
        """Raise AlreadyAnswered (with the cost its row holds) when this worker remembers
        settling the job or PostgreSQL records its usage; wait while it cannot tell, up to
        the job's time limit (then ServiceUnavailable)."""
        # This worker's memory first: a job it answered whose usage accounting has not
        # written yet (stopped, or behind) was called again after a Redis loss (billed on a
        # row of its own, but called twice all the same).
        nano = self._remembered(job.team, job.job_id)
        if nano is not None:
            cost: Decimal | None = from_nano(nano)
        else:
            until = time.monotonic() + self._lookup_wait
            cost = await self._usage.accounted(job.team, job.job_id, until=until)
        if cost is not None:
            answered = AlreadyAnswered(
                f"job {job.job_id} was already answered or refused under this id (its usage "
                "is recorded; the answer went to the reply queue of its first delivery): send "
                "a new request under a new job id"
            )
            answered.answered_usd = cost
            raise answered

    async def start(self) -> None:
        """Write the memory epoch if Redis has none (it is new, or lost its data), so that
        jobs find it."""
        await self._must_check(b"")

    async def _must_check(self, raw: bytes) -> bool:
        """Whether a job must be looked up in usage_log before its call: Redis may have lost
        outcomes that PostgreSQL records, or that cannot be told. ``raw``: the memory epoch
        as the claim read it (b"" if missing)."""
        verdict = self._verdict(raw)
        if verdict is None:
            # One look at a time: the jobs that found it so together wait for it.
            async with self._epoch_lock:
                verdict = await self._decide()
        return verdict

    def _verdict(self, raw: bytes) -> bool | None:
        """What the memory epoch says; None when it is missing, or provisional and due."""
        if not raw:
            return None
        epoch, now_ms = float(raw), time.time() * 1000
        if epoch < 0:  # provisional: found missing at -epoch, nothing accounted before
            return True if now_ms < SETTLE * 1000 - epoch else None
        return epoch > 0 and now_ms < epoch + self._ttl * 1000

    async def _decide(self) -> bool:
        """Write the memory epoch if missing, settle it if provisional and due; whether jobs
        must be looked up (always, while it cannot be told).

        Missing: Redis is new, or lost its data, at ``found`` (now). If a job that finished
        within ``result_ttl`` before it is accounted, Redis may have forgotten outcomes: it
        is ``found``. If none is yet, it is provisional (``-found``), for the usage events of
        jobs answered just before the loss may still be on their way; SETTLE later the same
        question is asked again, and it is ``found`` or 0 (nothing to forget).
        """
        key = self._keys.memory_epoch
        try:
            raw = _text(await self._client.get(key))
            verdict = self._verdict(raw)
            if verdict is not None:
                return verdict
            found = -float(raw) if raw else time.time() * 1000
            before = await self._usage.accounted_before(found, self._ttl)
            if before is None:
                return True  # cannot tell now; a later job asks again
            if raw:  # provisional and due: settled now
                settled = f"{found:.0f}" if before else "0"
                await self._settle(keys=[key], args=[raw, settled])
            else:
                await self._client.set(key, f"{found:.0f}" if before else f"-{found:.0f}", nx=True)
            raw = _text(await self._client.get(key))
        except RedisError as exc:
            self._outage.failed(exc)
            return True
        return self._verdict(raw) is not False

    def hold(self, key: str, owner: str, job: ClaimedJob, call: LostCall) -> Awaitable[bool]:
        """Renew a claim now, with the call about to leave; False when another delivery took
        it over, or ended it storing the job's outcome (true also while Redis cannot tell,
        or has lost the claim and the outcome: the call goes on and is billed by this
        delivery's outcome)."""
        # Not a coroutine of its own: a call waiting for a Redis connection holds each frame
        # of its chain, and thousands wait when Redis is the slowest stage.
        return self._hold_for(
            key, owner, self._lease_ms, self._recorded(job, call, owner), self._outcome(job)
        )

    async def let_go(self, key: str, owner: str) -> None:
        """End the claim's lease now (its record stays): the next delivery takes over."""
        self.forget(key, owner)
        await self._hold_for(key, owner, 0, [""])

    def forget(self, key: str, owner: str) -> None:
        """Stop renewing the claim."""
        if self._held.get(key) == owner:
            del self._held[key]

    def hold_call(self, key: str, owner: str, job: ClaimedJob, call: LostCall) -> Call:
        """``hold`` with ``call`` as a script call, to ride with another (a deployment's
        take: ``Ticket.enter``)."""
        recorded = self._recorded(job, call, owner)
        keys = [key, self._keys.lapsing, self._outcome(job)]
        return Call("hold", keys, [owner, self._lease_ms, *recorded])

    def _outcome(self, job: ClaimedJob) -> str:
        """The key of the job's stored outcome."""
        return self._keys.result(job.team, job.job_id)

    def _recorded(self, job: ClaimedJob, call: LostCall, owner: str) -> list[str | int]:
        """``hold.lua``'s arguments recording ``call`` made by ``owner``: with a deadline,
        when a sweep may take the claim (a lease after it, when a dead owner's lease has
        surely lapsed), and what it bills and answers the job with (its model, its reply
        queue)."""
        recorded = call.model_copy(update={"claim": owner}).model_dump_json()
        if job.deadline is None:
            return [recorded]
        deadline = job.deadline if job.deadline.tzinfo else job.deadline.replace(tzinfo=UTC)
        due = int(deadline.timestamp() * 1000) + self._lease_ms
        return [recorded, due, job.model, job.reply_to or ""]

    async def _hold_for(
        self, key: str, owner: str, lease_ms: int, recorded: list[str | int], outcome: str = ""
    ) -> bool:
        keys = [key, self._keys.lapsing, *([outcome] if outcome else [])]
        try:
            held = await self._hold(keys=keys, args=[owner, lease_ms, *recorded])
        except RedisError as exc:
            self._outage.failed(exc)
            return True
        return bool(held != 0)  # lua/hold.lua: 0 taken over or answered, nil lost with Redis

    async def settle(self, settlement: Settlement) -> None:
        """Run a job's admission settles on their own (its claim let go, not finished)."""
        try:
            settlement.done(await self._scripts.run_all(settlement.calls))
        except RedisError as exc:
            self._outage.failed(exc)  # lost as admission's own would be (Admission.settle)

    async def store(
        self,
        job: ClaimedJob,
        fingerprint: str,
        outcome: Outcome,
        settlement: Settlement | None = None,
        *,
        accounted: bool,
        dumped: tuple[bytes, bytes] | None = None,
    ) -> Outcome | None:
        """Store a job's outcome and end its claim, with the job's admission ``settlement``
        in the same round trip; the outcome stored before, if any. Unless its usage event
        is ``accounted`` (confirmed) already, a claim on the lapsing claims stays there until
        it is (``accounted``), and the outcome of a job with a deadline is stored with its
        reply queue (``Stored``), where a sweep answers it should its worker die first.
        ``dumped``: the outcome as it is announced (``as_json``), stored as it is rather than
        made again. The first store of a job's outcome adds its cost to the team's live spend
        (what ``queuegate status`` shows), in the same script: once a job, as usage_log
        counts it, however many deliveries or sweeps end it."""
        key = self._keys.claim(job.team, job.job_id)
        result = self._keys.result(job.team, job.job_id)
        spend = self._keys.live_spend(job.team, outcome.usage.ts.strftime("%Y-%m"))
        keys = [key, result, self._keys.lapsing, spend]
        answer, usage = dumped if dumped is not None else as_json(outcome)
        if outcome.usage.content is not None:
            # Captured prompts go to the audit table only, never into Redis.
            usage = outcome.usage.model_dump_json(exclude={"content"}).encode()
        reply = ""
        # Only a sweep reads it: of a job that may stay on the lapsing claims (a deadline)
        # once stored (its event still to be confirmed).
        if not accounted and job.deadline is not None and job.reply_to:
            reply = f',"reply_to":{orjson.dumps(job.reply_to).decode()}'
        stored = f'{fingerprint}{{"result":{answer.decode()},"usage":{usage.decode()}{reply}}}'
        cost = to_nano(outcome.usage.cost_usd)
        lease = "" if accounted else self._lease_ms
        args: list[str | int] = [stored, self._ttl, lease, cost, SPEND_TTL]
        try:
            if settlement is None:
                earlier = await self._finish(keys=keys, args=args)
            else:
                # The store first: its reply never stops the round trip (lua/batch.lua).
                finish = Call("finish", keys, args)
                earlier, *settled = await self._scripts.run_all([finish, *settlement.calls])
                settlement.done(settled)
        except RedisError as exc:
            self._outage.failed(exc)
            return None
        return None if earlier is None else stored_outcome(earlier)


class Claim:
    """A job this delivery holds (``owner`` None: unclaimed, Redis being unreachable)."""

    def __init__(
        self,
        claims: Claims,
        job: ClaimedJob,
        fingerprint: str,
        key: str,
        *,
        owner: str | None = None,
        lost: list[LostCall] | None = None,
        taken_over: bool = False,
        missed: bool = False,
        recorded: str | None = None,
    ) -> None:
        self._claims = claims
        self.job = job
        self.fingerprint = fingerprint
        """The digest of the request its job id is bound to (``request_digest``)."""
        self._key = key
        self._owner = owner
        self.missed = missed
        """Unclaimed because Redis did not answer: claimed before the job is called or its
        end stored (``take_up_before_call``, ``take_up``), once Redis answers again
        (admission held it meanwhile)."""
        self.lost = lost or []
        """Calls lapsed owners of the job had in flight."""
        self.lost_usd = sum((call.cost_usd for call in self.lost), Decimal(0))
        """Their estimates: added to the job's cost on its usage row, in its result and in
        its budget ledger, whatever ends this delivery."""
        self.taken_over = taken_over
        """Whether it was taken over from another owner, whose reservation of the job's
        budget may still be in its ledger (one that died holding the job waiting for its
        rate limit made no call, and lapses only after its lease)."""
        self.charged = False
        """Whether admission took their charge to the ledger (``Admission.admit``)."""
        self._settlement: Settlement | Callable[[], Settlement | None] | None = None
        self.recorded = recorded
        """The deployment of the job's first call when that call was recorded with the claim
        (``Claims.take``'s ``first``): the call to it needs no record of its own."""
        self.sent: dict[str, LostCall] = {}
        """Deployment → the record of a call to it (``planned_call``: its estimate), for each
        this delivery let go."""

    async def take_up(self, job: ChatJob) -> bool:
        """Claim a job that ``missed`` its claim before its end is stored: the duplicates of
        a job all miss it while Redis is away; the one that claims it once Redis answers
        again stores it. Whether it is claimed: not while Redis still does not answer
        (``missed`` stays set), and then only once usage_log says it was not answered, as
        the job goes on unclaimed. Raises Duplicate when another delivery answered it, or it
        is to be refused; else as ``Claims.take`` does (Busy when another delivery holds it
        past the wait).

        Looked up in usage_log once claimed: Redis vouches only for deliveries that claimed
        the job, and one may have answered it unclaimed meanwhile (``fail_open``), or had
        its outcome's store lost with Redis."""
        return await self._take_up(job, goes_on_missed=True)

    async def take_up_before_call(self, job: ChatJob) -> bool:
        """``take_up`` before the job's first call leaves, tried until claimed
        (``Ticket.claimed``): all the duplicates wait, and only the one that claims it is
        called. A miss is looked up in usage_log only with ``fail_open``, where the job then
        goes on unclaimed, not when it only waits for its claim (``fail_closed``): looked up
        at its first miss, and again once claimed, it would otherwise ask PostgreSQL at
        every try of the outage, for nothing."""
        return await self._take_up(job, goes_on_missed=self._claims.fail_open)

    async def _take_up(self, job: ChatJob, *, goes_on_missed: bool) -> bool:
        if not self.missed:
            return True
        try:
            taken = await self._claims._take(
                job, self.job, redelivered=True, ahead=None, first=None
            )
            if goes_on_missed and isinstance(taken, Claim) and taken.missed:
                await self._claims._not_accounted(job)
        except (IdempotencyConflict, AlreadyAnswered) as exc:
            raise Duplicate(exc) from exc
        if not isinstance(taken, Claim):
            raise Duplicate(taken)
        self.missed = taken.missed
        self._owner, self.lost, self.lost_usd = taken._owner, taken.lost, taken.lost_usd
        self.taken_over = taken.taken_over
        return not self.missed

    @property
    def owed_usd(self) -> Decimal | None:
        """What the job's budget entry is settled to when this delivery ends the job
        without a reservation of its own (``Admission.charge``): the calls its lapsed owners
        made, or 0 (the entry removed); None when no other owner may have left one."""
        return self.lost_usd if self.lost or self.taken_over else None

    def estimated(self, attempts: Sequence[Attempt] | None) -> Billed | None:
        """The estimates of ``attempts`` this delivery made, their cost and tokens
        (``_estimated_bill``): what a delivery taking its claim over billed them as lost
        (each was recorded at its estimate before it left)."""
        sent = self.sent
        return _estimated_bill([sent[a.deployment] for a in attempts or () if a.deployment in sent])

    def _unread_bill(self, attempts: Sequence[Attempt]) -> Billed | None:
        """What the calls of ``attempts`` the provider may bill though no answer was read
        (``_unread``) cost: each billed as a lost call is (``estimated``)."""
        return self.estimated([a for a in attempts if _unread(a)])

    def served(self, routed: Routed) -> Routed:
        """``routed`` billing also the calls before the one that answered whose answers
        were not read (``_unread_bill``): their tokens too (before, only their cost, so a
        row's tokens were the serving call's alone)."""
        unread = self._unread_bill(routed.attempts)
        return routed if unread is None else _plus(routed, unread)

    def spent(self, error: JobError) -> Billed | None:
        """What the calls of a job that failed with ``error`` still cost: its ``billed`` (a
        stream that broke: its last call) and those whose answers were not read
        (``_unread_bill``)."""
        billed = error.billed
        unread = self._unread_bill(error.attempts[:-1] if billed is not None else error.attempts)
        if unread is None:
            return billed
        return unread if billed is None else _plus(billed, unread)

    def gate(self, job: ChatJob, ticket: Ticket, catalog: Catalog) -> AttemptGate:
        """``ticket`` that also records each call of ``job`` in the claim before it leaves."""
        return _Recording(self, job, ticket, catalog)

    async def record(self, call: LostCall) -> None:
        """Note the call about to leave: lost, should this owner die before its outcome.
        Busy when another delivery took the claim over (this owner stalled past its lease,
        a call of its timing out meanwhile), or has answered the job since: the taker
        answers it and bills this owner's calls recorded before as lost, so this one must
        not leave, billed nowhere."""
        if self._owner is not None and not await self._claims.hold(
            self._key, self._owner, self.job, call
        ):
            raise Busy(f"job {self.job.job_id} was taken over by another delivery")

    def recording(self, call: LostCall) -> Call | None:
        """``record`` as a script call, to ride with the take that lets the call go; None
        when unclaimed."""
        if self._owner is None:
            return None
        return self._claims.hold_call(self._key, self._owner, self.job, call)

    def settle_with(self, settlement: Settlement | Callable[[], Settlement | None] | None) -> None:
        """Run the job's admission settles with the outcome's store (``finish``), or on their
        own when the claim is let go (``abandon``) or ``settle`` is called first; given as a
        function, they are made only when they run."""
        self._settlement = settlement

    def _settles(self) -> Settlement | None:
        """The settles given to ``settle_with``, made if need be, taken to run once."""
        settlement, self._settlement = self._settlement, None
        return settlement() if callable(settlement) else settlement

    async def settle(self) -> None:
        """Run the settles given to ``settle_with`` now, if they have not run."""
        settlement = self._settles()
        if settlement is not None:
            await self._claims.settle(settlement)

    def account(self, outcome: Outcome) -> Outcome:
        """The outcome whose usage names this delivery's claim, and also counts the calls
        lost with lapsed owners: the client is told the attempts and cost its usage row
        holds. Accounting bills a claim's calls once, and those of each claim: a delivery
        served unclaimed (Redis unreachable, ``fail_open``) is named as one would have been,
        for a duplicate so served calls again."""
        usage = outcome.usage
        claim = self._owner if self._owner is not None else self._claims.new_owner()
        if not self.lost:
            return outcome.model_copy(update={"usage": usage.model_copy(update={"claim": claim})})
        lost = [call.attempt() for call in self.lost]
        update: dict[str, Any] = {
            "attempt_log": lost + (usage.attempt_log or []),
            "attempts": usage.attempts + len(lost),
            "claim": claim,
            "covers": sorted({call.claim for call in self.lost if call.claim}) or None,
        }
        gateway = outcome.result.gateway
        billed: dict[str, Any] = {"attempts": lost + gateway.attempts}
        bill = _estimated_bill(self.lost)
        if bill is not None:
            # Their estimated tokens too, as calls whose answers went unread have on a row
            # (``_unread_bill``): its tokens are what its cost bills (before, its cost alone).
            update |= {
                "cost_usd": usage.cost_usd + bill.cost_usd,
                "input_tokens": usage.input_tokens + bill.input_tokens,
                "output_tokens": usage.output_tokens + bill.output_tokens,
                "cache_write_tokens": usage.cache_write_tokens + bill.cache_write_tokens,
            }
            billed["cost_usd"] = update["cost_usd"]
            if bill.estimated:
                update["tokens_estimated"] = billed["tokens_estimated"] = True
        gateway = gateway.model_copy(update=billed)
        result = outcome.result.model_copy(update={"gateway": gateway})
        return outcome.model_copy(
            update={"usage": usage.model_copy(update=update), "result": result}
        )

    async def finish(
        self,
        outcome: Outcome,
        *,
        accounted: bool = False,
        dumped: tuple[bytes, bytes] | None = None,
    ) -> Outcome:
        """Store the outcome and end the claim (the job's settles in the same round trip);
        returns what the job is announced with: the outcome stored first, when a delivery
        that took over finished before this one. ``accounted``: its usage event is
        confirmed already (else the worker says when it is: ``Claims.accounted``);
        ``dumped``: the outcome ``as_json`` already."""
        if self._owner is not None:
            self._claims.forget(self._key, self._owner)
            self._owner = None
        settlement = self._settles()
        earlier = await self._claims.store(
            self.job, self.fingerprint, outcome, settlement, accounted=accounted, dumped=dumped
        )
        return outcome if earlier is None else earlier

    async def abandon(self) -> None:
        """Let the job go at once, keeping the call in flight on record: its next delivery
        takes over without waiting for the lease."""
        await self.settle()
        if self._owner is not None:
            owner, self._owner = self._owner, None
            await self._claims.let_go(self._key, owner)


class _Recording:
    """The router's gate: the admission ticket, then the call recorded in the claim."""

    def __init__(self, claim: Claim, job: ChatJob, ticket: Ticket, catalog: Catalog) -> None:
        self._claim = claim
        self._job = job
        self._ticket = ticket
        self._catalog = catalog

    async def enter(self, deployment: Deployment) -> None:
        job = self._job
        alias = next(
            (
                alias
                for alias in self._catalog.chain(job.model, job.fallbacks)
                if deployment in self._catalog.resolve(alias).deployments
            ),
            job.model,
        )
        # Held while the call is recorded (most jobs wait there for a Redis connection).
        call = shared_fields(planned_call(alias, deployment, self._ticket.estimate))
        self._claim.sent[deployment.name] = call
        # Recorded with the claim already (the first call only), or in the round trip of the
        # deployment's take when that lets it go at once; recorded on its own otherwise, and
        # when that record found the claim another's (``record`` then stops the call).
        recorded, self._claim.recorded = self._claim.recorded == deployment.name, None
        then = None if recorded else self._claim.recording(call)
        ran = await self._ticket.enter(deployment, then=then) or recorded
        if self._claim.missed:
            # Claimed before the call leaves: with fail_closed it waits for Redis as admission
            # does, whether or not its admission had anything to take there.
            await self._ticket.claimed(lambda: self._claim.take_up_before_call(job))
            if self._claim.lost_usd:
                self._ticket.lost(self._claim.lost_usd)  # found only now: none charged yet
        if not ran:
            await self._claim.record(call)

    async def rate_limited(self, deployment: Deployment) -> None:
        await self._ticket.rate_limited(deployment)


def _unread(attempt: Attempt) -> bool:
    """A call the provider may bill though no answer of it was read: timed out once let go,
    or answered 2xx with a body that is no answer (``bad_response``: no JSON, nested past a
    job's depth) or cut before it was read (``connection``: a plain answer's body, or a
    stream dropped after its start, which may have reported a cache write). Before, such a
    200 was free, and the fallback that followed was billed alone.

    Not a failure the provider reported, whatever its class: an error event in a 2xx stream
    (recorded with its 200) is a failed request, which Anthropic documents it does not
    charge. A timeout is the worker's own bound (no status), not a provider's 408 or
    ``timeout_error`` event (before, billed at the estimate as one)."""
    if attempt.error == "timeout":
        return attempt.status is None
    return attempt.error in _CUT_SHORT and 200 <= (attempt.status or 0) < 300


_CUT_SHORT = frozenset({"bad_response", "connection"})
"""Failures of a call answered 2xx that leave its answer unread."""


Bill = TypeVar("Bill", Routed, Billed)


def _plus(bill: Bill, unread: Billed) -> Bill:
    """``bill`` billing also the ``unread`` calls (``Claim._unread_bill``): their cost and
    their tokens, ``estimated`` as they are."""
    return replace(
        bill,
        input_tokens=bill.input_tokens + unread.input_tokens,
        output_tokens=bill.output_tokens + unread.output_tokens,
        cache_write_tokens=bill.cache_write_tokens + unread.cache_write_tokens,
        cost_usd=bill.cost_usd + unread.cost_usd,
        estimated=bill.estimated or unread.estimated,
    )


def _estimated_bill(calls: Sequence[LostCall]) -> Billed | None:
    """What ``calls`` cost, lost or their answers unread, named after the last of them: each
    billed at its estimate, with the estimate's tokens (the prompt as written to a cache when
    the job marks one), so that a row's tokens are what its cost bills (``estimated``; a
    record kept without its tokens adds its cost alone). None when they cost nothing."""
    usd = sum((call.cost_usd for call in calls), Decimal(0))
    if not usd:
        return None
    last = calls[-1]
    prompt = sum(call.input_tokens for call in calls)
    output = sum(call.output_tokens for call in calls)
    return Billed(
        model_used=last.model,
        deployment=last.deployment,
        provider=last.provider,
        input_tokens=prompt,
        output_tokens=output,
        cached_tokens=0,
        cost_usd=usd,
        estimated=bool(prompt or output),
        cache_write_tokens=sum(call.cache_write_tokens for call in calls),
    )


def planned_call(alias: str, deployment: Deployment, estimate: Estimate) -> LostCall:
    """The record of a call of ``alias`` about to leave for ``deployment``, priced at the
    job's ``estimate``, with its tokens."""
    usage = estimate.usage
    return LostCall(
        model=alias,
        deployment=deployment.name,
        provider=deployment.provider,
        cost_usd=estimate.usd_at(deployment),
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cache_write_tokens=usage.cache_write_tokens,
    )


def _published_again(job: ChatJob, stored: Outcome | None) -> bool:
    """Whether ``stored`` refuses an earlier delivery of ``job`` late, uncalled, nothing
    billed, while this one is due still: the job published again under its id with a later
    deadline (a retry under its Idempotency-Key, ``frontdoor.outcomes``)."""
    return (
        job.deadline is not None and datetime.now(UTC) < job.deadline and expired_uncalled(stored)
    )


def _conflict(job_id: str, reply: Sequence[Any]) -> IdempotencyConflict:
    """The refusal of a request under ``job_id``, which names a different one (``reply``:
    ``lua/claim.lua``'s), with what that one's answer cost when it is stored."""
    conflict = IdempotencyConflict(
        f"job id {job_id!r} was already used for a different request; "
        "give each request its own job id"
    )
    other = stored_outcome(reply[1]) if len(reply) > 1 else None
    if other is not None:
        conflict.answered_usd = other.usage.cost_usd
    return conflict


def _lost(raw: bytes) -> list[LostCall]:
    """The calls lapsed owners had in flight, as a claim keeps them (one JSON a line)."""
    return [LostCall.model_validate_json(line) for line in raw.decode().splitlines()]


def _text(raw: bytes | str | None) -> bytes:
    return raw.encode() if isinstance(raw, str) else raw or b""


def binding(client: aioredis.Redis) -> AsyncScript:
    """``lua/bind.lua`` on ``client``: binds a job id to a request's fingerprint in the job's
    claim before the job is published, or says why not (answered, or a different request's)."""
    return client.register_script(lua_source("workers", "bind"))


def stored_outcome(raw: bytes) -> Outcome | None:
    """A job's outcome as ``Claims.store`` keeps it (after the request's fingerprint); None
    when unreadable."""
    return _read_stored(raw, Outcome)


Read = TypeVar("Read", bound=Outcome)


def _read_stored(raw: bytes, model: type[Read]) -> Read | None:
    """``stored_outcome`` read as ``model``: ``Stored`` for what else is kept with it."""
    body = raw if raw[:1] == b"{" else raw[FINGERPRINT:]
    try:
        return model.model_validate_json(body)
    except ValidationError:
        return None
