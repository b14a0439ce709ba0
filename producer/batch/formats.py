"""The batch formats by name, and telling them apart from a request entry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from producer.batch import anthropic, openai
from producer.batch.answers import Answer, Category, Request
from queuegate.control import job_id
from queuegate.messages import AnswerFormat, ErrorInfo

FormatName = AnswerFormat


@dataclass(frozen=True)
class Format:
    name: FormatName
    body: Callable[[dict[str, Any]], dict[str, Any]]
    """The request a line holds: what its API's own endpoint would take as a body."""
    parse: Callable[[str, dict[str, Any]], Request]
    """(custom_id, body): the request in canonical form."""
    line: Callable[[Answer], dict[str, Any]]
    category: Callable[[dict[str, Any]], Category]


FORMATS: dict[FormatName, Format] = {
    "openai": Format("openai", openai.body, openai.parse, openai.line, openai.category),
    "anthropic": Format(
        "anthropic", anthropic.body, anthropic.parse, anthropic.line, anthropic.category
    ),
}


def refused(format: FormatName, batch: str, custom_id: str, error: ErrorInfo) -> dict[str, Any]:
    """The line of a request answered without being published (its request is refused as
    its API refuses it, or ``error`` says why else): a failed answer in the format's words,
    an ``errored`` result or an error-file line with the HTTP status of ``error.code`` (its
    ``param`` named, as the synchronous endpoint names it), as the providers' batches report
    a request they could not validate. ``batch``: what its job ids start with."""
    return FORMATS[format].line(Answer(custom_id, job_id(batch, custom_id), "failed", error=error))


def detect(entry: dict[str, Any]) -> FormatName:
    """Anthropic entries carry ``params``; OpenAI ones ``method``, ``url`` and ``body``."""
    if "params" in entry:
        return "anthropic"
    if {"body", "url", "method"} & entry.keys():
        return "openai"
    raise ValueError(
        "neither an OpenAI request (custom_id, method, url, body) "
        "nor an Anthropic one (custom_id, params)"
    )
