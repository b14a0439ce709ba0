"""A provider whose answer holds values of the wrong type (content 42, tool call arguments 5,
a choice's index "zero", a model 42), a choice the job did not ask for, or text no UTF-8 can
hold (a lone surrogate, escaped in its JSON). Over real HTTP against a small server in the
test: the call is recorded as an attempt with its 200 and billed, never lost with the worker
failing inside the parser or writing the result, nor relayed as a fine answer."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
from aiohttp import web
from anthropic.types import MessageParam

import frontdoor.serve
from mockprovider.catalog import mock_deployment
from queuegate.provider_formats import ANTHROPIC_BODY, anthropic_message
from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from router import load_catalog
from router.providers.anthropic import AnthropicAdapter
from router.providers.base import ProviderError, ServerEvent, Usage
from router.providers.openai import OpenAIAdapter
from router.router import billed_answer
from tests.frontdoor_support import issue_key
from tests.support import running_gateway, serving
from tests.teams import register

HEAD = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
OPENING_DELTA = {"role": "assistant", "content": "Hi "}
OPENING = {**HEAD, "choices": [{"index": 0, "delta": OPENING_DELTA}]}
CALL = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": 5}}
NAMED_F = CALL | {"function": {"name": "f", "arguments": "{}"}}
NAMED_42 = CALL | {"function": {"name": 42, "arguments": "{}"}}
MALFORMED: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = {
    # What the answer (or its malformed chunk) has of its own: in its head, in its choice, in
    # its message (or the chunk's delta).
    "content 42": ({}, {}, {"content": 42}),
    "arguments 5": ({}, {}, {"tool_calls": [CALL]}),
    "index zero": ({}, {"index": "zero"}, {"content": "there"}),
    "index past n": ({}, {"index": 1}, {"content": "there"}),
    "tool index x": ({}, {}, {"tool_calls": [NAMED_F | {"index": "x"}]}),
    "finish_reason 5": ({}, {"finish_reason": 5}, {}),
    "role 42": ({}, {}, {"role": 42}),
    "model 42": ({"model": 42}, {}, {}),
    "name 42": ({}, {}, {"tool_calls": [NAMED_42]}),
    "fingerprint object": ({"system_fingerprint": {"fp": 1}}, {}, {}),
    "logprobs x": ({}, {"logprobs": "x"}, {}),
    "logprobs content x": ({}, {"logprobs": {"content": "x", "refusal": None}}, {}),
    "logprobs refusal 7": ({}, {"logprobs": {"content": None, "refusal": 7}}, {}),
    "annotations x": ({}, {}, {"annotations": "x"}),
    "audio x": ({}, {}, {"audio": "x"}),
    "prompt filters x": ({"prompt_filter_results": "x"}, {}, {}),
    "content filters x": ({}, {"content_filter_results": "x"}, {}),
}
RELAYED = ["logprobs x", "logprobs content x", "logprobs refusal 7", "annotations x"]
RELAYED += ["audio x", "prompt filters x", "content filters x"]
"""Fields relayed as they came, which the gateway itself reads not."""
SURROGATE = '{"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {"content": "a\\ud800b"}}]}'


USAGE = {"prompt_tokens": 3, "completion_tokens": 5}


def _events(malformed: str | None, usage: dict[str, Any]) -> list[str]:
    """The stream: an opening chunk, then the malformed one (if any), then its end."""
    if malformed == "surrogate":
        bad = [SURROGATE]
    elif malformed is None:
        bad = []
    else:
        head, choice, delta = MALFORMED[malformed]
        bad = [json.dumps({**HEAD, **head, "choices": [{"index": 0, "delta": delta, **choice}]})]
    end = {**HEAD, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    last = {**HEAD, "choices": [], "usage": usage}
    return [json.dumps(OPENING), *bad, json.dumps(end), json.dumps(last), "[DONE]"]


@contextlib.asynccontextmanager
async def malformed_provider(
    malformed: str | None, usage: dict[str, Any] = USAGE
) -> AsyncIterator[str]:
    """The URL of an OpenAI provider answering every call with a ``malformed`` value (none:
    "Hi "), and ``usage``."""

    async def answer(request: web.Request) -> web.StreamResponse:
        if (await request.json()).get("stream") is not True:
            head, fields, said = MALFORMED[malformed] if malformed else ({}, {}, OPENING_DELTA)
            message = {"role": "assistant", **said}
            choice = {"index": 0, "message": message, "finish_reason": "stop", **fields}
            body = {**HEAD, "object": "chat.completion", **head, "choices": [choice]}
            return web.json_response(body | {"usage": usage})
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for data in _events(malformed, usage):
            await response.write(f"data: {data}\n\n".encode())
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    async with serving(app) as url:
        yield url


STREAMED = ["content 42", "arguments 5", "index zero", "index past n", "tool index x", *RELAYED]
WHOLE = ["content 42", "finish_reason 5", "index zero", "index past n", "role 42", "model 42"]
WHOLE += ["name 42", "fingerprint object", *RELAYED]


@pytest.mark.parametrize(
    ("malformed", "stream"),
    [(m, True) for m in STREAMED] + [(m, False) for m in WHOLE],
    ids=[f"streamed-{m}" for m in STREAMED] + [f"whole-{m}" for m in WHOLE],
)
async def test_an_answer_of_the_wrong_type_is_a_bad_response_recorded_and_billed(
    settings: Settings, tmp_path: Path, malformed: str, stream: bool
) -> None:
    # Given a provider answering with a value of the wrong type (or a choice not asked for),
    # after a first good chunk
    async with malformed_provider(malformed) as url:
        catalog = tmp_path / "catalog.yaml"
        entries = {"m": {"deployments": [mock_deployment("d", "m", url)]}}
        catalog.write_text(json.dumps({"models": entries}))  # YAML reads JSON
        async with (
            running_gateway(settings, catalog=catalog) as gw,
            gw.client("alpha") as client,
        ):
            # When a job is answered by it
            chunks = []
            if stream:
                call = client.stream("m", [{"role": "user", "content": "Hello"}], timeout=10)
                chunks = [chunk async for chunk in call]
                result = call.result
            else:
                result = await client.chat("m", [{"role": "user", "content": "Hello"}])
            [row] = await gw.usage_rows(1)

    # Expect it answered once as an error, nothing of the malformed chunk relayed before, its
    # call recorded with its 200 as a bad response (counted toward the breaker) and billed,
    # on the result and on its usage row
    assert result is not None and result.status == "error"
    assert [(c.index, c.delta) for c in chunks if c.delta] == [(0, OPENING_DELTA)] * stream
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


@contextlib.asynccontextmanager
async def door_to(settings: Settings, url: str, tmp_path: Path) -> AsyncIterator[tuple[str, str]]:
    """The front door's root URL and a key of team alpha, before a gateway whose model ``m``
    the provider at ``url`` serves (OpenAI's format)."""
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(
        json.dumps({"models": {"m": {"deployments": [mock_deployment("d", "m", url)]}}})
    )
    await register(settings, "alpha", TeamConfig())
    _, key = await issue_key(settings, "alpha")
    async with (
        running_gateway(settings, catalog=catalog),
        frontdoor.serve.serving(settings, load_catalog(catalog, {})) as door,
    ):
        yield door, key


@pytest.mark.parametrize(
    ("details", "stream"),
    [({"prompt_tokens_details": "x"}, False), ({"completion_tokens_details": 7}, True)],
    ids=["whole-prompt-details-x", "streamed-completion-details-7"],
)
async def test_usage_details_of_the_wrong_type_are_read_as_absent_and_never_relayed(
    settings: Settings, tmp_path: Path, details: dict[str, Any], stream: bool
) -> None:
    # Given an OpenAI provider whose usage holds details of the wrong type, its counts good,
    # behind the front door
    hello: list[MessageParam] = [{"role": "user", "content": "Hello"}]
    async with (
        malformed_provider(None, USAGE | details) as url,
        door_to(settings, url, tmp_path) as (door, key),
        anthropic.AsyncAnthropic(base_url=door, api_key=key, max_retries=0) as sdk,
        httpx.AsyncClient(base_url=door, headers={"authorization": f"Bearer {key}"}) as http,
    ):
        # When an Anthropic SDK caller is answered by it, reads the answer again by id, and
        # an OpenAI caller is answered too
        if stream:
            async with sdk.messages.stream(model="m", max_tokens=50, messages=hello) as said:
                message = await said.get_final_message()
        else:
            message = await sdk.messages.create(model="m", max_tokens=50, messages=hello)
        again = await http.get(f"/v1/jobs/{message.id.removeprefix('msg_')}")
        chat = await http.post("/v1/chat/completions", json={"model": "m", "messages": hello})

    # Expect each answered with the counts sent, the details of the wrong type left out
    assert (message.usage.input_tokens, message.usage.output_tokens) == (3, 5)
    assert again.status_code == 200, again.text
    assert again.json()["usage"]["input_tokens"] == 3
    assert chat.status_code == 200, chat.text
    usage = chat.json()["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (3, 5)
    assert "tokens_estimated" not in again.json()["_gateway"]
    for name in ("prompt_tokens_details", "completion_tokens_details"):
        assert isinstance(usage.get(name, {}), dict), usage


@pytest.mark.parametrize("usage", [{"prompt_tokens_details": "x"}, "x"], ids=["details", "usage"])
def test_an_answer_stored_with_usage_of_the_wrong_type_still_has_a_message_form(
    usage: object,
) -> None:
    # Given an answer stored with a usage of the wrong type (before the router left it out)
    answer = {"model": "m", "choices": [{"message": {"content": "Hi"}}], "usage": usage}

    # When it is read as a Messages API answer, expect it read, its counts none
    message = anthropic_message(answer, "msg_1")
    assert message["usage"]["input_tokens"] == message["usage"]["cache_read_input_tokens"] == 0


START = {"type": "message_start", "message": {"id": "msg_1", "model": "m", "content": []}}
TEXT = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
THINKING = {"type": "thinking", "thinking": "", "signature": ""}
BLOCKS_OF_THE_WRONG_TYPE: list[dict[str, Any]] = [
    THINKING | {"thinking": 42},
    THINKING | {"signature": 5},
    {"type": "redacted_thinking", "data": 42},
    {"type": "text", "text": "", "citations": "x"},
    {"type": "server_tool_use", "id": "srvtoolu_1", "name": 42, "input": {}},
    {"type": "tool_use", "id": "toolu_1", "name": 42, "input": {}},
    {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": "x"},
    {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": 5},
]
"""Content blocks relayed as they came (a stream's content_block_start to an Anthropic
caller) of a field of the wrong type."""
BLOCK_IDS = ["thinking-42", "signature-5", "redacted-data-42", "citations-x"]
BLOCK_IDS += ["server-tool-name-42", "tool-name-42", "server-tool-input-x", "search-content-5"]


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
        {"type": "content_block_delta", "index": "0", "delta": {"type": "text_delta", "text": "a"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": 7, "text": "a"}},
        {"type": "content_block_start", "index": 1, "content_block": {"type": 7, "text": "a"}},
        {"type": "message_delta", "delta": {"stop_reason": 42}, "usage": {"output_tokens": 1}},
        START | {"message": START["message"] | {"model": 42}},
        {"type": 7},
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "citations_delta", "citation": 5},
        },
        *(
            {"type": "content_block_start", "index": 1, "content_block": block}
            for block in BLOCKS_OF_THE_WRONG_TYPE
        ),
    ],
    ids=[
        *("text-42", "delta-5", "tool-name-5", "index-far-ahead", "index-negative"),
        *("index-string", "delta-type-7", "block-type-7", "stop-reason-42", "model-42", "type-7"),
        "citation-5",
        *(f"start-{name}" for name in BLOCK_IDS),
    ],
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


ANSWER = {"id": "msg_1", "model": "m", "content": [{"type": "text", "text": "Hi"}]}


@pytest.mark.parametrize(
    "body",
    [
        ANSWER | {"content": [{"type": "text", "text": 42}]},
        ANSWER | {"stop_reason": 42},
        ANSWER | {"content": [{"type": 7, "text": "Hi"}]},
        ANSWER | {"content": [7]},
        ANSWER | {"model": 42},
        ANSWER | {"content": [{"type": "tool_use", "id": 5, "name": "f", "input": {}}]},
        *(ANSWER | {"content": [block]} for block in BLOCKS_OF_THE_WRONG_TYPE),
    ],
    ids=[
        *("text-42", "stop-reason-42", "block-type-7", "block-7", "model-42", "tool-id-5"),
        *BLOCK_IDS,
    ],
)
def test_a_whole_anthropic_answer_of_the_wrong_type_is_a_bad_response(
    body: dict[str, Any],
) -> None:
    # Given a Messages body with a field of the wrong type, expect it read as a bad response
    AnthropicAdapter().parse_response(ANSWER, "m")  # as it is, read
    with pytest.raises(ProviderError) as raised:
        AnthropicAdapter().parse_response(body, "m")
    assert raised.value.error_class == "bad_response"


FUNCTION_CALLS: list[Any] = ["x", {"name": 42}, {"name": "f", "arguments": 5}]
"""Legacy function calls (read, and translated as a tool_use) of the wrong type."""
FUNCTION_CALL_IDS = ["function-call-x", "function-name-42", "function-arguments-5"]


@pytest.mark.parametrize("called", FUNCTION_CALLS, ids=FUNCTION_CALL_IDS)
def test_a_whole_openai_answer_of_a_legacy_function_call_of_the_wrong_type_is_a_bad_response(
    called: Any,
) -> None:
    # Given a chat.completion whose legacy function call is of the wrong type
    message = {"role": "assistant", "content": None, "function_call": called}
    choice = {"index": 0, "message": message, "finish_reason": "function_call"}
    body = {**HEAD, "object": "chat.completion", "choices": [choice], "usage": USAGE}

    # When it is read, expect a bad response
    with pytest.raises(ProviderError) as raised:
        OpenAIAdapter().parse_response(body, "m")
    assert raised.value.error_class == "bad_response"


def _chunk(head: dict[str, Any], choice: dict[str, Any], delta: dict[str, Any]) -> ServerEvent:
    said = {"index": 0, "delta": {"content": "a"} | delta} | choice
    return ServerEvent(None, json.dumps({**HEAD, "choices": [said], **head}))


@pytest.mark.parametrize(
    ("head", "choice", "delta"),
    [
        ({}, {"index": "zero"}, {}),
        ({}, {"index": True}, {}),
        ({}, {"index": -1}, {}),
        ({}, {"index": 2}, {}),
        ({}, {}, {"tool_calls": [{"index": "x", "function": {"arguments": "{}"}}]}),
        ({}, {}, {"tool_calls": [{"index": 0, "type": 7, "function": {"arguments": "{}"}}]}),
        ({}, {}, {"role": 42}),
        ({}, {"finish_reason": 5}, {}),
        ({"model": 42}, {}, {}),
        ({"id": 42}, {}, {}),
        ({"created": "1"}, {}, {}),
        ({"system_fingerprint": {"fp": 1}}, {}, {}),
        ({"service_tier": 1}, {}, {}),
        ({"choices": [7]}, {}, {}),
        *(MALFORMED[name] for name in RELAYED),
        ({}, {"logprobs": {"content": 5}}, {}),
        *(({}, {}, {"function_call": called}) for called in FUNCTION_CALLS),
    ],
    ids=[
        *("index-zero", "index-true", "index-negative", "index-past-n", "tool-index-x"),
        *("tool-type-7", "role-42", "finish-5", "model-42", "id-42", "created-string"),
        *("fingerprint-object", "tier-1", "choice-7"),
        *(name.replace(" ", "-") for name in RELAYED),
        "logprobs-content-5",
        *FUNCTION_CALL_IDS,
    ],
)
def test_an_openai_chunk_of_the_wrong_type_is_a_bad_response_relaying_nothing(
    head: dict[str, Any], choice: dict[str, Any], delta: dict[str, Any]
) -> None:
    # Given an OpenAI stream of a job of two choices, begun with a chunk of each
    parser = OpenAIAdapter().stream_parser("m", None, choices=2)
    for index in (0, 1):
        assert parser.feed(_chunk({}, {"index": index}, {}))

    # When a chunk holding a value of the wrong type comes, expect a bad response (no piece
    # of it relayed)
    with pytest.raises(ProviderError) as raised:
        parser.feed(_chunk(head, choice, delta))
    assert raised.value.error_class == "bad_response"


AZURE_FILTERS = {"hate": {"filtered": False, "severity": "safe"}}
REAL_CHUNKS: list[dict[str, Any]] = [
    # Azure's content filter chunk first: no id, model or time, no choices
    {"id": "", "object": "", "created": 0, "model": "", "choices": []}
    | {"prompt_filter_results": [{"prompt_index": 0, "content_filter_results": AZURE_FILTERS}]},
    {
        **HEAD,
        "choices": [
            {"index": 0, "delta": {"content": "Hi", "refusal": None, "annotations": None}}
            | {"logprobs": None, "finish_reason": None, "content_filter_results": AZURE_FILTERS}
        ],
    },
    {**HEAD, "choices": [{"index": 0, "delta": {}, "logprobs": {"content": None}}]},
    # vLLM's stop_reason (the token or text it stopped at), llama.cpp's timings
    {**HEAD, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop", "stop_reason": 7}]},
    {**HEAD, "choices": [], "usage": USAGE, "timings": {"predicted_ms": 1.5}},
]


def test_what_real_servers_send_beside_the_documented_fields_is_read() -> None:
    # Given an OpenAI-compatible stream holding what Azure, vLLM and llama.cpp add
    parser = OpenAIAdapter().stream_parser("m", None)

    # When it is read, expect its text relayed and its answer whole
    pieces = [p for c in REAL_CHUNKS for p in parser.feed(ServerEvent(None, json.dumps(c)))]
    assert [p.delta.get("content") for p in pieces] == ["Hi"]
    assert parser.completion().response["choices"][0]["message"]["content"] == "Hi"

    # Given a whole answer holding the same: nulls, vLLM's prompt_logprobs and stop_reason
    message = {"role": "assistant", "content": "Hi", "refusal": None, "annotations": None}
    choice = {"index": 0, "message": message | {"audio": None}, "finish_reason": "stop"}
    choice |= {"logprobs": {"content": None, "refusal": None}, "stop_reason": None}
    body = {**HEAD, "object": "chat.completion", "choices": [choice], "usage": USAGE}
    body |= {"prompt_logprobs": [None, {"1": {"logprob": -1.0}}], "timings": {}}
    body |= {"prompt_filter_results": [], "service_tier": None}

    # When it is read, expect it read
    assert OpenAIAdapter().parse_response(body, "m").usage is not None


@pytest.mark.parametrize(
    "wrong", [{"service_tier": 42}, {"cache_creation": "x"}], ids=["tier-42", "cache-creation-x"]
)
def test_anthropic_usage_fields_of_the_wrong_type_are_read_as_absent_and_never_relayed(
    wrong: dict[str, Any],
) -> None:
    # Given an Anthropic answer whose usage holds a field of the wrong type, its counts good
    usage = {"input_tokens": 3, "output_tokens": 5, "service_tier": "standard"} | wrong

    # When it is read whole and billed, expect its counts read, the field left out of what
    # an Anthropic caller gets
    completion = AnthropicAdapter().parse_response(ANSWER | {"usage": usage}, "m")
    assert completion.usage == Usage(3, 5)
    said = billed_answer(completion.response, completion.usage)[ANTHROPIC_BODY]["usage"]
    assert (said["input_tokens"], said["output_tokens"]) == (3, 5)
    assert said.get("service_tier", "standard") == "standard" and "cache_creation" not in said

    # When it is streamed, expect the same of the message_start relayed
    parser = AnthropicAdapter().stream_parser("m", None)
    start = START | {"message": START["message"] | {"usage": usage}}
    delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta"}}
    events = [start, TEXT, delta | {"delta": delta["delta"] | {"text": "Hi"}}]
    pieces = [p for e in events for p in parser.feed(ServerEvent(None, json.dumps(e)))]
    [relayed] = [
        e for p in pieces for e in p.anthropic_events or [] if e["type"] == "message_start"
    ]
    said = relayed["message"]["usage"]
    assert said.get("service_tier", "standard") == "standard" and "cache_creation" not in said


def test_what_anthropic_sends_beside_text_and_tools_is_read() -> None:
    # Given an Anthropic stream of a search: a server tool's call and result, a text with a
    # citation streamed, thinking sealed by its signature
    search = {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}}
    found = {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": []}
    cited = {"type": "text", "text": "", "citations": None}
    citation = {"type": "web_search_result_location", "url": "https://a.example", "cited_text": "a"}
    events = [
        START,
        {"type": "content_block_start", "index": 0, "content_block": THINKING},
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "thinking_delta", "thinking": "t"},
        },
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "signature_delta", "signature": "s"},
        },
        {"type": "content_block_start", "index": 1, "content_block": search},
        {"type": "content_block_start", "index": 2, "content_block": found},
        {"type": "content_block_start", "index": 3, "content_block": cited},
        {
            "type": "content_block_delta",
            "index": 3,
            "delta": {"type": "citations_delta", "citation": citation},
        },
        {"type": "content_block_delta", "index": 3, "delta": {"type": "text_delta", "text": "Hi"}},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn"},
            "usage": {"output_tokens": 5},
        },
        {"type": "message_stop"},
    ]
    parser = AnthropicAdapter().stream_parser("m", None)

    # When it is read, expect its text and thinking relayed and its answer whole
    pieces = [p for e in events for p in parser.feed(ServerEvent(None, json.dumps(e)))]
    assert [p.delta for p in pieces if p.delta] == [{"reasoning_content": "t"}, {"content": "Hi"}]
    body = parser.completion().response[ANTHROPIC_BODY]
    assert [block["type"] for block in body["content"]] == [
        "thinking",
        "server_tool_use",
        "web_search_tool_result",
        "text",
    ]

    # Given the same answer whole, its citations a list, expect it read
    cited |= {"text": "Hi", "citations": [citation]}
    content = [THINKING | {"thinking": "t", "signature": "s"}, search, found, cited]
    assert AnthropicAdapter().parse_response(ANSWER | {"content": content}, "m").usage is None
