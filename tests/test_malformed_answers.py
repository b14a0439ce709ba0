"""A provider whose answer holds values of the wrong type (content 42, tool call arguments 5)
or text no UTF-8 can hold (a lone surrogate, escaped in its JSON). Over real HTTP against a
small server in the test: the call is recorded as an attempt with its 200 and billed, never
lost with the worker failing inside the parser or writing the result."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from mockprovider.catalog import mock_deployment
from queuegate.settings import Settings
from router.providers.anthropic import AnthropicAdapter
from router.providers.base import ProviderError, ServerEvent
from tests.support import running_gateway, serving

HEAD = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
OPENING = {**HEAD, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi "}}]}
CALL = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": 5}}
MALFORMED = {
    "content 42": {"content": 42},
    "arguments 5": {"tool_calls": [CALL]},
}
SURROGATE = '{"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {"content": "a\\ud800b"}}]}'


def _events(malformed: str) -> list[str]:
    """The stream: an opening chunk, then the malformed one, then its end."""
    if malformed == "surrogate":
        bad = SURROGATE
    else:
        bad = json.dumps({**HEAD, "choices": [{"index": 0, "delta": MALFORMED[malformed]}]})
    end = {**HEAD, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    usage = {**HEAD, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5}}
    return [json.dumps(OPENING), bad, json.dumps(end), json.dumps(usage), "[DONE]"]


@contextlib.asynccontextmanager
async def malformed_provider(malformed: str) -> AsyncIterator[str]:
    """The URL of an OpenAI provider answering every call with a ``malformed`` value."""

    async def answer(request: web.Request) -> web.StreamResponse:
        if (await request.json()).get("stream") is not True:
            message = {"role": "assistant", **MALFORMED[malformed]}
            choice = {"index": 0, "message": message, "finish_reason": "stop"}
            return web.json_response({**HEAD, "object": "chat.completion", "choices": [choice]})
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for data in _events(malformed):
            await response.write(f"data: {data}\n\n".encode())
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    async with serving(app) as url:
        yield url


@pytest.mark.parametrize(
    ("malformed", "stream"),
    [("content 42", True), ("arguments 5", True), ("content 42", False)],
    ids=["streamed-content", "streamed-arguments", "whole-content"],
)
async def test_an_answer_of_the_wrong_type_is_a_bad_response_recorded_and_billed(
    settings: Settings, tmp_path: Path, malformed: str, stream: bool
) -> None:
    # Given a provider answering with a value of the wrong type, after a first good chunk
    async with malformed_provider(malformed) as url:
        catalog = tmp_path / "catalog.yaml"
        entries = {"m": {"deployments": [mock_deployment("d", "m", url)]}}
        catalog.write_text(json.dumps({"models": entries}))  # YAML reads JSON
        async with (
            running_gateway(settings, catalog=catalog) as gw,
            gw.client("alpha") as client,
        ):
            # When a job is answered by it
            if stream:
                call = client.stream("m", [{"role": "user", "content": "Hello"}], timeout=10)
                _ = [chunk async for chunk in call]
                result = call.result
            else:
                result = await client.chat("m", [{"role": "user", "content": "Hello"}])
            [row] = await gw.usage_rows(1)

    # Expect it answered once as an error, its call recorded with its 200 as a bad response
    # (counted toward the breaker) and billed, on the result and on its usage row
    assert result is not None and result.status == "error"
    [attempt] = result.gateway.attempts
    assert (attempt.deployment, attempt.status, attempt.error) == ("d", 200, "bad_response")
    assert [(a["status"], a["error"]) for a in row["attempt_log"]] == [(200, "bad_response")]
    assert row["cost_usd"] > 0 and row["input_tokens"] > 0


async def test_a_lone_surrogate_in_a_stream_is_relayed_as_a_replacement_character(
    settings: Settings, tmp_path: Path
) -> None:
    # Given a provider streaming a lone surrogate, escaped in its JSON
    async with malformed_provider("surrogate") as url:
        catalog = tmp_path / "catalog.yaml"
        catalog.write_text(
            json.dumps({"models": {"m": {"deployments": [mock_deployment("d", "m", url)]}}})
        )
        async with (
            running_gateway(settings, catalog=catalog) as gw,
            gw.client("alpha") as client,
        ):
            # When a job is streamed from it
            call = client.stream("m", [{"role": "user", "content": "Hello"}], timeout=10)
            _ = [chunk async for chunk in call]
            [row] = await gw.usage_rows(1)

    # Expect it answered, the surrogate as U+FFFD, its call recorded and billed
    result = call.result
    assert result is not None and result.status == "ok", result
    assert result.content == "Hi a\ufffdb"
    assert [(a["status"], a["error"]) for a in row["attempt_log"]] == [(200, None)]
    assert row["cost_usd"] > 0


START = {"type": "message_start", "message": {"id": "msg_1", "model": "m", "content": []}}
TEXT = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}


@pytest.mark.parametrize(
    "event",
    [
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": 42}},
        {"type": "content_block_delta", "index": 0, "delta": 5},
        {
            "type": "content_block_start",
            "index": 1,
            "content_block": {"type": "tool_use", "name": 5},
        },
        {"type": "content_block_start", "index": 10**9, "content_block": TEXT["content_block"]},
        {"type": "content_block_start", "index": -1, "content_block": TEXT["content_block"]},
    ],
    ids=["text-42", "delta-5", "tool-name-5", "index-far-ahead", "index-negative"],
)
def test_an_anthropic_event_of_the_wrong_type_is_a_bad_response(event: dict[str, object]) -> None:
    # Given an Anthropic stream begun with a text block
    parser = AnthropicAdapter().stream_parser("m", None)
    for began in (START, TEXT):
        parser.feed(ServerEvent(str(began["type"]), json.dumps(began)))

    # When an event holding a value of the wrong type comes, expect a bad response
    with pytest.raises(ProviderError) as raised:
        parser.feed(ServerEvent(str(event["type"]), json.dumps(event)))
    assert raised.value.error_class == "bad_response"


def test_a_whole_anthropic_answer_of_the_wrong_type_is_a_bad_response() -> None:
    # Given a Messages body whose text is a number, expect it read as a bad response
    body = {"id": "msg_1", "model": "m", "content": [{"type": "text", "text": 42}]}
    with pytest.raises(ProviderError) as raised:
        AnthropicAdapter().parse_response(body, "m")
    assert raised.value.error_class == "bad_response"
