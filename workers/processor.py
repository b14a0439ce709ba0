"""One job's path through a worker, from delivery to acknowledgement.

decode → validate → team → proven publisher → already finished? → PII policy → deadline →
cache → admission (budget, team buckets) → router (each deployment's buckets; streaming
deltas to reply_to) → settle admission → store outcome → publish result (confirmed) →
publish usage (confirmed) →
dead-letter bad input → ack.

The outcome is stored before it is announced: a crash after that point redelivers the job,
and the redelivery is answered from the store instead of calling the provider again.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError

from queuegate.broker import CONNECTION_LOST, settle
from queuegate.errors import DeadlineExceeded, InvalidRequest, JobError, Unauthorized
from queuegate.messages import ChatJob
from queuegate.topology import HEADER_SENT_MS
from router import Routed, Router
from workers.admission import Admission
from workers.batch_cancel import BatchCancels
from workers.cache import ResponseCache, wanted
from workers.gate import Gate
from workers.outcome import Outcome, Timing, failed, refused, served
from workers.publisher import Publisher
from workers.store import OutcomeStore
from workers.streaming import StreamRelay, relay_for
from workers.telemetry import Telemetry

log = logging.getLogger(__name__)

BAD_INPUT = frozenset({"invalid_request", "unknown_model", "unauthorized"})
"""Error codes that mean the job itself is wrong: it is answered and also dead-lettered."""


class JobProcessor:
    def __init__(
        self,
        *,
        router: Router,
        store: OutcomeStore,
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
        self._store = store
        self._cache = cache
        self._publisher = publisher
        self._worker = worker
        self._max_job_bytes = max_job_bytes
        self._max_job_messages = max_job_messages
        self._gate = gate
        self._telemetry = telemetry
        self._job_time_limit = job_time_limit
        self._cancels = cancels

    async def process(self, message: AbstractIncomingMessage, team: str, queue: str) -> None:
        """Answer, account and acknowledge one delivery; on an unexpected failure, requeue it."""
        try:
            await self._process(message, team, queue)
        except CONNECTION_LOST as exc:
            # The delivery's channel died with the connection: the broker delivers the job
            # again, and the outcome stored before it was announced answers it.
            log.info("job %s: its channel is gone (%s); it comes back", message.message_id, exc)
        except Exception:
            log.exception(
                "job %s failed in the worker; returning it to the queue", message.message_id
            )
            await settle(message.nack(requeue=True), f"return job {message.message_id}", log)

    async def _process(self, message: AbstractIncomingMessage, team: str, queue: str) -> None:
        timing = Timing(queued_ms=_queued_ms(message), worker=self._worker)
        # Results and streamed deltas go only to a reply queue the team may use.
        reply_to = await self._gate.reply_to(message, team)
        try:
            job = self._decode(message, team)
        except JobError as exc:
            job_id = message.correlation_id or message.message_id or "unknown"
            outcome = refused(job_id, team, "", exc, timing)
            await self._finish(message, outcome, queue, exc, reply_to)
            return
        try:
            # Before the stored result: only a proven publisher may have it sent again. A
            # refusal is not stored, or a forger could answer the real job in advance.
            admitted = await self._gate.admit(message, job, team)
        except JobError as exc:
            outcome = self._gate.claimed(message, refused(job.job_id, team, job.model, exc, timing))
            await self._finish(message, outcome, queue, exc, reply_to)
            return
        stored = await self._store.get(team, job.job_id)
        if stored is not None:
            log.info("job %s was already answered; sending the stored result again", job.job_id)
            await self._announce(stored, reply_to)
            await settle(message.ack(), f"acknowledge job {job.job_id}", log)
            return
        error: JobError | None = None
        try:
            outcome = await self._answer(admitted.screen(), reply_to, timing)
        except JobError as exc:
            error = exc
            outcome = failed(job.job_id, job.team, job.model, exc, timing)
        outcome = admitted.stamp(outcome)
        await self._store.put(outcome)
        await self._finish(message, outcome, queue, error, reply_to)

    def _decode(self, message: AbstractIncomingMessage, team: str) -> ChatJob:
        size = len(message.body)
        if size > self._max_job_bytes:
            raise InvalidRequest(f"job is {size} bytes; the limit is {self._max_job_bytes}")
        try:
            job = ChatJob.model_validate_json(message.body)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "body"
            raise InvalidRequest(f"not a valid chat job: {where}: {first['msg']}") from exc
        if message.message_id and message.message_id != job.job_id:
            raise InvalidRequest(
                f"message_id {message.message_id!r} differs from job_id {job.job_id!r}"
            )
        if job.team != team:
            raise Unauthorized(f"job for team {job.team!r} arrived on team {team!r}'s queue")
        if len(job.messages) > self._max_job_messages:
            raise InvalidRequest(
                f"job has {len(job.messages)} messages; the limit is {self._max_job_messages}"
            )
        return job

    async def _answer(self, job: ChatJob, reply_to: str | None, timing: Timing) -> Outcome:
        """From the response cache when the job (or its team) wants it, else from the router
        (streamed to ``reply_to`` when the job asks for it)."""
        relay = relay_for(job, reply_to, self._publisher)
        cache = wanted(job, self._admission.config(job.team))
        hit = await self._cache.get(job) if cache else None
        if hit is not None:
            if relay is not None:
                await relay.replay(hit.response)
            return served(job, hit, timing, cached=True)
        routed = await self._serve(job, relay)
        if cache:
            await self._cache.put(job, routed)
        return served(job, routed, timing)

    async def _serve(self, job: ChatJob, relay: StreamRelay | None) -> Routed:
        deadline = _monotonic_deadline(job.deadline)
        if deadline is not None and deadline <= time.monotonic():
            raise DeadlineExceeded(f"deadline {job.deadline} passed before the job was served")
        # Below the broker's consumer timeout, which would take the job back mid-call.
        limit = time.monotonic() + self._job_time_limit
        deadline = limit if deadline is None else min(deadline, limit)
        await self._cancels.check(job)
        self._router.check(job)
        ticket = await self._admission.admit(job, deadline)
        routed: Routed | None = None
        try:
            routed = await self._router.complete(
                job, deadline=deadline, on_delta=relay, gate=ticket
            )
        finally:
            await ticket.settle(routed)
        return routed

    async def _finish(
        self,
        message: AbstractIncomingMessage,
        outcome: Outcome,
        queue: str,
        error: JobError | None,
        reply_to: str | None,
    ) -> None:
        await self._announce(outcome, reply_to)
        self._telemetry.finished(outcome)
        if error is not None and error.code in BAD_INPUT:
            await self._publisher.dead_letter(
                message, reason=error.code, detail=error.message, queue=queue
            )
        await settle(message.ack(), f"acknowledge job {outcome.result.job_id}", log)

    async def _announce(self, outcome: Outcome, reply_to: str | None) -> None:
        usage = outcome.usage
        if reply_to:
            if not await self._publisher.result(reply_to, outcome.result):
                usage = usage.model_copy(update={"reply_delivered": False})
        else:
            usage = usage.model_copy(update={"reply_delivered": False})
        await self._publisher.usage(usage)


def _queued_ms(message: AbstractIncomingMessage) -> float:
    # The AMQP timestamp has whole seconds only; producers also send milliseconds.
    sent = (message.headers or {}).get(HEADER_SENT_MS)
    if isinstance(sent, int | float):
        return max(0.0, time.time() * 1000 - sent)
    if message.timestamp is None:
        return 0.0
    published = message.timestamp
    if published.tzinfo is None:
        published = published.replace(tzinfo=UTC)
    return max(0.0, (datetime.now(UTC) - published).total_seconds() * 1000)


def _monotonic_deadline(deadline: datetime | None) -> float | None:
    if deadline is None:
        return None
    if deadline.tzinfo is None:
        deadline = deadline.replace(tzinfo=UTC)
    return time.monotonic() + (deadline - datetime.now(UTC)).total_seconds()
