"""The Anthropic Message Batches format: ``params`` requests in, ``result`` lines out.

In:  {"custom_id", "params": {"model", "max_tokens", "messages", ...}}
Out: {"custom_id", "result": {"type": "succeeded", "message"} | {"type": "errored", "error"}
      | {"type": "canceled"} | {"type": "expired"}}

An answer a Message cannot hold (a tool called with input that is not a JSON object) is
``errored``, its error ``provider_error`` saying what the model sent: what a line says is
what its request counts as (``category``).
"""

from __future__ import annotations

from typing import Any

from producer.batch.answers import Answer, Category, Request
from queuegate.api_errors import anthropic_error
from queuegate.provider_formats import (
    NotAnObject,
    anthropic_id,
    anthropic_message,
    openai_request,
)


def body(entry: dict[str, Any]) -> dict[str, Any]:
    """The request a line holds, its ``params``; ValueError when they are no object."""
    params = entry.get("params")
    if not isinstance(params, dict):
        raise ValueError("params must be an object")
    return params


def parse(custom_id: str, params: dict[str, Any]) -> Request:
    """The request of one line in canonical form; ValueError names what is wrong."""
    messages, canonical = openai_request(params)
    model = params.get("model")
    return Request(
        custom_id=custom_id,
        model=model if isinstance(model, str) else None,
        messages=messages,
        params=canonical,
    )


def line(answer: Answer) -> dict[str, Any]:
    result = answer.result
    out: dict[str, Any]
    if answer.category in ("expired", "canceled"):
        out = {"type": answer.category}
    elif result is not None and result.status == "ok" and result.response is not None:
        try:
            message = anthropic_message(result.response, anthropic_id(answer.digest))
            out = {"type": "succeeded", "message": message}
        except NotAnObject as exc:
            # What the model answered has no Message form: the request errored, saying what
            # it was (served and billed, as the line's gateway block tells).
            out = {"type": "errored", "error": anthropic_error("provider_error", str(exc))}
    else:
        failure = answer.failure
        out = {"type": "errored", "error": anthropic_error(failure.code, failure.message)}
    return {"custom_id": answer.custom_id, "result": out}


_CATEGORIES: dict[str, Category] = {
    "succeeded": "done",
    "errored": "failed",
    "expired": "expired",
    "canceled": "canceled",
}


def category(line: dict[str, Any]) -> Category:
    """What an output line says happened, read back when a collect resumes."""
    return _CATEGORIES.get(str((line.get("result") or {}).get("type")), "failed")
