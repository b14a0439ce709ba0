"""The batch formats by name, and telling them apart from a request entry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from producer.batch import anthropic, openai
from producer.batch.answers import Answer, Category, Request

FormatName = Literal["openai", "anthropic"]


@dataclass(frozen=True)
class Format:
    name: FormatName
    parse: Callable[[dict[str, Any]], Request]
    line: Callable[[Answer], dict[str, Any]]
    category: Callable[[dict[str, Any]], Category]


FORMATS: dict[FormatName, Format] = {
    "openai": Format("openai", openai.parse, openai.line, openai.category),
    "anthropic": Format("anthropic", anthropic.parse, anthropic.line, anthropic.category),
}


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
