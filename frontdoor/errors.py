"""Every error the front door answers, in the shape of the API that was called.

Routes raise ``ApiError(code, message)``; ``code`` is a wire error code
(``queuegate.messages.ErrorCode``) or one of the HTTP-level codes below, and its status
comes from the one table every API shares (``queuegate.messages.HTTP_STATUS``). The shape
is chosen by the request's path: OpenAI's unless a route family registered its own::

    raise ApiError("unknown_model", f"model {shown(name)!r} is not served: GET /v1/models")
    raise error_of_result(result)            # a job that ended in an error
    app.state.error_shapes.register("/v1/messages", anthropic_error)   # another API's shape

A 429 carries ``Retry-After``; a 409, the codes that a retry cannot change and those a retry
would pay for twice carry ``x-should-retry: false`` (``NO_RETRY``), which the OpenAI and
Anthropic SDKs obey (they retry 408, 409, 429 and 5xx by default). A value the caller sent
is repeated ``shown`` (``queuegate.value_errors``): cut to ``ECHOED`` characters.

An exception no handler takes (a fault of the front door's own) is answered
``internal_error`` (500) in the same shape by ``UnexpectedErrors``, its traceback logged,
never Starlette's bare text/plain 500.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from frontdoor.answers import noted_job
from queuegate.api_errors import anthropic_error, openai_error
from queuegate.errors import (
    ClientError,
    GatewayError,
    InvalidRequest,
    JobError,
    QueueFull,
    ServiceUnavailable,
)
from queuegate.messages import HTTP_STATUS, AnswerFormat, ChatResult
from queuegate.value_errors import bounded, shown
from queuegate.visible import clipped

log = logging.getLogger(__name__)

HTTP_ONLY: dict[str, int] = {
    "storage_quota_exceeded": 400,
    "request_timeout": 408,
    "headers_too_large": 431,
    "too_many_requests": 429,
    "not_found": 404,
    "forbidden": 403,
    "method_not_allowed": 405,
    "service_unavailable": 503,
}
"""Codes of the HTTP layer, which no job is ever answered with."""

NO_RETRY = frozenset(
    {
        "canceled",
        "already_answered",
        "request_too_large",
        "request_timeout",
        "headers_too_large",
        "unauthorized",
        "forbidden",
        "deadline_exceeded",
        "provider_error",
        "all_providers_failed",
        "internal_error",
    }
)
"""Codes the SDKs are told not to retry: a retry of the same request cannot change them, or
would publish a new job for what was called already. The SDKs retry 408, 409, 429 and every
5xx by default, with no Idempotency-Key (the new job calls the provider again, billed again):
a 504 ``deadline_exceeded`` comes after the job was published, often called, and the
retry has the same deadline (``GET /v1/jobs/{id}`` reads its answer); a 502 comes after the
workers' own retries and fallbacks; after an ``internal_error`` the gateway cannot tell what
it did before failing (a job published, its provider called). Retried: 429
(``rate_limited`` by the gateway's own limits, ``queue_full``, ``too_many_requests``, nothing
called, with ``Retry-After``) and 503 (refused before anything was published). Not a
``rate_limited`` job whose attempts reached a provider (its own 429s): the workers waited and
tried again already, and each SDK retry was a new job calling it again (an attack counted 3
jobs and 6 calls for one request)."""

ErrorShape = Callable[[str, str, str | None], dict[str, Any]]
"""``shape(code, message, param)``: an API's error body (``param``: the field at fault)."""

FORMAT_SHAPES: dict[AnswerFormat, ErrorShape] = {
    "openai": openai_error,
    "anthropic": anthropic_error,
}
"""The error shape of each API a job is answered in (``ChatJob.answer_format``): what a job's
error read by id takes, whatever path reads it."""


class ApiError(Exception):
    """An error answer: ``code``, a message saying what to do, and its HTTP status."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        retry_after_s: float | None = None,
        job_id: str | None = None,
        param: str | None = None,
        called: bool = False,
    ) -> None:
        message = bounded(message)
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = HTTP_STATUS.get(code) or HTTP_ONLY.get(code, 500)
        self.retry_after_s = retry_after_s
        self.job_id = job_id
        """The job whose result this error is (a worker refused or failed it), if any."""
        self.param = param
        """The path of the request's field at fault (``temperature``, ``messages.0.content``),
        when one is: OpenAI's errors name it."""
        self.called = called
        """A provider answered the job's calls: a retry would call it again (``NO_RETRY``)."""

    def headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        if self.job_id is not None:
            headers["x-queuegate-job-id"] = self.job_id
        if self.status in {429, 503}:
            headers["retry-after"] = str(max(1, math.ceil(self.retry_after_s or 1)))
        if self.code in NO_RETRY or self.status == 409 or self.called:
            headers["x-should-retry"] = "false"
        return headers


def error_of_result(result: ChatResult) -> ApiError:
    """The answer to a job that ended in an error."""
    assert result.error is not None
    error = result.error
    return ApiError(
        error.code,
        error.message,
        retry_after_s=_seconds(error.retry_after_ms),
        job_id=result.job_id,
        param=error.param,
        called=any(attempt.status is not None for attempt in result.gateway.attempts),
    )


def error_of(exc: GatewayError) -> ApiError:
    """The answer to one of our errors raised on the way to the broker."""
    if isinstance(exc, JobError):
        return ApiError(
            exc.code, exc.message, retry_after_s=_seconds(exc.retry_after_ms), param=exc.param
        )
    if isinstance(exc, QueueFull):
        return ApiError("queue_full", str(exc))
    if isinstance(exc, ServiceUnavailable | ClientError):
        return ApiError("service_unavailable", str(exc))
    return ApiError("service_unavailable", f"the gateway failed: {exc}")


@contextlib.contextmanager
def refusing() -> Iterator[None]:
    """A shared check's refusal of a request (``queuegate.request_errors``) raised as the
    front door's own, its ``param`` kept."""
    try:
        yield
    except InvalidRequest as exc:
        raise error_of(exc) from None


def unexpected(job_id: str | None) -> ApiError:
    """The answer to a fault of the front door's own while serving a request: nothing of the
    fault itself (it may hold anything), the request's job when it named one, whose outcome
    is read by id."""
    if job_id is None:
        return ApiError("internal_error", "the gateway failed serving this request")
    return ApiError(
        "internal_error",
        f"the gateway failed answering job {job_id}, which may have been served: "
        f"GET /v1/jobs/{job_id} reads its outcome",
        job_id=job_id,
    )


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else ms / 1000


class ErrorShapes:
    """Which error shape answers a path: the longest registered prefix, else OpenAI's."""

    def __init__(self, default: ErrorShape = openai_error) -> None:
        self._default = default
        self._shapes: dict[str, ErrorShape] = {}

    def register(self, prefix: str, shape: ErrorShape) -> None:
        self._shapes[prefix] = shape

    def for_path(self, path: str) -> ErrorShape:
        matches = [prefix for prefix in self._shapes if path.startswith(prefix)]
        return self._shapes[max(matches, key=len)] if matches else self._default

    def response(self, path: str, error: ApiError) -> JSONResponse:
        return error_response(self.for_path(path), error)


def error_response(shape: ErrorShape, error: ApiError) -> JSONResponse:
    """``error`` answered in ``shape``, with its status and headers."""
    body = shape(error.code, error.message, error.param)
    return JSONResponse(body, status_code=error.status, headers=error.headers())


class UnexpectedErrors:
    """Answers an exception that no handler took, before the answer began, as
    ``unexpected``: in the shape of the API called, not retried, naming the request's job.
    Starlette's own answer is a text/plain 500 that the SDKs retry, each retry a new job,
    the provider called and the team billed again. The traceback is logged. An answer that
    began (a stream) ends as its route ends it (``frontdoor.calls.streamed``)."""

    def __init__(self, app: ASGIApp, *, shapes: ErrorShapes) -> None:
        self._app = app
        self._shapes = shapes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        began = False

        async def answering(message: Message) -> None:
            nonlocal began
            began = began or message["type"] == "http.response.start"
            await send(message)

        try:
            await self._app(scope, receive, answering)
        except Exception:
            if began:
                raise
            log.exception("%s %s failed", scope["method"], clipped(scope["path"]))
            answer = self._shapes.response(scope["path"], unexpected(noted_job(scope)))
            await answer(scope, receive, send)


def install_error_handlers(app: FastAPI) -> ErrorShapes:
    """Answer every error of ``app`` in its API's shape, FastAPI's and Starlette's too."""
    shapes = ErrorShapes()
    app.state.error_shapes = shapes

    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return shapes.response(request.url.path, exc)

    async def gateway_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, GatewayError)
        return shapes.response(request.url.path, error_of(exc))

    async def invalid(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problem = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(part) for part in problem["loc"]) or "request"
        error = ApiError("invalid_request", f"{where}: {problem['msg']}")
        return shapes.response(request.url.path, error)

    async def disconnected(request: Request, exc: Exception) -> JSONResponse:
        # A caller that hung up mid-body, on whatever route read it: no fault of the process,
        # so no traceback in its log, and an answer no one reads. Nothing was stored: a body
        # is acted on only once it is whole.
        error = ApiError("invalid_request", "the connection closed before the body was whole")
        return shapes.response(request.url.path, error)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 405:
            error = ApiError("method_not_allowed", f"{request.method} is not served here")
        elif exc.status_code == 404:
            error = ApiError("not_found", f"no route {shown(request.url.path)}: see /docs")
        else:
            error = ApiError("invalid_request", str(exc.detail))
            error.status = exc.status_code
        return shapes.response(request.url.path, error)

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(GatewayError, gateway_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(ClientDisconnect, disconnected)
    return shapes


__all__ = [
    "FORMAT_SHAPES",
    "HTTP_ONLY",
    "ApiError",
    "ErrorShape",
    "ErrorShapes",
    "UnexpectedErrors",
    "error_of",
    "error_of_result",
    "error_response",
    "refusing",
    "shown",
    "unexpected",
]
