"""Chat messages of another shape, type or value than OpenAI's API gives them: the front door
and a worker both refuse each naming its path (``param``), never calling a provider. Each
but the text part's was sent on (and the provider's refusal or answer billed) by the worker
before the two shared one description of them (``queuegate.openai_messages``)."""

from __future__ import annotations

from typing import Any

ASK = {"role": "user", "content": "Hello there"}


def _user_part(part: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": "Look"}, part]}]


def _calling(*calls: dict[str, Any]) -> dict[str, Any]:
    return {"role": "assistant", "content": None, "tool_calls": list(calls)}


def _answer(call_id: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": "r"}


def _called(call: dict[str, Any]) -> list[dict[str, Any]]:
    return [ASK, _calling(call), _answer("c1")]


CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}

REFUSED: list[tuple[list[dict[str, Any]], str]] = [
    (_user_part({"type": "bogus", "text": "x"}), "messages.0.content.1.type"),
    (_user_part({"type": "text", "text": 5}), "messages.0.content.1.text"),
    (
        _user_part({"type": "image_url", "image_url": {"url": 5}}),
        "messages.0.content.1.image_url.url",
    ),
    (
        _user_part(
            {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "ultra"}}
        ),
        "messages.0.content.1.image_url.detail",
    ),
    (
        _user_part({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "ogg"}}),
        "messages.0.content.1.input_audio.format",
    ),
    (
        _called({"id": "c1", "type": "function", "function": {"name": "f", "arguments": 5}}),
        "messages.1.tool_calls.0.function.arguments",
    ),
    (
        _called({"id": "c1", "type": "weird", "function": {"name": "f", "arguments": "{}"}}),
        "messages.1.tool_calls.0.type",
    ),
    ([ASK, {"role": "tool", "content": "r"}], "messages.1.tool_call_id"),
    # OpenAI's 400 (empty_array); the openai SDK for Node once sent it, defaulted
    ([ASK, {"role": "assistant", "content": "x", "tool_calls": []}, ASK], "messages.1.tool_calls"),
    # Tool calls left unanswered (some answered, at the end too), an answer to no call, two
    # calls of one id (a queued job's were called)
    (
        [*_called(CALL)[:1], _calling(CALL, {**CALL, "id": "c2"}), _answer("c1")],
        "messages.1.tool_calls",
    ),
    ([*_called(CALL)[:1], _calling(CALL, CALL), _answer("c1")], "messages.1.tool_calls"),
    ([*_called(CALL)[:2], ASK], "messages.1.tool_calls"),
    (
        [*_called(CALL)[:2], {"role": "tool", "tool_call_id": "zz", "content": "r"}],
        "messages.2.tool_call_id",
    ),
]
"""Each list of messages, and the path of the field at fault."""

ENUMS = {
    "messages.0.content.1.type": "'text', 'image_url', 'input_audio', 'file'",
    "messages.0.content.1.image_url.detail": "'auto', 'low' or 'high'",
    "messages.0.content.1.input_audio.format": "'wav' or 'mp3'",
    "messages.1.tool_calls.0.type": "'function', 'custom'",
}
"""The values each refusal of a name lists as accepted."""
