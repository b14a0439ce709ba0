"""A validation error of a value a caller sent as one line they can act on:
``<field path>: <reason>``, the path as it is in what they sent (OpenAI's errors name it as
their ``param``). The front door's request errors and a worker's refusals of a job's
parameters both say it so.

Schemas tag the members of their unions with names holding a space (``"text block"``,
``"json_schema format"``), so that no tag is mistaken for a field when the path is traced.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic_core import ErrorDetails

from queuegate.visible import clipped

ECHOED = 100
"""Characters of a caller's own value (a model name, an id, a field name) an error repeats."""


MAX_MESSAGE = 1000
"""Characters of an error message at most, whatever it repeats: an answer never grows with
what the caller sent."""


def bounded(message: str) -> str:
    """An error message as it is answered: its first ``MAX_MESSAGE`` characters."""
    return f"{message[:MAX_MESSAGE]}…" if len(message) > MAX_MESSAGE else message


def shown(text: str) -> str:
    """A caller's value as an error repeats it: its first ``ECHOED`` characters."""
    return clipped(text, ECHOED)


def tagged_by(field: str, kind: str) -> Callable[[Any], str | None]:
    """A union discriminator: the value's ``field`` (``type``, ``role``) as the tag
    ``"<value> <kind>"``; None when it has none."""

    def tag(value: Any) -> str | None:
        found = value.get(field) if isinstance(value, dict) else getattr(value, field, None)
        return f"{found} {kind}" if isinstance(found, str) else None

    tag.__name__ = field  # pydantic names the discriminator by it in its errors
    return tag


def problem(error: ErrorDetails, value: Any) -> tuple[str, str]:
    """Where in ``value`` the error is (its path; "" for the value itself), and what is wrong
    there. ``error`` must carry its input (``include_input``, the default)."""
    where = error_path(error, value)
    kind = error["type"]
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        # A member the gateway does not know (a block type, a role) or none at all: either
        # way, the ones it knows.
        ctx = error.get("ctx") or {}
        field = str(ctx.get("discriminator", "type")).strip("'").removesuffix("()")
        if not isinstance(error.get("input"), dict):
            return where, "Input should be an object"
        inside = f"{where}.{field}" if where else field
        if kind == "union_tag_not_found":
            present = field in error["input"]  # but not text, which no tag is made of
            return inside, "Input should be a valid string" if present else "Field required"
        expected = ", ".join(
            repr(_member(tag.strip().strip("'")))
            for tag in str(ctx.get("expected_tags", "")).split(",")
        )
        tag = shown(_member(str(ctx.get("tag", ""))))
        return inside, f"{tag!r} is not supported by this gateway; use one of {expected}"
    return where, error["msg"].removeprefix("Value error, ")


def _member(tag: str) -> str:
    """The value a union tag was made of (``"text block"``: ``text``)."""
    return tag.rsplit(" ", 1)[0] if " " in tag else tag


def error_path(error: ErrorDetails, value: Any) -> str:
    """The error's location in ``value``: the steps that lead into it, and a missing field,
    without the names pydantic gives the members of a union (``str``, ``text block``)."""
    steps: list[str] = []
    node = value
    loc = error["loc"]
    for position, step in enumerate(loc):
        inside = (isinstance(node, dict) and isinstance(step, str) and step in node) or (
            isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node)
        )
        if inside:
            node = node[step]
        elif not (error["type"] == "missing" and position == len(loc) - 1):
            continue
        steps.append(shown(str(step)))
    return ".".join(steps)


__all__ = ["ECHOED", "MAX_MESSAGE", "bounded", "error_path", "problem", "shown", "tagged_by"]
