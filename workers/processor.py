"""One job's path through a worker, from delivery to acknowledgement.

decode → validate → team → deadline → already finished? → router → store outcome →
publish result (confirmed) → publish usage (confirmed) → dead-letter bad input → ack.

The outcome is stored before it is announced: a crash after that point redelivers the job,
and the redelivery is answered from the store instead of calling the provider again.
"""

from __future__ import annotations

import contextlib
import logging
import time
from datetime import UTC, datetime

import aiormq
from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError

from queuegate.errors import DeadlineExceeded, InvalidRequest, JobError, Unauthorized
from queuegate.messages import ChatJob
from queuegate.topology import HEADER_SENT_MS
from router import Routed, Router
from workers.batch_cancel import BatchCancels
from workers.outcome import Outcome, Timing, failed, served
from workers.publisher import Publisher
from workers.store import OutcomeStore

log = logging.getLogger(__name__)

BAD_INPUT = frozenset({"invalid_request", "unknown_model", "unauthorized"})
"""Error codes that mean the job itself is wrong: it is answered and also dead-lettered."""


class JobProcessor:
    def __init__(
        self,
        *,
        router: Router,
        store: OutcomeStore,
        publisher: Publisher,
        worker: str,
        max_job_bytes: int,
        cancels: BatchCancels,
    ) -> None:
        self._router = router
        self._store = store
        self._publisher = publisher
        self._worker = worker
        self._max_job_bytes = max_job_bytes
        self._cancels = cancels

    async def process(self, message: AbstractIncomingMessage, team: str, queue: str) -> None:
        """Answer, account and acknowledge one delivery; on an unexpected failure, requeue it."""
        try:
            await self._process(message, team, queue)
        except Exception:
            log.exception(
                "job %s failed in the worker; returning it to the queue", message.message_id
            )
            # If the channel is gone the broker requeues the job by itself.
            with contextlib.suppress(aiormq.exceptions.AMQPError, RuntimeError):
                await message.nack(requeue=True)

    async def _process(self, message: AbstractIncomingMessage, team: str, queue: str) -> None:
        timing = Timing(queued_ms=_queued_ms(message), worker=self._worker)
        try:
            job = self._decode(message, team)
        except JobError as exc:
            job_id = message.correlation_id or message.message_id or "unknown"
            await self._finish(message, failed(job_id, team, "", exc, timing), queue, exc)
            return
        stored = await self._store.get(job.job_id)
        if stored is not None:
            log.info("job %s was already answered; sending the stored result again", job.job_id)
            await self._announce(message, stored)
            await message.ack()
            return
        error: JobError | None = None
        try:
            outcome = served(job, await self._serve(job), timing)
        except JobError as exc:
            error = exc
            outcome = failed(job.job_id, job.team, job.model, exc, timing)
        await self._store.put(outcome)
        await self._finish(message, outcome, queue, error)

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
        return job

    async def _serve(self, job: ChatJob) -> Routed:
        deadline = _monotonic_deadline(job.deadline)
        if deadline is not None and deadline <= time.monotonic():
            raise DeadlineExceeded(f"deadline {job.deadline} passed before the job was served")
        await self._cancels.check(job)
        self._router.check(job)
        return await self._router.complete(job, deadline=deadline)

    async def _finish(
        self,
        message: AbstractIncomingMessage,
        outcome: Outcome,
        queue: str,
        error: JobError | None,
    ) -> None:
        await self._announce(message, outcome)
        if error is not None and error.code in BAD_INPUT:
            await self._publisher.dead_letter(
                message, reason=error.code, detail=error.message, queue=queue
            )
        await message.ack()

    async def _announce(self, message: AbstractIncomingMessage, outcome: Outcome) -> None:
        usage = outcome.usage
        if message.reply_to:
            if not await self._publisher.result(message.reply_to, outcome.result):
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
