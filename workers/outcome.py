"""What happened to a job, as its ChatResult and UsageEvent: a pair always built together."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any, NamedTuple

from aio_pika.abc import AbstractIncomingMessage
from pydantic import BaseModel, ConfigDict

from queuegate.errors import BAD_INPUT, Billed, JobError
from queuegate.messages import (
    LATE_MARK,
    REFUSED_MARK,
    ChatJob,
    ChatResult,
    ErrorInfo,
    GatewayInfo,
    UsageEvent,
    body_digest,
    storable,
)
from queuegate.provider_formats import has_message_form
from queuegate.signing import message_digest
from router import Routed

UNACCOUNTED = frozenset({"already_answered"})
"""Refusals with no usage row: a copy of a job usage_log already holds, never called. A row
would count the one request again (and as an error) in the team's reports; the worker's log
says it was refused."""


class Outcome(BaseModel):
    """A finished job: what the caller is told and what accounting records."""

    model_config = ConfigDict(frozen=True)

    result: ChatResult
    usage: UsageEvent


def refused_late_uncalled(result: ChatResult) -> bool:
    """Whether ``result`` says its job's deadline passed before any call, nothing billed."""
    return (
        result.error is not None
        and result.error.code == "deadline_exceeded"
        and not result.gateway.attempts
        and not result.gateway.cost_usd
    )


def expired_uncalled(outcome: Outcome | None) -> bool:
    """Whether ``outcome`` is a job's that a worker took past its deadline and refused (or
    held past it) with no call made and nothing billed: it expired as one unseen in its
    queue does, and a retry under its Idempotency-Key publishes it again
    (``frontdoor.outcomes``), with a later deadline. One that ended past its deadline after
    a call keeps its outcome: never called twice."""
    if outcome is None:
        return False
    usage = outcome.usage
    return (
        refused_late_uncalled(outcome.result)
        and not usage.attempts
        and not usage.attempt_log
        and not usage.covers
        and not usage.cost_usd
    )


class Announcement(NamedTuple):
    """A finished job as the bytes it is announced with, and nothing else of it.

    A worker holds most of its jobs here, while the broker confirms their result and usage
    (thousands, when the broker is the slowest stage): the job, its outcome's models and the
    provider's answer are about 8 KB more per job, so they are let go before publishing.
    A tuple: a frozen dataclass's ``__init__`` sets each field through
    ``object.__setattr__``, a call each, once per job.
    """

    job_id: str
    team: str
    """Whose queue the job came from: its result goes on that team's broker connection."""
    reply_to: str | None
    """Where the result goes; None when it may go nowhere (it is then only accounted)."""
    result: bytes
    usage: bytes | None
    """The usage event; None when the job is not accounted again (``UNACCOUNTED``)."""
    bad_input: JobError | None
    """Why the job itself is wrong, when it is: it is then also dead-lettered."""
    lapsing: str | None = None
    """Its claim's entry on the lapsing claims (a job with a deadline, its outcome stored):
    removed once the usage event is confirmed (``workers.claims.Claims.accounted``)."""

    @classmethod
    def of(
        cls,
        outcome: Outcome,
        reply_to: str | None,
        error: JobError | None = None,
        *,
        lapsing: str | None = None,
        usage_as_stored: bool = False,
        dumped: tuple[bytes, bytes] | None = None,
    ) -> Announcement:
        """``dumped``: the outcome ``as_json`` already (made once for its store and this).
        ``usage_as_stored``: a stored outcome whose result can reach nobody now (its reply
        queue gone since it was answered), its usage event published again as stored. The
        delivery that stored it may have died before its event's batch left; usage_log keeps
        a job's first row, so one that did arrive is not counted twice. Its
        ``reply_delivered`` is left as stored: that result was sent, and this delivery cannot
        tell whether it arrived."""
        result, usage = dumped if dumped is not None else as_json(outcome)
        if reply_to is None and not usage_as_stored:
            event = outcome.usage.model_copy(update={"reply_delivered": False})
            usage = event.model_dump_json().encode()
        return cls(
            job_id=outcome.result.job_id,
            team=outcome.usage.team,
            reply_to=reply_to,
            result=result,
            usage=None if error is not None and error.code in UNACCOUNTED else usage,
            bad_input=error if error is not None and error.code in BAD_INPUT else None,
            lapsing=lapsing,
        )

    def undelivered_usage(self) -> bytes | None:
        """The usage event for a result that could not be delivered (rare: parsed again)."""
        if self.usage is None:
            return None
        event = UsageEvent.model_validate_json(self.usage)
        return event.model_copy(update={"reply_delivered": False}).model_dump_json().encode()


def outcome_of_late(
    stored: Outcome, own: Outcome, claim: str | None, billed_as_lost: Billed | None
) -> Outcome:
    """What a delivery that finished after another stored the job's outcome announces: that
    outcome's result (the job's answer is the first stored), with this delivery's own calls
    (``own``, without the lost calls it took over) billed under its ``claim``. Two
    deliveries both call a job when one's owner stalled past its lease, or when Redis lost
    the claim mid-call: each call is billed once, the second on a row of its own
    (``accounting.store``).

    When the stored outcome bills them already as lost (``UsageEvent.covers``: it took them
    over from this delivery's owner, stalled past its lease), at their estimates
    (``billed_as_lost``: their cost and estimated tokens), its row bills what they really
    cost past that, with their tokens past the estimated ones that row counts
    (``LATE_MARK``): billed at the estimates alone, the call of a job without ``max_tokens``
    that ran on while its owner was stopped cost the provider 16 times its row; and its
    tokens whole beside the estimated ones, the job's rows counted them twice."""
    usage = own.usage
    if not usage.attempts or claim is None:
        return stored
    if claim in (stored.usage.covers or ()):
        update: dict[str, Any] = {"job_id": f"{usage.job_id}{LATE_MARK}{claim}"}
        if billed_as_lost is not None:
            update |= {
                "cost_usd": usage.cost_usd - billed_as_lost.cost_usd,
                "input_tokens": usage.input_tokens - billed_as_lost.input_tokens,
                "output_tokens": usage.output_tokens - billed_as_lost.output_tokens,
                "cache_write_tokens": usage.cache_write_tokens - billed_as_lost.cache_write_tokens,
            }
            if billed_as_lost.estimated:
                update["tokens_estimated"] = True
        usage = usage.model_copy(update=update)
    return stored.model_copy(update={"usage": usage.model_copy(update={"claim": claim})})


def as_json(outcome: Outcome) -> tuple[bytes, bytes]:
    """The outcome's result as it is announced (its fields that are None left out, which
    read back as None: every field of a result that may be None defaults to None) and its
    usage event, as JSON."""
    # The serializers themselves: ``model_dump_json``'s own Python costs a fifth as much again.
    result = _RESULT_JSON.to_json(outcome.result, exclude_none=True)
    return result, _USAGE_JSON.to_json(outcome.usage)


_RESULT_JSON = ChatResult.__pydantic_serializer__
_USAGE_JSON = UsageEvent.__pydantic_serializer__


class Marks(NamedTuple):
    """What the gate marks a job's outcome with (``workers.gate.Admitted``): who published
    it, the PII families its prompt held, and the digest of the request it answers. Given to
    ``served`` and ``failed``, the outcome is built with them, rather than copied three times
    to stamp them on (``Admitted.stamp``)."""

    identity: str
    pii: str | None
    request: str


@dataclass(frozen=True)
class Timing:
    queued_ms: float
    worker: str
    trace_id: str | None = None
    span_id: str | None = None
    """The job's trace and recorded span (``queuegate.tracing.ids``), when the worker traces."""


def served(
    job: ChatJob,
    routed: Routed,
    timing: Timing,
    *,
    cached: bool = False,
    marks: Marks | None = None,
    stream: str | None = None,
) -> Outcome:
    """A job answered (relayed as ``stream``, if streamed). Its caller reading Anthropic's
    Messages API gets an error for an answer a message has no form for (a tool called with
    input that is not a JSON object), which the front door and a Message Batch's results give
    it: recorded as that error (billed, not ``ok``), as a call that failed after it was billed
    is. Its result keeps the answer, readable in OpenAI's format."""
    unreadable = job.answer_format == "anthropic" and not has_message_form(routed.response)
    gateway = GatewayInfo(
        model_requested=job.model,
        model_used=routed.model_used,
        provider=routed.provider,
        deployment=routed.deployment,
        fallback_used=routed.fallback_used,
        cached=cached,
        queued_ms=timing.queued_ms,
        latency_ms=routed.latency_ms,
        attempts=routed.attempts,
        cost_usd=routed.cost_usd,
        worker=timing.worker,
        params_dropped=list(routed.params_dropped) or None,
        params_changed=list(routed.params_changed) or None,
        tokens_estimated=routed.estimated or None,
        trace_id=timing.trace_id,
        stream=stream,
    )
    result = ChatResult(
        job_id=job.job_id,
        team=job.team,
        status="ok",
        response=routed.response,
        gateway=gateway,
        request=marks.request if marks is not None else None,
    )
    usage = UsageEvent(
        job_id=job.job_id,
        team=job.team,
        model_requested=job.model,
        model_used=routed.model_used,
        provider=routed.provider,
        deployment=routed.deployment,
        input_tokens=routed.input_tokens,
        output_tokens=routed.output_tokens,
        cached_tokens=routed.cached_tokens,
        cache_write_tokens=routed.cache_write_tokens,
        reasoning_tokens=routed.reasoning_tokens,
        cost_usd=routed.cost_usd,
        status="error" if unreadable else "ok",
        error_code="provider_error" if unreadable else None,
        queued_ms=timing.queued_ms,
        latency_ms=routed.latency_ms,
        attempts=len(routed.attempts),
        attempt_log=routed.attempts,
        fallback_used=routed.fallback_used,
        cached=cached,
        worker=timing.worker,
        params_dropped=",".join(routed.params_dropped) or None,
        params_changed=",".join(routed.params_changed) or None,
        tokens_estimated=routed.estimated or None,
        trace_id=timing.trace_id,
        span_id=timing.span_id,
        identity=marks.identity if marks is not None else None,
        pii=marks.pii if marks is not None else None,
    )
    return Outcome(result=result, usage=usage)


def unwritable(outcome: Outcome) -> Outcome:
    """``outcome``, whose result could not be written as JSON (``as_json`` raised), as a
    ``provider_error`` billed as it was served: its answer left out, of its result and of the
    content its usage event captures alike, its usage and cost kept. Raised on, the job went
    back to its queue with its claim held, unanswered for good: so it went when only the
    result's answer was left out, a team capturing content keeping the same answer there."""
    result = outcome.result
    error = ErrorInfo(
        code="provider_error",
        message="the gateway could not write this job's answer, which is billed as served; "
        "its operators have the details in the worker's log",
        attempts=len(result.gateway.attempts),
    )
    usage: dict[str, object] = {"status": "error", "error_code": "provider_error"}
    content = outcome.usage.content
    if content is not None:
        usage["content"] = content.model_copy(update={"response": None})
    return Outcome(
        result=result.model_copy(update={"status": "error", "response": None, "error": error}),
        usage=outcome.usage.model_copy(update=usage),
    )


def failed(
    job_id: str,
    team: str,
    model: str,
    error: JobError,
    timing: Timing,
    *,
    marks: Marks | None = None,
    stream: str | None = None,
) -> Outcome:
    """A job that failed (``error``); relayed as ``stream``, if streamed, as ``served``."""
    attempts = error.attempts
    gateway = GatewayInfo(
        model_requested=model,
        queued_ms=timing.queued_ms,
        attempts=attempts,
        worker=timing.worker,
        trace_id=timing.trace_id,
        stream=stream,
    )
    info = ErrorInfo(
        code=error.code,
        message=error.message,
        param=error.param,
        attempts=len(attempts),
        retry_after_ms=error.retry_after_ms,
    )
    billed = error.billed
    spent: dict[str, object] = {}
    if billed is not None:
        # The provider bills what it generated before the stream broke, and may bill a
        # request that timed out once sent (its estimate).
        spent = {
            "model_used": billed.model_used,
            "provider": billed.provider,
            "deployment": billed.deployment,
            "cost_usd": billed.cost_usd,
            "tokens_estimated": billed.estimated or None,
        }
        gateway = gateway.model_copy(update=spent)
    result = ChatResult(
        job_id=job_id,
        team=team,
        status="error",
        error=info,
        gateway=gateway,
        request=marks.request if marks is not None else None,
    )
    usage = UsageEvent(
        job_id=job_id,
        team=team,
        model_requested=model,
        cost_usd=Decimal(0),
        status="error",
        error_code=error.code,
        queued_ms=timing.queued_ms,
        attempts=len(attempts),
        attempt_log=attempts,
        worker=timing.worker,
        trace_id=timing.trace_id,
        span_id=timing.span_id,
        identity=marks.identity if marks is not None else None,
        pii=marks.pii if marks is not None else None,
    )
    if billed is not None:
        tokens = {
            "input_tokens": billed.input_tokens,
            "output_tokens": billed.output_tokens,
            "cached_tokens": billed.cached_tokens,
            "cache_write_tokens": billed.cache_write_tokens,
        }
        usage = usage.model_copy(update=spent | tokens)
    return Outcome(result=result, usage=usage)


def refused(
    job_id: str,
    team: str,
    model: str,
    error: JobError,
    timing: Timing,
    *,
    message: AbstractIncomingMessage,
) -> Outcome:
    """A job refused before it was admitted (malformed, or not its team's): answered under its
    job id, but accounted under an id of its own, ``<job id>/refused/<digest of message>``.

    The job id is the producer's; a refusal must not take it in ``usage_log``, or sending a
    bad copy first would leave the real job, served later under that id, unaccounted. It may
    be what the job was refused for (a NUL in it): recorded with that replaced, so the
    refusal still has its row. The digest is of the delivered body (``body_digest``): a
    redelivery or a replay of the same request (a worker killed before its ack) gets the same
    id, and ``usage_log`` keeps one row of it, while a different request refused under the job
    id gets a row of its own. Its result names the message's digest (``message_digest``: its
    properties a refusal depends on, its sender's identity): its publisher alone waits for it.
    """
    outcome = failed(job_id, team, model, error, timing)
    refused_id = f"{storable(job_id)}{REFUSED_MARK}{body_digest(message.body)}"
    usage = outcome.usage.model_copy(update={"job_id": refused_id})
    # Named by its message, not left to any waiter of the job id: someone else's bad message
    # under the id would answer the real job. An admitted job's is stamped with its request.
    result = outcome.result.model_copy(update={"request": message_digest(message.body, message)})
    return outcome.model_copy(update={"result": result, "usage": usage})
