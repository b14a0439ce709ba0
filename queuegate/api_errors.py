"""Our error codes as the HTTP APIs we speak present them: one status, each API's own type.

The status of each code is ``queuegate.messages.HTTP_STATUS``, the same for every API; each
API names the error in its own vocabulary::

    status = HTTP_STATUS[code]
    body = openai_error(code, message, param) # {"error": {"message", "type", "param", "code"}}
    body = anthropic_error(code, message)     # {"type": "error", "error": {"type", "message"}}

Used by the HTTP front door and by batch output lines, so an error reads the same whether it
came over HTTP or in a batch file. A code outside the wire contract (an HTTP-level one such
as ``request_too_large``) falls back to each API's generic type.
"""

from __future__ import annotations

from typing import Any

OPENAI_ERROR_TYPES = {
    "invalid_request": "invalid_request_error",
    "unknown_model": "invalid_request_error",
    "context_length_exceeded": "invalid_request_error",
    # A request that reuses a job id with other content: the client's mistake, as a 422.
    "idempotency_conflict": "invalid_request_error",
    # OpenAI answers a bad key 401 with this type too.
    "unauthorized": "invalid_request_error",
    "forbidden": "invalid_request_error",
    "budget_exhausted": "insufficient_quota",
    "rate_limited": "requests",
    "queue_full": "requests",
    "too_many_requests": "requests",
    "request_too_large": "invalid_request_error",
    "storage_quota_exceeded": "invalid_request_error",
    "headers_too_large": "invalid_request_error",
    "request_timeout": "invalid_request_error",
    "not_found": "invalid_request_error",
    "method_not_allowed": "invalid_request_error",
}
"""Our error codes as OpenAI error types; the rest (timeouts, provider failures) are
``server_error``. The ``code`` stays ours, which says more."""

ANTHROPIC_ERROR_TYPES = {
    "invalid_request": "invalid_request_error",
    "unknown_model": "not_found_error",
    "context_length_exceeded": "invalid_request_error",
    "idempotency_conflict": "invalid_request_error",
    "unauthorized": "authentication_error",
    "forbidden": "permission_error",
    "budget_exhausted": "billing_error",
    "rate_limited": "rate_limit_error",
    "queue_full": "rate_limit_error",
    "too_many_requests": "rate_limit_error",
    "request_too_large": "request_too_large",
    "storage_quota_exceeded": "invalid_request_error",
    "headers_too_large": "invalid_request_error",
    "request_timeout": "invalid_request_error",
    "not_found": "not_found_error",
    "method_not_allowed": "invalid_request_error",
    "deadline_exceeded": "timeout_error",
    "canceled": "conflict_error",
    "already_answered": "conflict_error",
}
"""Our error codes as Anthropic error types, each the one Anthropic documents for its status
(504 ``timeout_error``, 409 ``conflict_error``, ...); the rest (provider failures, 502) are
``api_error``."""


def openai_error(code: str, message: str, param: str | None = None) -> dict[str, Any]:
    """An OpenAI error body, which the ``openai`` SDK raises as its typed exceptions;
    ``param`` is the path of the request's field at fault (``messages.0.content``), when one
    is, as OpenAI names it."""
    kind = OPENAI_ERROR_TYPES.get(code, "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def anthropic_error(code: str, message: str, param: str | None = None) -> dict[str, Any]:
    """An Anthropic error body; the message leads with our code, which Anthropic's types
    cannot say. Anthropic's errors have no ``param``: the message names the field."""
    kind = ANTHROPIC_ERROR_TYPES.get(code, "api_error")
    return {"type": "error", "error": {"type": kind, "message": f"{code}: {message}"}}


__all__ = ["ANTHROPIC_ERROR_TYPES", "OPENAI_ERROR_TYPES", "anthropic_error", "openai_error"]
