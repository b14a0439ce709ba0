"""A worker's spans of one job (called only when ``queuegate.tracing.ON``).

    with job_span(message, team, queue, queued_ms, trusted=...):  # publish to ack
        ...                                            # admission, attempts, publishes
        finished(outcome)                              # what it came to, on the job span

The job span continues the trace its message carries (the front door's publish span) when
the front door published it (``trusted``: its broker-validated ``user_id`` is the front
door's); a job a team published itself starts the gateway's own trace, linked to the
team's publish span (``queuegate.tracing.caller``). It starts at the publish: its first
child, ``queued <team>``, is the time the job waited in its queue. Children the worker adds
under it: ``admission <team>``, one span per provider call (``chat <model>``: retries and
fallbacks are siblings, router/router.py), ``publish result`` and ``publish usage``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import orjson
from aio_pika.abc import AbstractIncomingMessage

from queuegate import tracing
from workers.outcome import Outcome

OPERATION = "chat"
"""``gen_ai.operation.name`` of every job: a chat completion."""


@contextmanager
def job_span(
    message: AbstractIncomingMessage, team: str, queue: str, queued_ms: float, *, trusted: bool
) -> Iterator[None]:
    """The job's span while the block runs, named ``chat`` until ``finished`` names its
    model; the time queued recorded first, as its child."""
    delivered = time.time_ns()
    published = delivered - int(queued_ms * 1_000_000)
    # Each attribute costs the exporter about 2 us (a span about 10): what another says
    # (the job id as messaging.message.id, the time queued) is left out.
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": OPERATION,
        "messaging.system": "rabbitmq",
        "messaging.destination.name": queue,
        "queuegate.team": team,
    }
    if message.message_id:
        attributes["queuegate.job_id"] = message.message_id
    if message.redelivered:
        attributes["queuegate.redelivered"] = True
    parent, links = tracing.caller(message.headers, trusted=trusted)
    with tracing.span(
        OPERATION,
        kind="CONSUMER",
        parent=parent,
        links=links,
        start_ns=published,
        attributes=attributes,
    ):
        if published < delivered:
            tracing.record(
                f"queued {team}", published, delivered, attributes={"queuegate.team": team}
            )
        yield


def finished(outcome: Outcome) -> None:
    """Name the current job span after the model asked, and say on it how the job ended."""
    span = tracing.current()
    usage, result = outcome.usage, outcome.result
    if usage.model_requested:
        span.update_name(f"{OPERATION} {usage.model_requested}")
    attributes: dict[str, Any] = {
        "gen_ai.request.model": usage.model_requested,
        "gen_ai.usage.input_tokens": usage.input_tokens,
        "gen_ai.usage.output_tokens": usage.output_tokens,
        "queuegate.job_id": result.job_id,
        "queuegate.attempts": usage.attempts,
        "queuegate.fallback_used": usage.fallback_used,
        "queuegate.cost_usd": float(usage.cost_usd),
        **tracing.response_attributes(result.response),
    }
    if usage.cached:
        attributes["queuegate.cached"] = True
    if usage.provider:
        attributes["gen_ai.provider.name"] = tracing.PROVIDER_NAMES.get(
            usage.provider, usage.provider
        )
    if usage.model_used:
        attributes["queuegate.model_used"] = usage.model_used
    if usage.deployment:
        attributes["queuegate.deployment"] = usage.deployment
    if usage.identity:
        attributes["queuegate.identity"] = usage.identity
    if tracing.CONTENT and usage.content is not None and usage.content.capture == "full":
        attributes["gen_ai.input.messages"] = _json(_messages(usage.content.prompt))
        choices = (result.response or {}).get("choices") or []
        outputs = [
            {**_message(choice.get("message") or {}), "finish_reason": choice.get("finish_reason")}
            for choice in choices
            if isinstance(choice, dict)
        ]
        attributes["gen_ai.output.messages"] = _json(outputs)
    span.set_attributes(attributes)
    if result.error is not None:
        tracing.errored(
            span,
            result.error.code,
            result.error.message if tracing.CONTENT else result.error.code,
        )


def _json(value: object) -> str:
    return orjson.dumps(value).decode()


def _messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [_message(message) for message in messages]


def _message(message: Mapping[str, Any]) -> dict[str, Any]:
    """An OpenAI chat message in the GenAI conventions' shape: its role, and its content as
    parts (text, tool calls, a tool's answer; other parts by their type alone)."""
    parts: list[dict[str, Any]] = []
    content = message.get("content")
    if isinstance(content, str):
        parts.append({"type": "text", "content": content})
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                parts.append({"type": "text", "content": part.get("text")})
            elif isinstance(part, dict):
                parts.append({"type": str(part.get("type"))})
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        parts.append(
            {
                "type": "tool_call",
                "id": call.get("id"),
                "name": function.get("name"),
                "arguments": function.get("arguments"),
            }
        )
    role = message.get("role")
    if role == "tool":
        parts = [
            {"type": "tool_call_response", "id": message.get("tool_call_id"), "response": content}
        ]
    return {"role": role, "parts": parts}
