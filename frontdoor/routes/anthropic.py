"""Anthropic's Messages API: ``POST /v1/messages``, answered whole or streamed, whichever
provider serves the model. Point the ``anthropic`` SDK's ``base_url`` at the front door's
root (the SDK adds ``/v1``); it sends the team's key as ``x-api-key``.

Errors come in Anthropic's shape (``queuegate.api_errors.anthropic_error``), so the SDK
raises its typed exceptions. The message's id is ``msg_<job id>`` (the ``x-request-id``
header holds the job id); the gateway headers of ``frontdoor.answers`` are on every answer.
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from frontdoor.answers import gateway_headers
from frontdoor.anthropic_request import messages_job
from frontdoor.anthropic_stream import MessageEvents
from frontdoor.auth import Caller, require_caller
from frontdoor.body import read_json
from frontdoor.calls import open_stream, run_job, streamed
from frontdoor.chat_request import RequestOptions
from frontdoor.service import FrontDoor, frontdoor
from queuegate.provider_formats import anthropic_message

PREFIX = "/v1/messages"
"""Where errors take Anthropic's shape."""

router = APIRouter(tags=["Anthropic"])


@router.post(PREFIX, summary="Create a message (Anthropic Messages format)")
async def messages(
    request: Request,
    door: Annotated[FrontDoor, Depends(frontdoor)],
    caller: Annotated[Caller, Depends(require_caller)],
) -> Response:
    started = time.perf_counter()
    options = RequestOptions.of(request)
    s = door.settings
    body = await read_json(request, limit=s.max_job_bytes, timeout=s.http_body_timeout)
    job = messages_job(body, caller.team, options, door.limits)
    message_id = f"msg_{job.job_id}"
    if job.stream:
        opened = await open_stream(door, caller, job, options)
        return streamed(door, job, opened, MessageEvents(message_id, job.model), started)
    result = await run_job(door, caller, job, options)
    assert result.response is not None
    message = anthropic_message(result.response) | {"id": message_id}
    return JSONResponse(message, headers=gateway_headers(job.job_id, result, started))
