"""A job answered apart from its request: the 202 a chat route answers ``Prefer:
respond-async`` with (``respond_async``), and a job's answer as ``GET /v1/jobs/{id}`` reads
it (``finished``, ``error_answer``), in the API of the route that published it.

Here, not in ``frontdoor.routes.jobs``: the chat routes (``routes.openai``,
``routes.anthropic``) and the jobs route all import it, and it imports none of them.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from frontdoor.answers import gateway_block, gateway_headers
from frontdoor.auth import Caller
from frontdoor.calls import publish_job
from frontdoor.chat_request import RequestOptions
from frontdoor.errors import FORMAT_SHAPES, ApiError, error_of_result, error_response
from frontdoor.service import FrontDoor
from queuegate.messages import AnswerFormat, ChatJob, ChatResult
from queuegate.provider_formats import (
    NotAnObject,
    anthropic_id,
    anthropic_message,
    openai_id,
    openai_view,
)


async def respond_async(
    door: FrontDoor, caller: Caller, job: ChatJob, options: RequestOptions, *, started: float
) -> JSONResponse:
    """A chat route's answer to ``Prefer: respond-async``: 202 once the job is published,
    its answer read by id; a retry of a job answered already (its Idempotency-Key's) gets
    that answer as the read gives it, never a 202 saying it is queued."""
    answered = await publish_job(door, caller, job.model_copy(update={"stream": False}), options)
    location = f"/v1/jobs/{job.job_id}"
    if answered is not None:
        read = finished(answered, job.answer_format, started)
        read.headers["content-location"] = location
        return read
    headers = {**gateway_headers(job.job_id, None, started), "location": location}
    body = {"id": job.job_id, "object": "queuegate.job", "status": "queued", "url": location}
    return JSONResponse(body, status_code=202, headers=headers)


def finished(result: ChatResult, answer_format: AnswerFormat, started: float) -> JSONResponse:
    """A finished job's answer as it is read by id, in ``answer_format``'s API: its answer
    with the ``_gateway`` block, or its error in that API's shape."""
    job_id = result.job_id
    if result.status != "ok" or result.response is None:
        return error_answer(answer_format, error_of_result(result))
    body = {
        **_view(result.response, job_id, answer_format),
        "_gateway": gateway_block(job_id, result, None),
    }
    return JSONResponse(body, headers=gateway_headers(job_id, result, started))


def error_answer(answer_format: AnswerFormat, error: ApiError) -> JSONResponse:
    """A job's error read by id, in the error shape of ``answer_format``'s API (not the
    path's: ``/v1/jobs`` reads jobs of every API)."""
    return error_response(FORMAT_SHAPES[answer_format], error)


def _view(response: dict[str, Any], job_id: str, answer_format: AnswerFormat) -> dict[str, Any]:
    if answer_format == "anthropic":
        try:
            return anthropic_message(response, anthropic_id(job_id))
        except NotAnObject:
            pass  # no message has a form for it: read in OpenAI's format, as its 502 said
    return openai_view(response, openai_id(job_id))


__all__ = ["error_answer", "finished", "respond_async"]
