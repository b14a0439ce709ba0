"""Every string a job sends out of the gateway, gathered in one walk and put back changed.

    tree = outgoing(job)                     # what reaches a provider, as JSON
    texts = gather(tree)                     # values ["messages", "role", "user", ...]
                                             # wheres ["a key", "a key", "role", ...]
    tree = rebuild(tree, new_values)         # the same tree, its strings replaced

The walk goes everywhere in the tree (every message field and content part, tool calls,
parameters and the unknown ones passed through, at any depth), so a field added later is
scanned without anyone listing it. Two kinds of string are told apart:

- values (``where`` is None): free text, safe to rewrite;
- structure (``where`` names it): dict keys, ids, roles, types, function names and the signed
  parts of thinking blocks sent back. Rewriting one would break the request (a tool call id
  no longer matching its result, a tool name no longer matching its definition, a thinking
  block no longer matching its signature), so a policy refuses the job instead.

A string holding a JSON object or array (a tool call's ``arguments``) is walked as JSON, so a
value hidden behind an escape (``bob\\u0040example.com``) is found and a rewrite keeps it
valid JSON of the same shape; a base64 ``data:`` URL (an image) holds bytes, not text, and is
left alone.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from queuegate.messages import ChatJob

GATEWAY_ONLY = frozenset(
    {"v", "job_id", "team", "model", "fallbacks", "metadata", "deadline", "stream", "cache"}
    | {"answer_format"}
)
"""ChatJob fields the gateway reads and no provider receives (the adapters build the model
name from the catalog; ``metadata`` stays with the job and its result)."""

IDENTIFIERS = frozenset({"role", "type", "id", "tool_call_id"})
"""Keys whose values tie a request together rather than carry text."""
TOOL_NAMES = {"function": "a function name", "custom": "a custom tool name"}
"""The objects of OpenAI's tools, tool choices and tool calls whose ``name`` ties a call to
its tool, and what such a name is called."""

SIGNED: dict[Any, tuple[str, ...]] = {
    "thinking": ("thinking", "signature"),
    "redacted_thinking": ("data",),
}
"""Fields of the thinking blocks an Anthropic-format caller sends back, which the provider
signed or encrypted: it refuses a block changed in any of them."""

MAX_JSON_DEPTH = 64
"""A string nested deeper is scanned as plain text: walking it could exhaust the stack."""

_JSON_START = re.compile(r"\s*[\[{]")


@dataclass(frozen=True)
class Texts:
    """The strings of a tree in walk order, and for each what it is."""

    values: list[str]
    wheres: list[str | None]
    """None for a value; for structure, what it is (``a key``, ``tool_call_id``, ...)."""


Visit = Callable[[str, str | None], str]


def outgoing(job: ChatJob) -> dict[str, Any]:
    """The job's fields that reach a provider (messages, params and its extras), as JSON."""
    return job.model_dump(mode="json", exclude_none=True, exclude=set(GATEWAY_ONLY))


def gather(tree: Any) -> Texts:
    """Every string of ``tree`` in walk order."""
    texts = Texts([], [])
    values, wheres = texts.values.append, texts.wheres.append

    def keep(value: str, where: str | None) -> str:
        values(value)
        wheres(where)
        return value

    _Walk(keep).value(tree, None, None, False)
    return texts


def rebuild(tree: Any, values: list[str]) -> Any:
    """``tree`` with its strings, in ``gather``'s order, replaced by ``values``."""
    replacements: Iterator[str] = iter(values)
    return _Walk(lambda _value, _where: next(replacements)).value(tree, None, None, False)


class _Walk:
    def __init__(self, visit: Visit) -> None:
        self._visit = visit

    def value(self, value: Any, where: str | None, parent: Any, in_json: bool) -> Any:
        """``value`` walked; ``where`` says what its strings are, ``parent`` is its key."""
        if isinstance(value, str):
            return self._string(value, where)
        if isinstance(value, dict):
            visit = self._visit
            return {
                (visit(key, "a key") if isinstance(key, str) else key): self.value(
                    item, _structure(key, parent, None if in_json else value), key, in_json
                )
                for key, item in value.items()
            }
        if isinstance(value, list):
            return [self.value(item, where, parent, in_json) for item in value]
        if in_json and isinstance(value, int) and not isinstance(value, bool):
            # A number inside a JSON string is text its writer typed: a card number can be one.
            text = str(value)
            new = self._visit(text, where)
            return value if new == text else new
        return value

    def _string(self, value: str, where: str | None) -> Any:
        first = value[:1]
        if first == "d" and value.startswith("data:") and ";base64," in value[:256]:
            return value
        if where is None and (
            first in ("{", "[") or (first.isspace() and _JSON_START.match(value))
        ):
            parsed = _json(value)
            if parsed is not None:
                new = self.value(parsed, None, None, True)
                return value if new == parsed else json.dumps(new, ensure_ascii=False)
        return self._visit(value, where)


def _structure(key: Any, parent: Any, block: dict[str, Any] | None) -> str | None:
    """What the value under ``key`` (of ``block``, a dict of the request itself, not of a
    JSON string) is, when it is structure rather than text."""
    if key in IDENTIFIERS:
        return str(key)
    if key == "name" and parent in TOOL_NAMES:
        return TOOL_NAMES[parent]
    if block is not None and key in SIGNED.get(block.get("type"), ()):
        return f"a {block['type']} block's {key}"
    return None


def _json(value: str) -> dict[str, Any] | list[Any] | None:
    """The object or array ``value`` holds, when it holds one not nested too deep."""
    try:
        parsed = json.loads(value)
    except (ValueError, RecursionError):
        return None
    if not isinstance(parsed, dict | list) or _deeper_than(parsed, MAX_JSON_DEPTH):
        return None
    return parsed


def _deeper_than(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return False
