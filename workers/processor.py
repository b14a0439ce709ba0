"""One job's path through a worker, from delivery to acknowledgement.

decode → validate (content type, schema version) → team → proven publisher → claim (or:
answered already, held by another delivery, a different request under the id) → reply queue
exists (refused after the claim is read: calls its lapsed owners made are accounted on the
job's row, however it ends; one answered before only has its stored usage event sent again,
which the delivery that answered it may have died before sending) → PII policy → deadline →
cache → admission (budget, team buckets; for the common job, reserved and taken in the
claim's round trip once it is won, given back with the claim if the job ends first) →
router (each deployment's buckets, each call recorded in the claim before it leaves, in the
take's round trip when it goes at once, or in the claim's own for a first call with nothing
to wait for; streaming deltas to reply_to) → store outcome,
ending the claim, and settle admission in the same round trip → publish result
(confirmed) → usage event in the worker's next batch (confirmed; a job with a deadline then
leaves the lapsing claims) → dead-letter bad input → ack.

The outcome is stored before it is announced: a crash after that point redelivers the job,
and the redelivery is answered from the store instead of calling the provider again. Before
that point the claim (workers.claims) keeps any other delivery of the job from calling. A
delivery whose channel closes (the broker connection lost) runs on to its outcome if it holds
the claim, and stops before claiming if not: either way its redelivery makes no second call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

from aio_pika.abc import AbstractIncomingMessage
from aiormq.exceptions import AMQPError, ChannelInvalidStateError
from pydantic import ValidationError
from redis.exceptions import RedisError

from queuegate import logs, tracing
from queuegate.broker import CONNECTION_LOST, Delivery, settle
from queuegate.db import UNREACHABLE
from queuegate.errors import (
    Billed,
    DeadlineExceeded,
    InvalidRequest,
    JobError,
    ServiceUnavailable,
    Unauthorized,
    WorkerFault,
)
from queuegate.header_bound import check_headers_read
from queuegate.messages import CONTENT_TYPE, SCHEMA_VERSION, ChatJob, shared_fields
from queuegate.openai_params import refused_param
from queuegate.request_limits import JOB_OWN_BYTES, request_bytes
from queuegate.spend import capped_fallback
from queuegate.topology import DELIVERY_LIMIT_REASON, HEADER_SENT_MS
from queuegate.visible import clipped
from router import Routed, Router
from workers import spans
from workers.admission import Admission, Ahead, TeamStopped
from workers.admission.estimate import Estimate
from workers.batch_cancel import BatchCancels
from workers.cache import ResponseCache, wanted
from workers.claims import (
    Busy,
    Claim,
    Claims,
    Duplicate,
    LostCall,
    Poison,
    Unaccounted,
    planned_call,
)
from workers.gate import Admitted, Gate
from workers.outcome import (
    UNACCOUNTED,
    Announcement,
    Marks,
    Outcome,
    Timing,
    as_json,
    failed,
    outcome_of_late,
    refused,
    served,
    unwritable,
)
from workers.publisher import Publisher
from workers.reply_queues import ReplyQueues
from workers.streaming import StreamRelay, relay_for
from workers.telemetry import Telemetry

log = logging.getLogger(__name__)

TRANSIENT = (*UNREACHABLE, RedisError, AMQPError, ServiceUnavailable, *CONNECTION_LOST)
"""Failures of a service (connection lost, refused, timed out) that a later delivery of the
job may not meet: the job goes back to its queue. Any other unexpected failure ends it."""


class JobProcessor:
    def __init__(
        self,
        *,
        router: Router,
        claims: Claims,
        replies: ReplyQueues,
        cache: ResponseCache,
        publisher: Publisher,
        admission: Admission,
        worker: str,
        max_job_bytes: int,
        max_job_messages: int,
        gate: Gate,
        telemetry: Telemetry,
        job_time_limit: float,
        cancels: BatchCancels,
    ) -> None:
        self._router = router
        self._admission = admission
        self._claims = claims
        self._replies = replies
        self._cache = cache
        self._publisher = publisher
        self._worker = worker
        self._max_job_bytes = max_job_bytes
        self._max_job_messages = max_job_messages
        self._gate = gate
        self._telemetry = telemetry
        self._job_time_limit = job_time_limit
        self._cancels = cancels

    def process(
        self, message: AbstractIncomingMessage, delivery: Delivery, team: str, queue: str
    ) -> Coroutine[Any, Any, None]:
        """Answer, account and acknowledge one delivery (settled only through ``delivery``, made
        as it arrived); on an unexpected failure, requeue it.

        Call it in the context of the job's task, and run the coroutine it returns as that
        task: not a coroutine itself, so the job holds one frame fewer while it waits (a
        worker holds thousands when its broker is the slowest stage).
        """
        logs.for_job(message.message_id or message.correlation_id or "", team)
        # Once: the job span's queued child and the usage row say the same time.
        queued_ms = _queued_ms(message)
        if tracing.ON:
            return self._traced(message, delivery, team, queue, queued_ms)
        return self._handle(message, delivery, team, queue, queued_ms)

    async def _traced(
        self,
        message: AbstractIncomingMessage,
        delivery: Delivery,
        team: str,
        queue: str,
        queued_ms: float,
    ) -> None:
        trusted = self._gate.from_frontdoor(message)
        with spans.job_span(message, team, queue, queued_ms, trusted=trusted):
            await self._handle(message, delivery, team, queue, queued_ms)

    async def _handle(
        self,
        message: AbstractIncomingMessage,
        delivery: Delivery,
        team: str,
        queue: str,
        queued_ms: float,
    ) -> None:
        try:
            try:
                # Two steps, so that while the broker confirms the announcement nothing of
                # the job but its bytes is alive (see Announcement).
                announcement = await self._process(message, team, queued_ms)
            except Poison as exc:
                log.error("%s; dead-lettering it", exc)
                await self._dead_letter_poison(message, delivery, team, queue, exc)
                return
            # Nor anything of the delivery but what settles it (see Delivery), unless it is
            # dead-lettered as bad input.
            original = message if announcement.bad_input is not None else None
            del message
            await self._finish(delivery, original, announcement, queue)
        except Busy as exc:
            # Not called meanwhile: the job comes back, and by then has its outcome. No
            # failure of the job's (its owner is alive, in its call), so not counted toward
            # the delivery limit: a call longer than the limit's waits dead-lettered, unanswered,
            # a job whose first delivery's answer was lost with its connection.
            log.info("%s past the wait; returning this delivery to the queue", exc)
            await self._requeue(delivery, team, exc, failed=False)
        except CONNECTION_LOST as exc:
            # The delivery's channel died with the connection: the broker delivers the job
            # again, and the outcome stored before it was announced answers it.
            log.info("job %s: its channel is gone (%s); it comes back", delivery.message_id, exc)
            if tracing.ON:
                tracing.failed(tracing.current(), exc)
        except ServiceUnavailable as exc:
            # TeamStopped is an operator's doing (a drain, a team disabled), not a fault; a
            # drain may return a prefetch's worth of jobs, a line each.
            stopped = isinstance(exc, TeamStopped)
            log.log(
                logging.INFO if stopped else logging.WARNING, "job %s: %s", delivery.message_id, exc
            )
            await self._requeue(delivery, team, exc)
        except Exception as exc:
            log.exception(
                "job %s failed in the worker; returning it to the queue", delivery.message_id
            )
            await self._requeue(delivery, team, exc)

    async def _requeue(
        self, delivery: Delivery, team: str, why: Exception, *, failed: bool = True
    ) -> None:
        """Return the job to its queue; counted toward its delivery limit when ``failed``."""
        if tracing.ON:
            tracing.failed(tracing.current(), why)
        # message_id: the job's id (checked against the body before any claim)
        if failed and delivery.message_id:
            await self._claims.returned(team, delivery.message_id)
        await settle(delivery.nack(requeue=True), f"return job {delivery.message_id}", log)

    async def _dead_letter_poison(
        self,
        message: AbstractIncomingMessage,
        delivery: Delivery,
        team: str,
        queue: str,
        why: Poison,
    ) -> None:
        """Dead-letter a job past the delivery limit as the broker would have (no answer;
        ``dlq replay`` brings it back for as many failures again). The calls its dead owners
        made are billed first, as a sweep bills them (``_bill_lost``), and the outcome that
        stores answers a replay of it, without a call or a charge."""
        if why.claim is not None:
            claim = why.claim
            fault = WorkerFault(
                f"{why}; dead-lettered (delivery_limit), its {len(claim.lost)} lost call(s) "
                "are billed"
            )
            try:
                await self._bill_lost(claim, fault, answered=False)
            except Exception as exc:
                log.exception("job %s could not be billed; it comes back", message.message_id)
                await claim.abandon()
                await self._requeue(delivery, team, exc)
                return
        try:
            await self._publisher.dead_letter(
                message,
                reason=DELIVERY_LIMIT_REASON,
                detail=str(why),
                queue=queue,
                user=self._gate.first_user(message),
                first=self._gate.first_cause(message),
            )
        except Exception as exc:
            log.exception("job %s could not be dead-lettered; it comes back", message.message_id)
            await self._requeue(delivery, team, exc)
            return
        await settle(delivery.ack(), f"acknowledge dead-lettered job {message.message_id}", log)

    async def _process(
        self, message: AbstractIncomingMessage, team: str, queued_ms: float
    ) -> Announcement:
        ids = tracing.ids() if tracing.ON else None
        timing = Timing(queued_ms, self._worker, *ids) if ids else Timing(queued_ms, self._worker)
        # Until its claim is taken, a job the worker fails on is answered as a refused one is
        # (no call made), with that failure (``_error_of``).
        reply_to: str | None = None  # nowhere, when where it may go could not be told
        try:
            # Results and streamed deltas go only to a reply queue the team may use.
            reply_to = await self._gate.reply_to(message, team)
            job = self._decode(message)
        except Exception as exc:
            job_id = message.correlation_id or message.message_id or "unknown"
            error = _error_of(exc, job_id)
            outcome = self._gate.claimed(
                message, refused(job_id, team, "", error, timing, message=message)
            )
            return self._refused(job_id, outcome, reply_to, error)
        try:
            if job.team != team:
                raise Unauthorized(
                    f"job for team {job.team!r} arrived on the queue of team {team!r}"
                )
            # Before the stored result: only a proven publisher may have it sent again. A
            # refusal is not stored, or a forger could answer the real job in advance.
            admitted = await self._gate.admit(message, job, team)
            # Before its claim, which reserves its budget under the team's config.
            if not self._admission.current():
                await self._admission.until_current(_monotonic_deadline(job.deadline))
        except Exception as exc:
            error = _error_of(exc, job.job_id)
            outcome = self._gate.claimed(
                message, refused(job.job_id, team, job.model, error, timing, message=message)
            )
            return self._refused(job.job_id, outcome, reply_to, error)
        unreceivable: InvalidRequest | None = None
        try:
            # Refused only once the claim is read (no call made): a lapsed owner's call must be
            # accounted on the job's row, however the job ends.
            unreceivable = await self._unreceivable(message, reply_to)
            if _channel_gone(message):
                # The broker delivers it again: claimed here, its redelivery would wait on it.
                raise ChannelInvalidStateError(f"job {job.job_id}'s channel is closed")
            straight = self._straight(message, job, admitted, unreceivable)
            # None too for a model the catalog lacks (its estimate walks the chain): refused in
            # its turn, before admission.
            ahead = self._admission.ahead(job) if straight else None
            first = self._first_call(job, ahead) if straight else None
            claim = await self._claims.take(
                job,
                redelivered=bool(message.redelivered),
                ahead=ahead,
                first=None if first is None else first[0],
                reply_to=reply_to,
            )
        except Exception as exc:  # a different request under the id, answered before, a fault
            error = _error_of(exc, job.job_id)
            # One answered before is refused as that wherever its reply queue is: its own row
            # counts it, and a row for an unreceivable refusal would count it again.
            why = error if unreceivable is None or error.code in UNACCOUNTED else unreceivable
            outcome = await admitted.stamp(
                refused(job.job_id, team, job.model, why, timing, message=message)
            )
            return self._refused(job.job_id, outcome, reply_to, why)
        if unreceivable is not None:
            if not isinstance(claim, Claim):
                # Answered before, by a delivery that may have died before accounting it: a
                # served job, neither refused nor dead-lettered, its stored event sent again.
                log.info(
                    "job %s was already answered and %s: accounting its stored outcome",
                    job.job_id,
                    unreceivable.message,
                )
                return Announcement.of(
                    claim, None, lapsing=self._claims.lapsing(job), usage_as_stored=True
                )
            if claim.lost:
                marks = admitted.marks(claim.fingerprint)
                outcome = failed(job.job_id, team, job.model, unreceivable, timing, marks=marks)
                return await self._ended(claim, admitted, outcome, reply_to, unreceivable)
            # Refused uncalled: what a lapsed owner reserved goes, while the claim is held.
            await self._admission.charge(job.team, job.model, job.job_id, claim.owed_usd)
            await claim.abandon()
            outcome = await admitted.stamp(
                refused(job.job_id, team, job.model, unreceivable, timing, message=message)
            )
            return self._refused(job.job_id, outcome, reply_to, unreceivable)
        if not isinstance(claim, Claim):
            log.info("job %s was already answered; sending the stored result again", job.job_id)
            return Announcement.of(claim, reply_to, lapsing=self._claims.lapsing(job))
        return await self._held(
            message,
            job,
            claim,
            admitted=admitted,
            ahead=ahead,
            estimate=None if first is None else first[1],
            reply_to=reply_to,
            timing=timing,
        )

    async def _held(
        self,
        message: AbstractIncomingMessage,
        job: ChatJob,
        claim: Claim,
        *,
        admitted: Admitted,
        ahead: Ahead | None,
        estimate: Estimate | None,
        reply_to: str | None,
        timing: Timing,
    ) -> Announcement:
        """Answer a job this delivery holds (or missed the claim of: ``Claim.take_up``).
        Its outcome is built with the gate's marks (``Admitted.marks``, once screened: the
        PII found is among them), as ``_ended`` expects. ``estimate``: the job's, made for
        its first call's record (``_first_call``), which admission takes as its own."""
        error: JobError | None = None
        # Made here: a streamed job that fails names the stream its chunks went in, as one
        # served does (its reader takes an answer of another stream, or none, as broken).
        relay = relay_for(job, reply_to, self._publisher, _held_by(message))
        stream = None if relay is None else relay.stream
        try:
            try:
                sent = await admitted.screen()
                marks = admitted.marks(claim.fingerprint)
                outcome = await self._answer(
                    sent, relay, timing, claim, ahead, estimate=estimate, marks=marks
                )
            except JobError as exc:
                error = exc
                marks = admitted.marks(claim.fingerprint)
                outcome = failed(
                    job.job_id, job.team, job.model, exc, timing, marks=marks, stream=stream
                )
                # Its end is stored as the job's outcome: not before another delivery's, which
                # may be calling (one refused over budget would answer a job that was called).
                await claim.take_up(job)
        except Duplicate as duplicate:
            return await self._duplicate(
                duplicate, message, job, admitted=admitted, reply_to=reply_to, timing=timing
            )
        except Exception as exc:
            if isinstance(exc, TRANSIENT):
                await claim.abandon()
                raise
            # Busy and Poison are raised again there, the claim kept: another delivery holds
            # the job (taken up once admitted), or it is dead-lettered, as from the first take.
            error = _error_of(exc, job.job_id)
            marks = admitted.marks(claim.fingerprint)
            outcome = failed(
                job.job_id, job.team, job.model, error, timing, marks=marks, stream=stream
            )
        except BaseException:
            await claim.abandon()
            raise
        return await self._ended(claim, admitted, outcome, reply_to, error)

    async def _ended(
        self,
        claim: Claim,
        admitted: Admitted,
        outcome: Outcome,
        reply_to: str | None,
        error: JobError | None,
    ) -> Announcement:
        """Store and announce the outcome of a delivery that held the claim, with the calls
        its lapsed owners made on its usage row and in its budget ledger. ``outcome`` is
        built with the gate's marks (``Admitted.marks``) where it has them, else stamped
        here."""
        try:
            stamped = (
                outcome
                if admitted.marks(claim.fingerprint) is not None
                else await admitted.stamp(outcome, claim.fingerprint)
            )
        except BaseException:
            await claim.settle()  # what would have ridden with the store
            raise
        # Held while Redis stores it (the pool's connections are where most jobs wait).
        outcome = shared_fields(await self._billed(claim, stamped))
        # Made once, for its store and its announcement alike.
        try:
            dumped = as_json(outcome)
        except Exception:
            log.exception(
                "job %s: its outcome cannot be written; answering an error", claim.job.job_id
            )
            outcome = unwritable(outcome)
            dumped = as_json(outcome)
        stored = await claim.finish(outcome, dumped=dumped)
        lapsing = self._claims.lapsing(claim.job)
        if stored is not outcome:  # another delivery's, stored first
            late = outcome_of_late(
                stored, stamped, outcome.usage.claim, claim.estimated(stamped.usage.attempt_log)
            )
            if late.usage.job_id != stored.usage.job_id:  # a late row of its own
                await self._claims.spent_late(late.usage)
            # The job has one entry in its budget ledger, which this delivery's settle (with
            # the store) made its own calls' alone: the first's held until accounting's next
            # reconciliation (30 s), jobs admitted meanwhile as if it were not spent.
            both = stored.usage.cost_usd + (late.usage.cost_usd if late is not stored else 0)
            await self._admission.charge(claim.job.team, claim.job.model, claim.job.job_id, both)
            return self._finished(late, reply_to, error, lapsing)
        return self._finished(outcome, reply_to, error, lapsing, dumped)

    async def _billed(self, claim: Claim, outcome: Outcome, *, swept: bool = False) -> Outcome:
        """The outcome of a job whose claim this delivery (or sweep) holds, with the calls
        its lapsed owners made on its usage row and in its result, and charged to its
        budget ledger. ``swept``: ended by no call of its own, its lost calls billed at
        their estimates while they may still be running (``Admission.charge``)."""
        if not claim.charged:
            job = claim.job
            await self._admission.charge(
                job.team, job.model, job.job_id, claim.owed_usd, running=swept
            )
        return claim.account(outcome)

    async def sweep(self) -> None:
        """Answer and bill the jobs whose owners died mid-call and that then expired in their
        queues (``Claims.lapsed``), as their redeliveries would have: the ``deadline_exceeded``
        result to the job's reply queue, a usage row under its id with the lost calls, and
        the ledger charged. Each job's outcome is stored, so a delivery of it still to come
        is answered from it.

        And announce again the stored outcomes of jobs answered whose worker died before
        their usage batch was confirmed (perhaps before publishing their results), then
        expired in their queues, as their redeliveries would have: the result to the reply
        queue stored with it, then its usage event; not charged again (the ledger was
        settled with the outcome's store)."""
        lapsed = await self._claims.lapsed()
        await self._account(lapsed.answered)
        for claim in lapsed.claims:
            job = claim.job
            expired = DeadlineExceeded(
                f"deadline passed in the queue after the worker calling it stopped; its "
                f"{len(claim.lost)} lost call(s) are billed"
            )
            try:
                await self._bill_lost(claim, expired, answered=True)
            except Exception:
                # A service gone (or a fault here): the claim is let go, to be swept again.
                log.exception("lapsed job %s of team %s is swept again later", job.job_id, job.team)
                await claim.abandon()
                continue
            log.info(
                "job %s of team %s expired after its worker died mid-call: it is answered "
                "and its lost calls are billed",
                job.job_id,
                job.team,
            )

    async def _account(self, answered: list[Unaccounted]) -> None:
        """Announce the stored outcomes of ``answered`` again, together: each result to the
        reply queue stored with it, if any (the client drops a result it had by job id),
        then its usage event; one that fails is swept again a lease later."""
        announced = [
            Announcement.of(outcome, outcome.reply_to, lapsing=key, usage_as_stored=True)
            for key, outcome in answered
        ]
        sent = await asyncio.gather(*map(self._announce, announced), return_exceptions=True)
        for announcement, done in zip(announced, sent, strict=True):
            job_id = announcement.job_id
            if isinstance(done, BaseException):
                log.warning("answered job %s is announced again later: %s", job_id, done)
            else:
                log.info(
                    "job %s expired after its worker died answering it, before accounting "
                    "it: its stored result and usage are sent again",
                    job_id,
                )

    async def _bill_lost(self, claim: Claim, error: JobError, *, answered: bool) -> None:
        """End the job of ``claim`` with ``error``, billing the calls its dead owners made:
        a usage row under its id, the ledger charged, and the outcome stored (answering any
        delivery still to come). ``answered``: its result goes to the job's reply queue
        first, as a delivery announces it (a swept job's); else its client is not answered
        (a poison job is dead-lettered unanswered). Announced before the claim ends, so that
        a failure between the two bills them once when tried again (usage_log keeps a job's
        first row, the charge replaces its entry, the client drops a second result by job
        id)."""
        job = claim.job
        timing = Timing(0.0, self._worker)
        outcome = failed(job.job_id, job.team, job.model, error, timing)
        # Naming the request it answers, as a delivery's stamped outcome does: a delivery
        # still to come is answered from it, and a client drops a result naming another.
        result = outcome.result.model_copy(update={"request": claim.fingerprint})
        outcome = await self._billed(
            claim, outcome.model_copy(update={"result": result}), swept=True
        )
        await self._announce(Announcement.of(outcome, job.reply_to if answered else None))
        await claim.finish(outcome, accounted=True)

    async def _unreceivable(
        self, message: AbstractIncomingMessage, reply_to: str | None
    ) -> InvalidRequest | None:
        """Why the job's result could reach nobody, if it could not: it is refused before it
        costs anything."""
        if not message.reply_to:
            return InvalidRequest("the job has no reply_to: its result would reach nobody")
        if reply_to is not None and not await self._replies.exists(reply_to):
            return InvalidRequest(f"reply queue {reply_to!r} does not exist")
        return None

    def _finished(
        self,
        outcome: Outcome,
        reply_to: str | None,
        error: JobError | None,
        lapsing: str | None = None,
        dumped: tuple[bytes, bytes] | None = None,
    ) -> Announcement:
        self._telemetry.finished(outcome)
        if tracing.ON:
            spans.finished(outcome)
        return Announcement.of(outcome, reply_to, error, lapsing=lapsing, dumped=dumped)

    def _refused(
        self, job_id: str, outcome: Outcome, reply_to: str | None, error: JobError
    ) -> Announcement:
        if isinstance(error, WorkerFault):
            return self._finished(outcome, reply_to, error)  # logged in full (``_error_of``)
        # Said in the log too: a refusal is a team's app misbehaving, or someone forging.
        log.warning(
            "job %r for team %s refused (%s, published by %s): %s",
            clipped(job_id),
            outcome.usage.team,
            error.code,
            outcome.usage.identity,
            error.message,
        )
        return self._finished(outcome, reply_to, error)

    def _decode(self, message: AbstractIncomingMessage) -> ChatJob:
        check_headers_read(message.headers)
        content_type = (message.content_type or CONTENT_TYPE).split(";")[0].strip().lower()
        if content_type != CONTENT_TYPE:
            raise InvalidRequest(
                f"content_type {clipped(message.content_type or '')!r} is not supported; "
                f"jobs are {CONTENT_TYPE}"
            )
        size, limit = len(message.body), self._max_job_bytes
        if size > limit + JOB_OWN_BYTES:
            raise InvalidRequest(
                f"job is {size} bytes; the limit is {limit + JOB_OWN_BYTES} ({limit} of its "
                "request)"
            )
        try:
            # Held until it is answered, with thousands of others: its fields sets shared.
            job = shared_fields(ChatJob.model_validate_json(message.body))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "body"
            problem = first["msg"].removeprefix("Value error, ")
            # A parameter or message refused as OpenAI types it is named as the front door
            # names it.
            refused = refused_param(first)
            param = refused.param if refused is not None else None
            if refused is not None and where != "params":
                where, problem = refused.param, refused.problem
            raise InvalidRequest(f"not a valid chat job: {where}: {problem}", param=param) from exc
        if job.v > SCHEMA_VERSION:
            raise InvalidRequest(
                f"schema version {job.v} is newer than this worker's ({SCHEMA_VERSION}); "
                "upgrade the workers, then replay it from the dead letters"
            )
        if message.message_id and message.message_id != job.job_id:
            raise InvalidRequest(
                f"message_id {clipped(message.message_id)!r} differs from job_id "
                f"{clipped(job.job_id)!r}"
            )
        if len(job.messages) > self._max_job_messages:
            raise InvalidRequest(
                f"job has {len(job.messages)} messages; the limit is {self._max_job_messages}"
            )
        # Measured only past the limit, as the front door measures it: a smaller job's
        # request is smaller still.
        if size > limit and (request := request_bytes(job)) > limit:
            raise InvalidRequest(f"job's request is {request} bytes; the limit is {limit}")
        return job

    def _straight(
        self,
        message: AbstractIncomingMessage,
        job: ChatJob,
        admitted: Admitted,
        unreceivable: InvalidRequest | None,
    ) -> bool:
        """Whether the job goes from its claim straight to admission, so that its budget
        reserve and first take of its team's buckets (``Admission.ahead``) and, with nothing
        to wait for, the record of its first call (``_first_call``) run with its claim in one
        round trip: the common job, that reaches admission with no other round trip of its
        own between (a cache lookup, a usage_log lookup of a redelivery), as the job it
        screened is the job it admits (no PII policy), and not past its deadline already.
        One that ends before admission all the same gives them back with its claim
        (``Ahead.undo``), and its claim's end drops the record.

        A job past its deadline is refused before admission (``_serve``): taken with its
        claim, its request would go back only a round trip later, and a backlog of jobs that
        expired in their queue would meanwhile hold the team's requests that the live jobs
        among them need, sending those to wait in line, where a deadline refuses them."""
        return not (
            unreceivable is not None
            or message.redelivered
            or _past(_monotonic_deadline(job.deadline))
            or admitted.screens
            or wanted(job, self._admission.config(job.team))
        )

    def _first_call(self, job: ChatJob, ahead: Ahead | None) -> tuple[LostCall, Estimate] | None:
        """The record of the job's first call, to write with its claim, when the call goes
        as soon as it is admitted: to the one deployment the router would pick (``first_call``)
        with nothing of admission to wait for (no bucket of its team's or the deployment's, or
        their takes ride with the claim before the record: ``Admission.straight``). A record
        written long before its call would, should the worker die meanwhile, bill a call that
        never left, and count a failure against the delivery limit; with nothing to wait for,
        the call leaves within the same CPU work as it would after a round trip of its own."""
        first = self._router.first_call(job)
        if first is None:
            return None
        alias, deployment = first
        needed = self._admission.straight(job, deployment, ahead)
        return None if needed is None else (planned_call(alias, deployment, needed), needed)

    async def _answer(
        self,
        job: ChatJob,
        relay: StreamRelay | None,
        timing: Timing,
        claim: Claim,
        ahead: Ahead | None,
        *,
        estimate: Estimate | None,
        marks: Marks | None,
    ) -> Outcome:
        """From the response cache when the job (or its team) wants it, else from the router
        (streamed through ``relay`` when the job asks for it); built with ``marks``."""
        cache = wanted(job, self._admission.config(job.team))
        hit = await self._cache.get(job) if cache else None
        stream = None if relay is None else relay.stream
        if hit is not None:
            if relay is not None:
                await relay.replay(hit.response, hit.model_used)
            return served(job, hit, timing, cached=True, marks=marks, stream=stream)
        routed = await self._serve(job, relay, claim, ahead, estimate)
        if cache:
            await self._cache.put(job, routed)
        return served(job, routed, timing, marks=marks, stream=stream)

    async def _serve(
        self,
        job: ChatJob,
        relay: StreamRelay | None,
        claim: Claim,
        ahead: Ahead | None,
        estimate: Estimate | None,
    ) -> Routed:
        deadline = _monotonic_deadline(job.deadline)
        if _past(deadline):
            raise DeadlineExceeded(f"deadline {job.deadline} passed before the job was served")
        # Below the broker's consumer timeout, which would take the job back mid-call.
        limit = time.monotonic() + self._job_time_limit
        deadline = limit if deadline is None else min(deadline, limit)
        await self._cancels.check(job)
        self._router.check(job)
        # Checked again while it waits for admission, and once admitted (Admission.admit).
        claim.charged = True  # from here admission charges the lapsed owners' calls
        if ahead is not None and ahead.replies:
            claim.settle_with(None)  # what ran with the claim is admission's to settle now
        admitting = self._admission.admit(
            job, deadline, self._cancels.watch(job), claim.owed_usd, ahead, estimated=estimate
        )
        if tracing.ON:
            attributes = {"queuegate.team": job.team, "queuegate.job_id": job.job_id}
            admitting = tracing.traced(admitting, f"admission {job.team}", attributes=attributes)
        ticket = await admitting
        # A finished coroutine keeps its frame's memory for as long as it is referenced
        # (Python 3.11), and this one would be for the whole call: jobs hold thousands.
        del admitting
        spent: Billed | None = None
        config, priced = self._admission.config, ticket.priced

        def capped(alias: str) -> bool:
            # Capped as the config is when the job gets there (a cap put in force since its
            # admission holds), or when the job was priced (its reservation leaves it out).
            return capped_fallback(config(job.team), job.model, alias) or (
                priced is not None and capped_fallback(priced, job.model, alias)
            )

        try:
            routed = await self._router.complete(
                job,
                deadline=deadline,
                until=limit,
                on_delta=relay,
                gate=claim.gate(job, ticket, self._router.catalog),
                unsupported_params=config(job.team).unsupported_params,
                capped=capped,
            )
        except BaseException as exc:
            if isinstance(exc, JobError):
                # What its calls still cost: on its row and result (outcome.failed) alike.
                exc.billed = spent = claim.spent(exc)
            elif isinstance(exc, Duplicate):
                # Uncalled: another delivery answered the job, whose entry this one's
                # reservation replaced.
                exc.charged = ticket.answered(exc.answered_usd)
            elif isinstance(exc, Busy):
                ticket.leave_budget()  # uncalled: another delivery holds the job
            await ticket.settle(spent)
            raise
        routed = claim.served(routed)
        # Settled in the round trip that stores the outcome (or when the claim is let go).
        claim.settle_with(ticket.settlement(routed))
        return routed

    async def _duplicate(
        self,
        duplicate: Duplicate,
        message: AbstractIncomingMessage,
        job: ChatJob,
        *,
        admitted: Admitted,
        reply_to: str | None,
        timing: Timing,
    ) -> Announcement:
        """End a job that, taking up its claim, found another delivery's outcome (sent again,
        as to any duplicate) or a refusal (as its first take would have been refused).

        Its budget entry holds the answer's cost again, which a reservation of this
        delivery's (made while its claim was missed) replaced: the job's own usage row counts
        it once. Settled with its admission's other settles when it was admitted, else
        here."""
        if not duplicate.charged:
            cost = duplicate.answered_usd
            await self._admission.charge(job.team, job.model, job.job_id, cost)
        found = duplicate.found
        if isinstance(found, Outcome):
            log.info("job %s was answered by another delivery; sending its result", job.job_id)
            return Announcement.of(found, reply_to, lapsing=self._claims.lapsing(job))
        outcome = await admitted.stamp(
            refused(job.job_id, job.team, job.model, found, timing, message=message)
        )
        return self._refused(job.job_id, outcome, reply_to, found)

    async def _finish(
        self,
        delivery: Delivery,
        original: AbstractIncomingMessage | None,
        announcement: Announcement,
        queue: str,
    ) -> None:
        """Announce the job, then acknowledge it; ``original``, the delivery, is given only
        when the job is bad input, which is also dead-lettered."""
        # As _announce does, without its frame: thousands of jobs wait here for their batch
        # when the broker is the slowest stage.
        try:
            usage, received = await self._reply(announcement, delivery.held)
        except CONNECTION_LOST:
            # The delivery is gone with its team's connection: the job comes back and is
            # answered from its stored outcome. Its usage goes now all the same (accounting
            # keeps one row a job id, so the redelivery's is dropped): waiting for that
            # redelivery left a called job unbilled for as long as its team's queue is not
            # consumed (a team disabled while its own requests kept its connection down).
            # Not raised in its place: the redelivery accounts it should this fail.
            if announcement.usage is not None:
                with contextlib.suppress(AMQPError, ServiceUnavailable, *CONNECTION_LOST):
                    await self._accounting(announcement.usage, announcement.lapsing)
            raise
        if usage is not None:
            # Acknowledged below only once the batch carrying the event is confirmed.
            await self._accounting(usage, announcement.lapsing)
        error = announcement.bad_input
        if error is not None:
            assert original is not None
            await self._publisher.dead_letter(
                original,
                reason=error.code,
                detail=error.message,
                queue=queue,
                user=self._gate.first_user(original),
                first=self._gate.first_cause(original),
                unanswered=not received,
            )
        await settle(delivery.ack(), f"acknowledge job {announcement.job_id}", log)

    async def _announce(self, announcement: Announcement) -> None:
        """Publish the result, then the usage event, each once the broker confirms it: for
        a job no delivery holds (a sweep's), its result not after a lost connection
        (``Publisher.result``)."""
        usage, _ = await self._reply(announcement, _unheld)
        if usage is not None:
            await self._accounting(usage, announcement.lapsing)

    async def _reply(
        self, announcement: Announcement, held: Callable[[], bool]
    ) -> tuple[bytes | None, bool]:
        """Send the result to its reply queue, if any, once the broker confirms it (sent
        again after a lost connection only while ``held``: ``Publisher.result``); the usage
        event to send then, marked ``reply_delivered = false`` when that queue is gone or
        full, and whether the result reached a reply queue."""
        reply_to = announcement.reply_to
        if not reply_to:
            return announcement.usage, False
        answering = self._publisher.result(
            announcement.team, reply_to, announcement.job_id, announcement.result, held=held
        )
        if tracing.ON:
            answering = tracing.traced(
                answering,
                "publish result",
                kind="PRODUCER",
                attributes={
                    "messaging.system": "rabbitmq",
                    "messaging.destination.name": reply_to,
                },
            )
        if await answering:
            return announcement.usage, True
        return announcement.undelivered_usage(), False

    def _accounting(self, usage: bytes, lapsing: str | None) -> Awaitable[None]:
        """The usage event in the worker's next batch: done once the broker confirms it.
        Not a coroutine of its own, so that a job waiting for its batch (thousands do, when
        the broker is the slowest stage) holds no frame more."""
        accounting = self._publisher.usage(usage, lapsing)
        if tracing.ON:
            accounting = tracing.traced(
                accounting,
                "publish usage",
                kind="PRODUCER",
                attributes={"messaging.system": "rabbitmq"},
            )
        return accounting


MAX_QUEUED_MS = 7 * 24 * 3600 * 1000
"""The longest wait in a queue a job's send time is believed for: a week, as long as its
result is kept by default (``QUEUEGATE_RESULT_TTL``)."""


def _error_of(exc: Exception, job_id: str) -> JobError:
    """What a job whose delivery raised ``exc`` is answered with: ``exc`` itself when it is
    the job's error, else a ``WorkerFault`` naming it, logged here in full: not a service
    coming and going (``TRANSIENT``), so the next delivery would fail the same way, and the
    job would loop to the delivery limit without an answer. It ends here.

    Raises ``exc`` again when the job is not to be answered now: a service lost (it comes
    back to its queue), ``Busy`` (another delivery holds it), ``Poison`` (dead-lettered)."""
    if isinstance(exc, JobError):
        return exc
    if isinstance(exc, (*TRANSIENT, Busy, Poison)):
        raise exc
    log.error("job %s failed in the worker; answering it with an error", job_id, exc_info=exc)
    return WorkerFault(
        f"the gateway failed on this job ({type(exc).__name__}); "
        "its operators have the details in the worker's log",
    )


def _channel_gone(message: AbstractIncomingMessage) -> bool:
    try:
        return message.channel.is_closed  # aio-pika raises instead, once it is
    except ChannelInvalidStateError:
        return True


def _held_by(message: AbstractIncomingMessage) -> Callable[[], bool]:
    """Whether the delivery of ``message`` is still open (``Delivery.held``)."""
    return lambda: not _channel_gone(message)


def _unheld() -> bool:
    """For a job no delivery holds: a sweep's."""
    return False


def _queued_ms(message: AbstractIncomingMessage) -> float:
    """How long the job waited in its queue, from the send time its publisher stamped on it;
    0 when it has none to believe.

    The time is the publisher's word (a team's own AMQP client sets it as it likes): one in
    the future or more than ``MAX_QUEUED_MS`` ago is a skewed clock or a forgery, and is
    ignored. Believed, it would record a wait of years in the queue-wait metric and
    usage_log, and start the ``queued`` span before 1970, which fails the export of every
    span batched with it.
    """
    # The AMQP timestamp has whole seconds only; producers also send milliseconds.
    sent = (message.headers or {}).get(HEADER_SENT_MS)
    if not isinstance(sent, int | float) or isinstance(sent, bool):
        published = message.timestamp
        if published is None:
            return 0.0
        if published.tzinfo is None:
            published = published.replace(tzinfo=UTC)
        sent = published.timestamp() * 1000
    waited = time.time() * 1000 - sent
    return waited if 0 <= waited <= MAX_QUEUED_MS else 0.0


def _past(deadline: float | None) -> bool:
    """Whether a monotonic ``deadline`` (None: none) has come."""
    return deadline is not None and deadline <= time.monotonic()


def _monotonic_deadline(deadline: datetime | None) -> float | None:
    if deadline is None:
        return None
    if deadline.tzinfo is None:
        deadline = deadline.replace(tzinfo=UTC)
    return time.monotonic() + (deadline - datetime.now(UTC)).total_seconds()
