"""OpenAI's API: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /v1/models/{id}``,
and ``POST /v1/chat`` (the same request, answered with a ``_gateway`` block: request id,
latency, cost, model used, fallback). Point the ``openai`` SDK's ``base_url`` at
``<front door>/v1``. A request is checked as OpenAI checks it (``openai_request``) before
anything is published.

``Prefer: respond-async`` answers 202 at once with the job id; ``GET /v1/jobs/<id>`` reads
the answer (routes/jobs.py; ``frontdoor.async_answers``).
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from frontdoor.answers import gateway_block, gateway_headers, note_job
from frontdoor.async_answers import respond_async
from frontdoor.auth import Caller, Calling
from frontdoor.batches.objects import anthropic_page
from frontdoor.calls import open_stream, run_job, streamed
from frontdoor.chat_request import RequestOptions, chat_job, check_chat, unknown_model, wants_stream
from frontdoor.service import Door, FrontDoor
from frontdoor.sse import ChunkWriter
from queuegate.messages import ChatJob
from queuegate.provider_formats import openai_id, openai_view

router = APIRouter(tags=["OpenAI"])


@router.post("/v1/chat/completions", summary="Create a chat completion (OpenAI format)")
async def chat_completions(request: Request, door: Door, caller: Calling) -> Response:
    return await _chat(request, door, caller, gateway=False)


@router.post("/v1/chat", summary="A chat completion with the gateway's _gateway block")
async def chat(request: Request, door: Door, caller: Calling) -> Response:
    return await _chat(request, door, caller, gateway=True)


@router.get("/v1/models", summary="The model aliases this gateway serves (OpenAI list)")
async def models(
    door: Door,
    caller: Calling,
    *,
    after_id: str | None = None,
    before_id: str | None = None,
    limit: Annotated[int | None, Query(ge=1, le=1000)] = None,
) -> dict[str, Any]:
    """OpenAI's list and Anthropic's page at once: both SDKs read this route, and each
    ignores the other's fields. Anthropic's SDK pages by ``after_id``/``before_id`` and
    ``limit``; OpenAI's sends none, and gets every alias (no ``limit``: all of them)."""
    aliases = [
        alias
        for alias in sorted(door.catalog.models)
        if (after_id is None or alias > after_id) and (before_id is None or alias < before_id)
    ]
    page = aliases
    if limit is not None and len(aliases) > limit:
        page = aliases[-limit:] if before_id is not None else aliases[:limit]
    more = len(page) < len(aliases)
    return {"object": "list", **anthropic_page([_model(a) for a in page], has_more=more)}


@router.get("/v1/models/{model_id:path}", summary="One model alias this gateway serves")
async def model(model_id: str, door: Door, caller: Calling) -> dict[str, Any]:
    if model_id not in door.catalog.models:
        raise unknown_model(model_id)
    return _model(model_id)


def _model(alias: str) -> dict[str, Any]:
    """OpenAI's model and Anthropic's at once; no date of its own to give (``created`` 0)."""
    return {
        "id": alias,
        "object": "model",
        "created": 0,
        "owned_by": "queuegate",
        "type": "model",
        "display_name": alias,
        "created_at": "1970-01-01T00:00:00Z",
    }


async def _chat(request: Request, door: Door, caller: Caller, *, gateway: bool) -> Response:
    started = time.perf_counter()
    options = RequestOptions.of(request)
    body = await door.bodies.read_request(request, caller)
    checked = check_chat(body, door.limits)
    stream, include_usage = wants_stream(body)
    job = chat_job(body, checked, caller.team, options, door.limits, stream=stream)
    note_job(request, job.job_id)
    if options.respond_async:
        return await respond_async(door, caller, job, options, started=started)
    if stream:
        return await _stream(
            door, caller, job, options, include_usage=include_usage, started=started
        )
    result = await run_job(door, caller, job, options)
    assert result.response is not None
    answer = openai_view(result.response, openai_id(job.job_id))
    if gateway:
        answer = {**answer, "_gateway": gateway_block(job.job_id, result, started)}
    return JSONResponse(answer, headers=gateway_headers(job.job_id, result, started))


async def _stream(
    door: FrontDoor,
    caller: Caller,
    job: ChatJob,
    options: RequestOptions,
    *,
    include_usage: bool,
    started: float,
) -> StreamingResponse:
    opened = await open_stream(door, caller, job, options)
    writer = ChunkWriter(job.job_id, job.model, include_usage=include_usage)
    return streamed(door, job, opened, writer, started)
