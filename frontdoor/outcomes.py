"""Finished jobs as the workers stored them in Redis, read by team and job id.

Workers keep each job's outcome (``queuegate.keys.Keys.result``, per team) for
``result_ttl``; the front door reads it for an async job (``GET /v1/jobs/<id>``), for a
caller that came back after a disconnect, and for a retry under the same idempotency key.
Keys carry the team, so a team reads only its own jobs, whatever id it names::

    outcomes = Outcomes(redis, keys, ttl=settings.result_ttl, late=stored_by(settings))
    await outcomes.accept(job)                   # before publishing: the id is known
    state = await outcomes.look(team, job_id)    # Finished(...), Expired(...), "pending"
    bound = await outcomes.bind(job)             # an Idempotency-Key's job id to its request

A job with a deadline whose outcome is not stored ``late`` seconds past it, and whose claim
records no call, never will be: it expired in its queue uncalled (or a worker took it late
and refused it), and ``look`` says so (``Expired``) rather than "pending" for as long as
its id is remembered. One whose claim records a call (its worker died in it) is answered
and billed by the next worker's sweep, whenever a worker runs: it stays "pending".
A retry under its Idempotency-Key publishes an expired job again (``bind``), one a worker
refused late, uncalled, as well as one that expired unseen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from frontdoor.chat_request import key_conflict
from queuegate.errors import ServiceUnavailable
from queuegate.keys import Keys
from queuegate.messages import AnswerFormat, ChatJob, ChatResult, request_digest
from queuegate.settings import Settings
from workers.claims import binding, stored_outcome
from workers.outcome import expired_uncalled


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


@dataclass(frozen=True)
class Expired:
    """A job whose deadline passed ``late`` ago and more with no outcome stored, nor a call
    on its claim: no worker called it, and none will."""

    deadline: datetime
    answer_format: AnswerFormat


Pending = Literal["pending", "unknown"]
"""``pending``: the front door published the job and no outcome is stored yet."""


def stored_by(settings: Settings) -> float:
    """Seconds past a job's deadline by which its outcome is stored, if it ever is: a worker
    that took it in time spends its time limit on it at most, and one that died on it is
    taken over by a worker's sweep (every ``teams_refresh``) once its claim's lease lapsed
    (``workers.claims``: ``Claims.lapsed``). A second sweep's time more: a sweep asks
    PostgreSQL and bills the lost call before it stores, which takes time of its own, and a
    job read as expired too soon would say "nothing billed" of a call billed after it."""
    return settings.job_time_limit + settings.claim_lease + 2 * settings.teams_refresh


class Outcomes:
    def __init__(self, client: aioredis.Redis, keys: Keys, *, ttl: int, late: float) -> None:
        self._client = client
        self._keys = keys
        self._ttl = ttl
        self._late = late
        """Seconds past a job's deadline by which its outcome is stored, if ever
        (``stored_by``)."""
        self._bind = binding(client)

    async def accept(self, job: ChatJob) -> None:
        """Remember that the job was published, the API its caller reads it in and its
        deadline, for as long as its outcome will be kept: that is kept ``ttl`` from the
        job's end, which comes ``late`` past its deadline at the latest. (A job without a
        deadline, an async one, may wait in its queue longer than that.)
        Published again (a retry under its Idempotency-Key), its new deadline holds."""
        ends = 0.0 if job.deadline is None else (job.deadline - datetime.now(UTC)).total_seconds()
        keep = self._ttl + math.ceil(max(0.0, ends) + self._late)
        accepted = self._keys.accepted(job.team, job.job_id)
        try:
            await self._client.set(accepted, _marker(job), ex=keep)
        except RedisError as exc:
            raise _unavailable(exc) from exc

    async def look(self, team: str, job_id: str) -> Finished | Expired | Pending:
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.get(self._keys.result(team, job_id))
                pipe.get(self._keys.accepted(team, job_id))
                pipe.hmget(self._keys.claim(team, job_id), "attempt", "lost")
                raw, accepted, calls = await pipe.execute()
        except RedisError as exc:
            raise _unavailable(exc) from exc
        answer_format, deadline = _read_marker(accepted)
        if raw is not None and (outcome := stored_outcome(raw)) is not None:
            return Finished(outcome.result, answer_format)
        if accepted is None:
            return "unknown"
        # A call on its claim (in flight, or lost with an owner before) was made by a worker
        # that died in it, the provider perhaps billing it: a sweep bills and answers it
        # (workers/lua/sweep.lua takes a claim on the same fields) once any worker runs, so
        # "expired uncalled, nothing billed" would be untrue. A claim bound by an
        # Idempotency-Key alone, or taken with no call made, has neither.
        if (
            deadline is not None
            and not any(calls)
            and datetime.now(UTC) > deadline + timedelta(seconds=self._late)
        ):
            return Expired(deadline, answer_format)
        return "pending"

    async def bind(self, job: ChatJob) -> Binding:
        """Bind the job's id to this very request, before it is published: a retry of the
        same request is bound already (or answered), a different one is refused
        (IdempotencyConflict) and must never be published, nor wait for the job."""
        keys = [self._keys.claim(job.team, job.job_id), self._keys.result(job.team, job.job_id)]
        args: list[str | int | bytes] = [request_digest(job), self._ttl]
        try:
            reply = await self._bind(keys=keys, args=args)
            if reply[0] == b"stored" and expired_uncalled(stored_outcome(reply[1])):
                # Published again, as a job expired unseen in its queue is: its stored
                # outcome replaced only while it is still the one stored (bind.lua).
                reply = await self._bind(keys=keys, args=[*args, reply[1]])
        except RedisError as exc:
            raise _unavailable(exc) from exc
        status = reply[0].decode()
        if status == "conflict":
            raise key_conflict()
        if status == "stored":
            outcome = stored_outcome(reply[1])
            return Binding(None if outcome is None else outcome.result, retry=True)
        return Binding(None, retry=reply[1] == 0)


def _marker(job: ChatJob) -> bytes:
    """The accepted marker: the job's answer format, then its deadline (epoch ms) if any."""
    if job.deadline is None:
        return job.answer_format.encode()
    return f"{job.answer_format} {int(job.deadline.timestamp() * 1000)}".encode()


def _read_marker(marker: bytes | None) -> tuple[AnswerFormat, datetime | None]:
    """The answer format and deadline an accepted marker holds. A front door before the
    format was kept wrote b"1", before the deadline was kept the format alone: a job as
    any other caller's, answered in OpenAI's format, and one without a deadline."""
    answer_format, _, deadline = (marker or b"").partition(b" ")
    return (
        "anthropic" if answer_format == b"anthropic" else "openai",
        datetime.fromtimestamp(int(deadline) / 1000, UTC) if deadline else None,
    )


def _unavailable(exc: RedisError) -> ServiceUnavailable:
    return ServiceUnavailable(f"Redis is unreachable ({type(exc).__name__}); retry shortly")


__all__ = ["Binding", "Expired", "Finished", "Outcomes", "Pending", "stored_by"]
