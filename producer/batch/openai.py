"""The OpenAI Batch format: ``/v1/chat/completions`` request lines in, output lines out.

In:  {"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": {...}}
Out: {"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}
A job that failed has its error in ``response.body.error`` (with the HTTP status an HTTP
gateway would answer); an expired or canceled one has ``response: null`` and ``error.code``
``batch_expired`` or ``batch_cancelled``, as OpenAI writes them.
"""

from __future__ import annotations

from typing import Any

from producer.batch.answers import Answer, Category, Request
from queuegate.api_errors import openai_error
from queuegate.messages import HTTP_STATUS
from queuegate.provider_formats import openai_id, openai_view
from queuegate.visible import clipped

URL = "/v1/chat/completions"
_OWNED = frozenset({"model", "messages", "stream", "stream_options"})
_BATCH_ERRORS: dict[Category, tuple[str, str]] = {
    "expired": ("batch_expired", "This request could not be executed before the deadline."),
    "canceled": ("batch_cancelled", "This request was canceled with its batch."),
}
_EXPIRED_SERVED = (
    "The batch's deadline passed while this request was being served: the provider was "
    "called, and the call is billed (the line's gateway block shows it)."
)
"""The ``batch_expired`` message of a request a provider was called for: it was executed
(and billed) all the same, which "could not be executed" would deny."""


def body(entry: dict[str, Any]) -> dict[str, Any]:
    """The request a line holds, its ``body``; ValueError when the line is not a request of
    the format (its method, its url, a body that is no object)."""
    if entry.get("method") != "POST":
        raise ValueError(f"method must be POST, not {clipped(str(entry.get('method')))!r}")
    if "url" not in entry:
        raise ValueError(f"url is missing: it must be {URL}")
    if entry.get("url") != URL:
        raise ValueError(f"url {clipped(str(entry.get('url')))!r} is not served: only {URL}")
    request = entry.get("body")
    if not isinstance(request, dict):
        raise ValueError("body must be an object")
    return request


def parse(custom_id: str, request: dict[str, Any]) -> Request:
    """The request of one line, from its ``body``."""
    model = request.get("model")
    return Request(
        custom_id=custom_id,
        model=model if isinstance(model, str) else None,
        messages=request.get("messages"),
        params={k: v for k, v in request.items() if k not in _OWNED},
    )


def line(answer: Answer) -> dict[str, Any]:
    """The output line of an answer."""
    digest = answer.digest
    out: dict[str, Any] = {"id": f"batch_req_{digest}", "custom_id": answer.custom_id}
    result = answer.result
    if answer.category in _BATCH_ERRORS:
        code, message = _BATCH_ERRORS[answer.category]
        if answer.category == "expired" and result is not None and result.gateway.attempts:
            message = _EXPIRED_SERVED
        out.update(response=None, error={"code": code, "message": message})
    elif result is not None and result.status == "ok":
        body = openai_view(result.response, openai_id(digest)) if result.response else None
        out.update(response={"status_code": 200, "request_id": f"req_{digest}", "body": body})
        out["error"] = None
    else:
        error = answer.failure
        body = openai_error(error.code, error.message, error.param)
        status = HTTP_STATUS.get(error.code, 500)
        out.update(response={"status_code": status, "request_id": f"req_{digest}", "body": body})
        out["error"] = None
    return out


def category(line: dict[str, Any]) -> Category:
    """What an output line says happened, read back when a collect resumes."""
    error = line.get("error") or {}
    for kind, (code, _) in _BATCH_ERRORS.items():
        if error.get("code") == code:
            return kind
    response = line.get("response") or {}
    return "done" if response.get("status_code") == 200 else "failed"
