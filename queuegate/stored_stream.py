"""A whole stored answer (a response cache hit, a retry under an Idempotency-Key) as the
deltas its live stream would have given, so a replay reads the same as the first call.

Per choice, in the order a live stream sends them: ``reasoning_content``, then ``content`` or
``refusal`` (with the choice's logprobs), then each tool call as its first delta would be
(its ``index``, which OpenAI's SDK requires, with ``id``, ``type`` and ``function``). The
worker's relay of a cache hit and the front door's writer of a stored outcome both use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from queuegate.provider_formats import as_int

ANSWER = ("content", "refusal")
"""A message's answer text fields (one of them at most is set)."""


@dataclass(frozen=True)
class Replayed:
    """One delta of a replayed choice, with the choice's logprobs on its first text."""

    index: int
    delta: dict[str, Any]
    logprobs: dict[str, Any] | None = None


def choice_deltas(choice: dict[str, Any]) -> list[Replayed]:
    """The deltas of one stored choice."""
    index = as_int(choice.get("index"))
    message = choice.get("message") or {}
    logprobs = choice.get("logprobs") or None
    out: list[Replayed] = []
    reasoning = message.get("reasoning_content")
    if isinstance(reasoning, str) and reasoning:
        out.append(Replayed(index, {"reasoning_content": reasoning}))
    # Logprobs belong to the answer's tokens (content or refusal), not to its reasoning.
    answer = {f: message[f] for f in ANSWER if isinstance(message.get(f), str) and message[f]}
    if answer or logprobs is not None:
        out.append(Replayed(index, answer, logprobs))
    for position, call in enumerate(message.get("tool_calls") or []):
        if isinstance(call, dict):
            out.append(Replayed(index, {"tool_calls": [_first_delta(position, call)]}))
    return out


def replayed_deltas(response: dict[str, Any]) -> list[Replayed]:
    """The deltas of every stored choice, choice by choice."""
    choices = response.get("choices") or []
    return [d for choice in choices if isinstance(choice, dict) for d in choice_deltas(choice)]


def _first_delta(position: int, call: dict[str, Any]) -> dict[str, Any]:
    # A stored call is whole and has no index: its position in the message is the one the
    # live stream gave it (the parsers keep calls in index order).
    return {"type": "function", **call, "index": position}


__all__ = ["Replayed", "choice_deltas", "replayed_deltas"]
