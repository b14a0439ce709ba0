"""A team's PII policy applied to a job's prompt before it leaves for the provider."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from queuegate.errors import InvalidRequest
from queuegate.messages import ChatJob, ChatMessage
from queuegate.tenancy import PiiPolicy
from workers.pii import redact, scan


def apply(
    job: ChatJob, policy: PiiPolicy, *, on_found: Callable[[list[str]], None] | None = None
) -> tuple[ChatJob, list[str]]:
    """The job to send (redacted under ``redact``) and the PII families its prompt holds.

    Raises InvalidRequest under ``block`` when the prompt holds any; the message names the
    families, never the values.
    """
    if policy == "off":
        return job, []
    found = sorted({f.kind for m in job.messages for text in _texts(m) for f in scan(text)})
    if not found:
        return job, []
    if on_found is not None:
        on_found(found)
    if policy == "block":
        raise InvalidRequest(
            f"the prompt contains personal data ({', '.join(found)}) and team "
            f"{job.team!r} blocks it: remove it or ask for the redact policy"
        )
    if policy == "redact":
        job = job.model_copy(update={"messages": [redact_message(m) for m in job.messages]})
    return job, found


def redact_message(message: ChatMessage) -> ChatMessage:
    content = message.content
    if isinstance(content, str):
        return message.model_copy(update={"content": redact(content)[0]})
    if isinstance(content, list):
        parts = [_redact_part(part) for part in content]
        return message.model_copy(update={"content": parts})
    return message


def redact_value(value: Any) -> Any:
    """Every string inside ``value`` (dicts and lists walked) with its findings replaced."""
    if isinstance(value, str):
        return redact(value)[0]
    if isinstance(value, list):
        return [redact_value(v) for v in value]
    if isinstance(value, dict):
        return {k: redact_value(v) for k, v in value.items()}
    return value


def _texts(message: ChatMessage) -> list[str]:
    if isinstance(message.content, str):
        return [message.content]
    if isinstance(message.content, list):
        return [p["text"] for p in message.content if isinstance(p.get("text"), str)]
    return []


def _redact_part(part: dict[str, Any]) -> dict[str, Any]:
    text = part.get("text")
    return {**part, "text": redact(text)[0]} if isinstance(text, str) else part
