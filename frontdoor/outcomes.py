"""Finished jobs as the workers stored them in Redis, read by team and job id.

Workers keep each job's outcome (``queuegate.keys.Keys.result``, per team) for
``result_ttl``; the front door reads it for an async job (``GET /v1/jobs/<id>``), for a
caller that came back after a disconnect, and for a retry under the same idempotency key.
Keys carry the team, so a team reads only its own jobs, whatever id it names::

    outcomes = Outcomes(redis, keys, ttl=settings.result_ttl, time_limit=settings.job_time_limit)
    await outcomes.accept(job)                   # before publishing: the id is known
    state = await outcomes.look(team, job_id)    # Finished(...), "pending" or "unknown"
    bound = await outcomes.bind(job)             # an Idempotency-Key's job id to its request
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from frontdoor.chat_request import key_conflict
from queuegate.errors import ServiceUnavailable
from queuegate.keys import Keys
from queuegate.messages import AnswerFormat, ChatJob, ChatResult, request_digest
from workers.claims import binding, stored_outcome


@dataclass(frozen=True)
class Binding:
    """A job id bound to its request."""

    answered: ChatResult | None
    """The request's result, when it was answered."""
    retry: bool
    """Whether the id was bound to this request before: the job may be in flight."""


@dataclass(frozen=True)
class Finished:
    result: ChatResult
    answer_format: AnswerFormat
    """The API of the route that published the job, which its answer read by id takes."""


Pending = Literal["pending", "unknown"]
"""``pending``: the front door published the job and no outcome is stored yet."""


class Outcomes:
    def __init__(self, client: aioredis.Redis, keys: Keys, *, ttl: int, time_limit: float) -> None:
        self._client = client
        self._keys = keys
        self._ttl = ttl
        self._time_limit = time_limit
        """The longest a worker spends on a job once it has begun."""
        self._bind = binding(client)

    async def accept(self, job: ChatJob) -> None:
        """Remember that the job was published, and the API its caller reads it in, for as
        long as its outcome will be kept: that is kept ``ttl`` from the job's end, which
        comes by its deadline and a worker's time limit after it at the latest. (A job
        without a deadline, an async one, may wait in its queue longer than that.)"""
        ends = 0.0 if job.deadline is None else (job.deadline - datetime.now(UTC)).total_seconds()
        keep = self._ttl + math.ceil(max(0.0, ends) + self._time_limit)
        accepted = self._keys.accepted(job.team, job.job_id)
        try:
            await self._client.set(accepted, job.answer_format.encode(), ex=keep)
        except RedisError as exc:
            raise _unavailable(exc) from exc

    async def look(self, team: str, job_id: str) -> Finished | Pending:
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.get(self._keys.result(team, job_id))
                pipe.get(self._keys.accepted(team, job_id))
                raw, accepted = await pipe.execute()
        except RedisError as exc:
            raise _unavailable(exc) from exc
        if raw is not None and (outcome := stored_outcome(raw)) is not None:
            # A front door before the format was kept wrote b"1", as any other caller's job
            # is answered in OpenAI's format
            answer_format: AnswerFormat = "anthropic" if accepted == b"anthropic" else "openai"
            return Finished(outcome.result, answer_format)
        return "pending" if accepted is not None else "unknown"

    async def bind(self, job: ChatJob) -> Binding:
        """Bind the job's id to this very request, before it is published: a retry of the
        same request is bound already (or answered), a different one is refused
        (IdempotencyConflict) and must never be published, nor wait for the job."""
        keys = [self._keys.claim(job.team, job.job_id), self._keys.result(job.team, job.job_id)]
        try:
            reply = await self._bind(keys=keys, args=[request_digest(job), self._ttl])
        except RedisError as exc:
            raise _unavailable(exc) from exc
        status = reply[0].decode()
        if status == "conflict":
            raise key_conflict()
        if status == "stored":
            outcome = stored_outcome(reply[1])
            return Binding(None if outcome is None else outcome.result, retry=True)
        return Binding(None, retry=reply[1] == 0)


def _unavailable(exc: RedisError) -> ServiceUnavailable:
    return ServiceUnavailable(f"Redis is unreachable ({type(exc).__name__}); retry shortly")


__all__ = ["Binding", "Finished", "Outcomes", "Pending"]
