"""Anthropic's Messages API: ``POST /v1/messages``, answered whole or streamed, whichever
provider serves the model, and ``POST /v1/messages/count_tokens``, answered with the
estimate the workers' admission makes of a prompt (``workers.admission.estimate``), not a
provider's count. Point the ``anthropic`` SDK's ``base_url`` at the front door's
root (the SDK adds ``/v1``); it sends the team's key as ``x-api-key``.

Errors come in Anthropic's shape (``queuegate.api_errors.anthropic_error``), so the SDK
raises its typed exceptions. A model's answer a message has no form for (a tool called with
input that is not a JSON object) is a 502 ``api_error`` saying what the model sent, not
retried: the job was served and billed (``frontdoor.anthropic_stream.message_of``). The
message's id is ``msg_<job id>`` (the ``x-request-id`` header holds the job id); the
gateway headers of ``frontdoor.answers`` are on every answer. ``Prefer: respond-async``
answers 202 with the job id, as OpenAI's routes do; ``GET /v1/jobs/<id>`` reads the message.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from frontdoor.answers import gateway_headers, note_job
from frontdoor.anthropic_request import count_tokens_job, messages_job
from frontdoor.anthropic_stream import MessageEvents, message_of
from frontdoor.async_answers import respond_async
from frontdoor.auth import Calling
from frontdoor.calls import open_stream, run_job, streamed
from frontdoor.chat_request import RequestOptions
from frontdoor.service import Door
from workers.admission.estimate import prompt_tokens

PREFIX = "/v1/messages"
"""Where errors take Anthropic's shape."""

router = APIRouter(tags=["Anthropic"])


@router.post(PREFIX, summary="Create a message (Anthropic Messages format)")
async def messages(request: Request, door: Door, caller: Calling) -> Response:
    started = time.perf_counter()
    options = RequestOptions.of(request)
    body = await door.bodies.read_request(request, caller)
    job = messages_job(body, caller.team, options, door.limits)
    note_job(request, job.job_id)
    if options.respond_async:
        return await respond_async(door, caller, job, options, started=started)
    if job.stream:
        opened = await open_stream(door, caller, job, options)
        return streamed(door, job, opened, MessageEvents(job.job_id, job.model), started)
    result = await run_job(door, caller, job, options)
    assert result.response is not None
    message = message_of(result.response, job.job_id)
    return JSONResponse(message, headers=gateway_headers(job.job_id, result, started))


@router.post(
    PREFIX + "/count_tokens",
    summary="Count a message's input tokens (the gateway's estimate, as its admission makes it)",
)
async def count_tokens(request: Request, door: Door, caller: Calling) -> dict[str, int]:
    body = await door.bodies.read_request(request, caller)
    job = count_tokens_job(body, caller.team, RequestOptions.of(request), door.limits)
    return {"input_tokens": prompt_tokens(job)}
