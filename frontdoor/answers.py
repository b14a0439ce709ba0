"""How the gateway served a request, told to the caller: headers on every answer, and a
``_gateway`` block in the body of the gateway's own routes (``/v1/chat``, ``/v1/jobs``).

    note_job(request, job.job_id)   # its answer, an error too, carries it as x-request-id
    headers = gateway_headers(job_id, result, started)   # x-request-id, latency, cost, model
    headers |= serving_headers(job, first_chunk)   # a stream's: model, before its result
    body = {**result.response, "_gateway": gateway_block(job_id, result, started)}

Every answer carries ``x-request-id`` (``frontdoor.app.RequestMetrics``): the job's id once
the request named its job, else a fresh one. ``TRACE_HEADER`` names the trace of the job an
answer gives the result of, and on any other answer while the front door traces (a stream's,
a 202's, an error's: ``frontdoor.app.TraceRequests``) the request's own, which the job it
publishes continues.

``started`` is ``time.perf_counter()`` when the request arrived: ``latency_ms`` is the
caller's whole wait as the front door saw it; the block also has the queue and provider
times the worker measured.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from starlette.requests import Request
from starlette.types import Scope

from queuegate.messages import ChatJob, ChatResult, StreamChunk
from queuegate.numbers import plain_decimal

TRACE_HEADER = "x-queuegate-trace-id"
"""The answer's header naming the gateway's trace of the request."""

JOB_STATE = "job_id"
"""Where a request's state holds the id of its job, once it has one."""
ARRIVED_STATE = "arrived"
"""Where a request's state holds when it arrived (``time.monotonic()``)."""


def note_arrival(scope: Scope) -> None:
    """The request arrives now: its caller's timeout, and a long-poll's wait, count from here,
    so the time its key takes to check (up to ``frontdoor.failed_keys.WAIT`` while Redis hangs)
    is inside them, not added after."""
    scope.setdefault("state", {})[ARRIVED_STATE] = time.monotonic()


def arrived(request: Request) -> float:
    """When the request arrived (``time.monotonic()``), noted by ``RequestMetrics``."""
    noted: float = request.scope["state"][ARRIVED_STATE]
    return noted


def note_job(request: Request, job_id: str) -> None:
    """The request's job: whatever it is answered, its ``x-request-id`` is the job's id."""
    request.scope.setdefault("state", {})[JOB_STATE] = job_id


def noted_job(scope: Scope) -> str | None:
    """The id of the request's job, once it named one (``note_job``)."""
    noted = scope.get("state", {}).get(JOB_STATE)
    return noted if isinstance(noted, str) else None


def request_id(scope: Scope) -> str:
    """The ``x-request-id`` of a request's answer: its job's id, or a fresh one."""
    return noted_job(scope) or uuid.uuid4().hex


def elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


def gateway_headers(job_id: str, result: ChatResult | None, started: float) -> dict[str, str]:
    headers = {
        "x-request-id": job_id,
        "x-queuegate-job-id": job_id,
        "x-queuegate-latency-ms": f"{elapsed_ms(started):.3f}",
    }
    if result is not None:
        g = result.gateway
        headers["x-queuegate-cost-usd"] = plain_decimal(g.cost_usd)
        headers |= _served(g.model_used or "", fallback=g.fallback_used, cached=g.cached)
        if g.trace_id is not None:  # the job's own: an earlier request's, read back by id
            headers[TRACE_HEADER] = g.trace_id
    return headers


def serving_headers(job: ChatJob, first: StreamChunk) -> dict[str, str]:
    """How a streamed job is served, as its first chunk says it (the headers leave with that
    chunk, before the job's result exists): the alias serving it, a fallback or not, cached
    or not, as ``gateway_headers`` names them from a result. None from a worker that predates
    ``StreamChunk.model_used``."""
    if first.model_used is None:
        return {}
    return _served(first.model_used, fallback=first.model_used != job.model, cached=first.cached)


def _served(model_used: str, *, fallback: bool, cached: bool) -> dict[str, str]:
    return {
        "x-queuegate-model-used": model_used,
        "x-queuegate-fallback": "true" if fallback else "false",
        "x-queuegate-cached": "true" if cached else "false",
    }


def gateway_block(job_id: str, result: ChatResult, started: float | None) -> dict[str, Any]:
    g = result.gateway
    return {
        "request_id": job_id,
        "latency_ms": elapsed_ms(started) if started is not None else g.latency_ms,
        "queued_ms": g.queued_ms,
        "provider_ms": g.latency_ms,
        "cost_usd": plain_decimal(g.cost_usd),
        "model_requested": g.model_requested,
        "model_used": g.model_used,
        "provider": g.provider,
        "fallback": g.fallback_used,
        "cached": g.cached,
        "attempts": len(g.attempts),
        # Only when true, as trace_id only when there is one: billed by a count of its text
        **({"tokens_estimated": True} if g.tokens_estimated else {}),
        **({"trace_id": g.trace_id} if g.trace_id is not None else {}),
    }


__all__ = [
    "TRACE_HEADER",
    "arrived",
    "elapsed_ms",
    "gateway_block",
    "gateway_headers",
    "note_arrival",
    "note_job",
    "noted_job",
    "request_id",
    "serving_headers",
]
