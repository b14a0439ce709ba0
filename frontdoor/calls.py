"""One chat job through the broker for a route: published, awaited, answered or streamed.

The steps every route that runs a chat job shares, whatever API it speaks::

    job = ...                                     # built from the request (ApiError if bad)
    result = await run_job(door, caller, job, options)   # ChatResult, or ApiError
    opened = await open_stream(door, caller, job, options)   # Opened(stream, first chunk)
    return streamed(door, job, opened, writer, started)     # in the API's events (sse.py)

- With an Idempotency-Key, the job's id is bound to the request before anything is
  published (``Outcomes.bind``): an outcome already stored answers it without publishing; a
  different request under the key is ``idempotency_conflict`` at once, never published.
- A team whose budget is spent already is refused ``budget_exhausted`` before publishing
  (``BudgetGate``); the workers' admission stays the authority on every job published.
- What asks Redis comes before the publish, within the caller's timeout: a Redis that does
  not answer by then is ``service_unavailable`` (retry; nothing was published). Once the
  job is out, the caller gets its result or ``deadline_exceeded`` naming it, never a retry.
- ``run_job`` raises ApiError for a result in error, ``deadline_exceeded`` (504) when
  the caller's timeout passes first, its publish included (a broker's resource alarm holds
  publishes until it clears): the job may still finish, and ``GET /v1/jobs/<id>``
  reads its outcome then.
- ``open_stream`` waits for the first chunk before the route answers, so an error before
  any output (a refused key, an exhausted budget) is a plain error status, not a stream,
  and the answer's head names what serves the job (``x-queuegate-model-used``: a fallback
  may), as the first chunk says.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi.responses import StreamingResponse

from frontdoor.answers import gateway_headers, serving_headers
from frontdoor.auth import Caller
from frontdoor.chat_request import RequestOptions
from frontdoor.errors import ApiError, error_of_result, unexpected
from frontdoor.service import FrontDoor
from frontdoor.sse import StreamWriter, sse_events
from producer.streams import ChatStream
from queuegate.errors import GaveUp, ResultTimeout
from queuegate.messages import ChatJob, ChatResult, StreamChunk

log = logging.getLogger(__name__)


async def run_job(
    door: FrontDoor, caller: Caller, job: ChatJob, options: RequestOptions
) -> ChatResult:
    """The job's result, ``ok``; ApiError for any other ending."""
    deadline = _deadline(options)
    stored = await _admit(door, caller, job, options, deadline)
    if stored is not None:
        return _ok(stored)
    try:
        async with asyncio.timeout_at(deadline):
            # A broker's resource alarm holds the publish itself, for minutes perhaps.
            await door.bridge.submit(job, caller, bound=options.idempotency_key is not None)
        result = await door.bridge.wait(job.job_id, _left(deadline))
    except TimeoutError:
        raise _late(job, options.timeout) from None
    except GaveUp:
        raise _stopped(job) from None
    return _ok(result)


async def publish_job(
    door: FrontDoor, caller: Caller, job: ChatJob, options: RequestOptions
) -> ChatResult | None:
    """Publish the job for a caller who reads its answer later (``GET /v1/jobs/<id>``),
    unless it was answered already: then its stored result (an Idempotency-Key's retry)."""
    deadline = _deadline(options)
    stored = await _admit(door, caller, job, options, deadline)
    if stored is None:
        try:
            async with asyncio.timeout_at(deadline):
                await door.bridge.publish(job, caller)
        except TimeoutError:
            raise _late(job, options.timeout) from None
    return stored


async def _admit(
    door: FrontDoor, caller: Caller, job: ChatJob, options: RequestOptions, deadline: float
) -> ChatResult | None:
    """What holds before a job is published: its Idempotency-Key bound to this request, a
    budget not spent already, and its id accepted (``Outcomes.accept``). The stored result,
    when the request was answered.

    Every step asks Redis, so all are done by ``deadline``, or the caller is told to retry:
    nothing was published. Nothing after the publish asks Redis, so a caller whose job went
    out is answered by its result or ``deadline_exceeded`` naming it, never told to retry."""
    try:
        async with asyncio.timeout_at(deadline):
            retry = False
            if options.idempotency_key is not None:
                binding = await door.outcomes.bind(job)
                if binding.answered is not None:
                    return binding.answered
                retry = binding.retry
            if not retry:
                # A retry's job may be in flight, holding its budget: the worker tells it apart.
                await door.budgets.refuse_spent(caller.team, job)
            await door.outcomes.accept(job)
    except TimeoutError:
        raise ApiError(
            "service_unavailable",
            f"Redis did not answer within the request's {options.timeout:g} s; nothing was "
            "published: retry shortly",
        ) from None
    return None


def _deadline(options: RequestOptions) -> float:
    """When the caller stops waiting, on the event loop's clock (uvloop's need not be
    ``time.monotonic()``'s)."""
    return asyncio.get_running_loop().time() + options.left()


def _left(deadline: float) -> float:
    return max(0.0, deadline - asyncio.get_running_loop().time())


@dataclass
class Opened:
    stream: ChatStream
    first: StreamChunk | None
    """The first chunk, already taken; None when the job ended without one."""
    bridged: bool = True
    """Whether the bridge streams it, and is told once it is done: not an answer read from
    the store (closing it would end another request's stream of the job)."""


async def open_stream(
    door: FrontDoor, caller: Caller, job: ChatJob, options: RequestOptions
) -> Opened:
    """The job's stream, its first chunk taken; ApiError when it ended in an error first.

    ``streamed`` tells the bridge once done with it (``Opened.bridged``)."""
    deadline = _deadline(options)
    stored = await _admit(door, caller, job, options, deadline)
    if stored is not None:
        stream = ChatStream(job.job_id, _nothing, None)
        stream.result = _ok(stored)
        return Opened(stream, None, bridged=False)
    bound = options.idempotency_key is not None
    # Each next chunk is waited for as long as the job's worker waits for it (a chunk wait),
    # else for as long as the first, the job's deadline then ending it whole.
    wait = _left(deadline) if job.chunk_wait is None else job.chunk_wait
    stream = door.bridge.stream(job, caller, wait, bound=bound)
    try:
        async with asyncio.timeout_at(deadline):  # the publish too (a resource alarm)
            first = await anext(stream, None)
    except (ResultTimeout, TimeoutError):
        door.bridge.close_stream(job.job_id)
        raise _late(job, options.timeout) from None
    except GaveUp:
        door.bridge.close_stream(job.job_id)
        raise _stopped(job) from None
    except BaseException:
        door.bridge.close_stream(job.job_id)
        raise
    if first is None:
        assert stream.result is not None
        if stream.result.status != "ok":
            door.bridge.close_stream(job.job_id)
            raise error_of_result(stream.result)
    return Opened(stream, first)


def streamed(
    door: FrontDoor, job: ChatJob, opened: Opened, writer: StreamWriter, started: float
) -> StreamingResponse:
    """The answer to a streamed request: the job's events in ``writer``'s API, as they come;
    the stream is closed however the answer ends (the caller may hang up). A fault of the
    front door's own ends it with the API's error event (``unexpected``), not a dropped
    connection, which the SDKs take for a network error and retry."""

    async def events() -> AsyncIterator[bytes]:
        try:
            async for data in sse_events(opened.stream, opened.first, writer):
                yield data
        except GaveUp:
            stopped = _stopped(job)
            yield writer.error(stopped.code, stopped.message)
        except Exception:
            log.exception("job %s: its stream failed", job.job_id)
            error = unexpected(job.job_id)
            yield writer.error(error.code, error.message)
        finally:
            if opened.bridged:
                door.bridge.close_stream(job.job_id)

    # An answer read from the store names its job's trace (a retry's), as a plain one does;
    # a job that ended before any chunk has its result, which the head says all of
    ended = opened.stream.result if opened.first is None else None
    headers = gateway_headers(job.job_id, ended, started)
    if opened.first is not None:
        headers |= serving_headers(job, opened.first)
    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={**headers, "cache-control": "no-cache"},
    )


async def _nothing() -> None:
    return None


def _ok(result: ChatResult) -> ChatResult:
    if result.status != "ok" or result.response is None:
        raise error_of_result(result)
    return result


def _stopped(job: ChatJob) -> ApiError:
    """The answer of a request whose front door stops before its job ends: 504, not retried
    (the job runs on; a retry would be a new job, called again)."""
    return ApiError(
        "deadline_exceeded",
        f"the front door stopped before job {job.job_id} was answered; it may still finish: "
        f"GET /v1/jobs/{job.job_id}",
        job_id=job.job_id,
    )


def _late(job: ChatJob, timeout: float) -> ApiError:
    return ApiError(
        "deadline_exceeded",
        f"no answer within {timeout:g} s; job {job.job_id} may still finish: "
        f"GET /v1/jobs/{job.job_id}",
        job_id=job.job_id,
    )


__all__ = ["Opened", "open_stream", "publish_job", "run_job", "streamed"]
