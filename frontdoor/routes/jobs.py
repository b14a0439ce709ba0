"""``GET /v1/jobs/{id}?wait=N``: the answer of a job the front door published, by id.

For an async job (``Prefer: respond-async``, which a chat route answers with
``respond_async``), a caller that disconnected, or one whose wait ran out. Read from the
outcomes the workers store (``frontdoor.outcomes``), by the caller's team: another team's id
reads as unknown. ``wait`` long-polls up to N seconds from the request's arrival.

- 200: the job's answer with its ``_gateway`` block, in the API of the route that
  published it: a ``chat.completion``, or a ``/v1/messages`` job's Messages API message;
- an error status: the job ended in that error, in that API's error shape;
- 202 ``{"id", "object": "queuegate.job", "status": "queued"}``: not finished yet;
- 504 ``deadline_exceeded``, in that API's error shape: the job's deadline passed with no
  outcome stored, and no worker may still store one (``frontdoor.outcomes.Expired``): it
  expired in its queue uncalled; a ``wait`` ends there;
- 404 ``not_found``: no such job of this team (or its outcome has expired);
- 503 ``service_unavailable``: the store (Redis) did not answer within ``wait`` and
  ``STORE_WAIT`` more: ask again.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from frontdoor.answers import arrived, gateway_block, gateway_headers, note_job
from frontdoor.auth import Caller, Calling
from frontdoor.calls import publish_job
from frontdoor.chat_request import RequestOptions
from frontdoor.errors import ApiError, ErrorShapes, error_of_result, shown
from frontdoor.outcomes import Expired, Finished
from frontdoor.routes import anthropic
from frontdoor.service import Door, FrontDoor
from queuegate.messages import AnswerFormat, ChatJob, ChatResult
from queuegate.provider_formats import (
    NotAnObject,
    anthropic_id,
    anthropic_message,
    openai_id,
    openai_view,
)

router = APIRouter(tags=["Jobs"])

MAX_WAIT = 60.0
FIRST_POLL = 0.02
LAST_POLL = 0.5
"""Seconds between looks at the outcome store while long-polling: doubling from the first.
(The answer may come to any front-door process's queue: the store is what all of them see.)"""
STORE_WAIT = 5.0
"""Seconds past ``wait`` an answer may take: a hung Redis would otherwise hold the caller
for as long as it hangs."""


@router.get("/v1/jobs/{job_id}", summary="The answer of a job, by id (long-poll with wait)")
async def job(
    request: Request,
    job_id: str,
    door: Door,
    caller: Calling,
    wait: Annotated[float, Query(ge=0, le=MAX_WAIT)] = 0.0,
) -> JSONResponse:
    started = time.perf_counter()
    # Both bounds count from the request's arrival: checking its key may have taken a while.
    give_up = arrived(request) + wait
    try:
        async with asyncio.timeout(max(0.0, give_up + STORE_WAIT - time.monotonic())):
            pause = FIRST_POLL
            while True:
                state = await door.outcomes.look(caller.team, job_id)
                if state != "unknown":
                    note_job(request, job_id)
                if isinstance(state, Finished):
                    return finished(request, state.result, state.answer_format, started)
                if isinstance(state, Expired):
                    return _in_shape(request, state.answer_format, _expired(job_id, state))
                if state == "unknown":
                    raise ApiError(
                        "not_found",
                        f"no job {shown(job_id)} of team {caller.team} (or its answer expired)",
                    )
                left = give_up - time.monotonic()
                if left <= 0:
                    body = {"id": job_id, "object": "queuegate.job", "status": "queued"}
                    return JSONResponse(
                        body, status_code=202, headers=gateway_headers(job_id, None, started)
                    )
                await asyncio.sleep(min(pause, left))
                pause = min(pause * 2, LAST_POLL)
    except TimeoutError:
        raise ApiError(
            "service_unavailable",
            f"the outcome store (Redis) did not answer within {wait + STORE_WAIT:g} s; "
            f"job {shown(job_id)} is unchanged by it: ask again",
        ) from None


async def respond_async(
    request: Request,
    door: FrontDoor,
    caller: Caller,
    job: ChatJob,
    options: RequestOptions,
    *,
    started: float,
) -> JSONResponse:
    """A chat route's answer to ``Prefer: respond-async``: 202 once the job is published,
    its answer read by id; a retry of a job answered already (its Idempotency-Key's) gets
    that answer as the read gives it, never a 202 saying it is queued."""
    answered = await publish_job(door, caller, job.model_copy(update={"stream": False}), options)
    location = f"/v1/jobs/{job.job_id}"
    if answered is not None:
        read = finished(request, answered, job.answer_format, started)
        read.headers["content-location"] = location
        return read
    headers = {**gateway_headers(job.job_id, None, started), "location": location}
    body = {"id": job.job_id, "object": "queuegate.job", "status": "queued", "url": location}
    return JSONResponse(body, status_code=202, headers=headers)


def finished(
    request: Request, result: ChatResult, answer_format: AnswerFormat, started: float
) -> JSONResponse:
    """A finished job's answer as it is read by id, in ``answer_format``'s API: its answer
    with the ``_gateway`` block, or its error in that API's shape."""
    job_id = result.job_id
    if result.status != "ok" or result.response is None:
        return _in_shape(request, answer_format, error_of_result(result))
    body = {
        **_view(result.response, job_id, answer_format),
        "_gateway": gateway_block(job_id, result, None),
    }
    return JSONResponse(body, headers=gateway_headers(job_id, result, started))


def _in_shape(request: Request, answer_format: AnswerFormat, error: ApiError) -> JSONResponse:
    """A job's error read by id, in the error shape of ``answer_format``'s API."""
    shapes: ErrorShapes = request.app.state.error_shapes
    path = anthropic.PREFIX if answer_format == "anthropic" else request.url.path
    return shapes.response(path, error)


def _expired(job_id: str, expired: Expired) -> ApiError:
    return ApiError(
        "deadline_exceeded",
        f"job {shown(job_id)} expired in its queue at its deadline "
        f"({expired.deadline.isoformat(timespec='seconds')}), uncalled: nothing was billed",
        job_id=job_id,
    )


def _view(response: dict[str, Any], job_id: str, answer_format: AnswerFormat) -> dict[str, Any]:
    if answer_format == "anthropic":
        try:
            return anthropic_message(response, anthropic_id(job_id))
        except NotAnObject:
            pass  # no message has a form for it: read in OpenAI's format, as its 502 said
    return openai_view(response, openai_id(job_id))
