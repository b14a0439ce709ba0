"""A request body's validation error as one line a caller can act on:
``<field path>: <reason>``, the path as it is in the body they sent; OpenAI's errors also
name it as their ``param``.

The request schemas (``openai_request``, ``anthropic_request``) tag the members of their
unions with names holding a space (``"text block"``, ``"user message"``), so that no tag is
mistaken for a field of the body when the path is traced::

    except ValidationError as exc:
        raise invalid_request(exc, body) from None
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from frontdoor.errors import ApiError, shown


def tagged_by(field: str, kind: str) -> Callable[[Any], str | None]:
    """A union discriminator: the value's ``field`` (``type``, ``role``) as the tag
    ``"<value> <kind>"``; None when it has none."""

    def tag(value: Any) -> str | None:
        found = value.get(field) if isinstance(value, dict) else getattr(value, field, None)
        return f"{found} {kind}" if isinstance(found, str) else None

    tag.__name__ = field  # pydantic names the discriminator by it in its errors
    return tag


def deepest(exc: ValidationError) -> ErrorDetails:
    """The error a client can act on: the deepest one, as the providers report one."""
    return max(exc.errors(include_url=False), key=lambda e: len(e["loc"]))


def invalid_request(exc: ValidationError, body: Any) -> ApiError:
    """The ``invalid_request`` error of ``body``'s deepest validation error, its ``param``
    the path of the field at fault."""
    where, reason = _problem(deepest(exc), body)
    return ApiError("invalid_request", _joined(where, reason), param=where or None)


def describe(error: ErrorDetails, body: Any) -> str:
    return _joined(*_problem(error, body))


def _joined(where: str, reason: str) -> str:
    return f"{where}: {reason}" if where else reason


def _problem(error: ErrorDetails, body: Any) -> tuple[str, str]:
    """Where in ``body`` the error is (its path; "" for the body itself), and what is wrong
    there."""
    where = error_path(error, body)
    kind = error["type"]
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        # A member the gateway does not know (a block type, a role) or none at all: either
        # way, the ones it knows.
        ctx = error.get("ctx") or {}
        field = str(ctx.get("discriminator", "type")).strip("'").removesuffix("()")
        if not isinstance(error.get("input"), dict):
            return where, "Input should be an object"
        if kind == "union_tag_not_found":
            return f"{where}.{field}", "Field required"
        expected = ", ".join(
            repr(_member(tag.strip().strip("'")))
            for tag in str(ctx.get("expected_tags", "")).split(",")
        )
        tag = shown(_member(str(ctx.get("tag", ""))))
        return (
            f"{where}.{field}",
            f"{tag!r} is not supported by this gateway; use one of {expected}",
        )
    return where, error["msg"].removeprefix("Value error, ")


def _member(tag: str) -> str:
    """The value a union tag was made of (``"text block"``: ``text``)."""
    return tag.rsplit(" ", 1)[0] if " " in tag else tag


def error_path(error: ErrorDetails, body: Any) -> str:
    """The error's location in the body: the steps that lead into it, and a missing field,
    without the names pydantic gives the members of a union (``str``, ``text block``)."""
    steps: list[str] = []
    node = body
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


__all__ = ["deepest", "describe", "error_path", "invalid_request", "tagged_by"]
