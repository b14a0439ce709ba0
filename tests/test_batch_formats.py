"""The Anthropic batch format read as canonical requests, and canonical answers written back."""

from __future__ import annotations

import codecs
import hashlib
from pathlib import Path
from typing import Any

import orjson
import pytest
from anthropic.types import Message

from cli.batch import anthropic_only
from producer.batch.answers import Answer
from producer.batch.checks import batch_checks
from producer.batch.formats import FORMATS, FormatName
from producer.batch.jobs import JobReader, Refused
from producer.batch.lines import BatchFile
from queuegate.errors import BatchError, NotText
from queuegate.messages import ChatJob, ChatResult, ErrorCode, ErrorInfo, GatewayInfo
from queuegate.provider_formats import anthropic_message, openai_request
from queuegate.request_limits import Limits
from router import load_catalog
from router.providers import AnthropicAdapter
from tests.batch_files import ANTHROPIC_EXAMPLE

WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Get the current weather in a given location",
    "input_schema": {
        "type": "object",
        "properties": {"location": {"type": "string"}},
        "required": ["location"],
    },
}

TOOL_PARAMS: dict[str, Any] = {
    "model": "claude-haiku",
    "max_tokens": 512,
    "system": "You are terse.",
    "stop_sequences": ["\n\nHuman:"],
    "metadata": {"user_id": "u-42"},
    "tools": [WEATHER_TOOL],
    "tool_choice": {"type": "any"},
    "messages": [
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me check."},
                {
                    "type": "tool_use",
                    "id": "toolu_01",
                    "name": "get_weather",
                    "input": {"location": "Paris"},
                },
            ],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "18 C"}],
        },
    ],
}


def test_anthropic_params_become_a_canonical_request() -> None:
    # When a Messages API request with a system prompt and a tool round trip is read
    messages, params = openai_request(TOOL_PARAMS)

    # Expect OpenAI chat messages and params with the same meaning
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool"]
    assert messages[0]["content"] == "You are terse."
    assert messages[2]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert messages[3] == {"role": "tool", "tool_call_id": "toolu_01", "content": "18 C"}
    assert params["max_tokens"] == 512
    assert params["stop"] == ["\n\nHuman:"]
    assert params["user"] == "u-42"
    assert params["tool_choice"] == "required"
    assert params["tools"][0]["function"]["parameters"] == WEATHER_TOOL["input_schema"]


def test_an_anthropic_request_survives_the_round_trip_to_the_anthropic_adapter() -> None:
    # Given a Messages API request read as a canonical job
    messages, params = openai_request(TOOL_PARAMS)
    job = ChatJob(job_id="j", team="alpha", model="m", messages=messages, params=params)

    # When the Anthropic adapter builds the provider request from it
    body = AnthropicAdapter().build_request(job, "claude-3-5-haiku-latest", None).body

    # Expect the original request back
    for key in ("system", "max_tokens", "stop_sequences", "metadata", "messages"):
        assert body[key] == TOOL_PARAMS[key], key
    assert body["tools"] == [WEATHER_TOOL]
    assert body["tool_choice"] == {"type": "any"}


OSLO = '{"location": "Oslo"}'


def test_a_canonical_answer_is_written_as_an_anthropic_message() -> None:
    # Given a chat.completion that calls a tool, with cached prompt tokens
    completion = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "claude-3-5-haiku-latest",
        "choices": [
            {
                "index": 0,
                "finish_reason": "tool_calls",
                "message": {
                    "role": "assistant",
                    "content": "Checking.",
                    "tool_calls": [
                        {
                            "id": "toolu_02",
                            "type": "function",
                            "function": {
                                "name": "get_weather",
                                "arguments": '{"location": "Oslo"}',
                            },
                        }
                    ],
                },
            }
        ],
        "usage": {
            "prompt_tokens": 30,
            "completion_tokens": 7,
            "prompt_tokens_details": {"cached_tokens": 10},
        },
    }

    # When it is written in the Anthropic format
    message = Message.model_validate(anthropic_message(completion, "msg_1"))

    # Expect the SDK's Message, with the tool use, stop reason and usage Anthropic reports
    assert message.stop_reason == "tool_use"
    assert message.content[0].type == "text"
    assert message.content[1].type == "tool_use"
    assert message.content[1].input == {"location": "Oslo"}
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens) == (20, 10)


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
        ({"max_tokens": 5, "messages": []}, "params.messages must be a non-empty list"),
        ({"max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, "role"),
        (
            {
                "max_tokens": 5,
                "messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}],
            },
            "params.messages.0.content.0.source: document sources of type None",
        ),
        (
            {
                "max_tokens": 5,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "document", "source": {"type": "url", "url": "u"}}],
                    }
                ],
            },
            r"params.messages.0.content.0.source: document sources of type 'url' \(None\) are "
            "not supported: send a PDF as base64",
        ),
    ],
)
def test_what_the_canonical_format_cannot_carry_is_refused_by_name(
    params: dict[str, Any], reason: str
) -> None:
    with pytest.raises(ValueError, match=reason):
        openai_request(params)


def _document(path: Path, n: int) -> bytes:
    requests = [{**ANTHROPIC_EXAMPLE[0], "custom_id": f"r{i}"} for i in range(n)]
    raw = orjson.dumps({"requests": requests}, option=orjson.OPT_INDENT_2)
    path.write_bytes(raw)
    return raw


def test_a_requests_document_is_read_one_request_at_a_time(tmp_path: Path) -> None:
    # Given a {"requests": [...]} document spanning many read blocks
    raw = _document(tmp_path / "doc.json", 3000)

    # When it is read
    file = BatchFile(tmp_path / "doc.json")
    entries = list(file)

    # Expect every request, numbered by the line it starts on, and the whole file's digest
    assert file.document
    lines = raw.split(b"\n")
    assert len(entries) == 3000
    for number, entry in entries:
        assert lines[number - 1].strip() == b"{", number
        assert f'"custom_id": "{entry["custom_id"]}"'.encode() in lines[number]
    assert entries[-1][1]["custom_id"] == "r2999"
    assert file.digest.hexdigest() == hashlib.sha256(raw).hexdigest()


def test_a_requests_document_is_read_whatever_the_order_of_its_keys(tmp_path: Path) -> None:
    # Given a one-line document whose "requests" comes after another key, and a BOM
    document = {"description": "nightly", "requests": ANTHROPIC_EXAMPLE, "z": [1, {"a": 2}]}
    path = tmp_path / "doc.json"
    path.write_bytes(codecs.BOM_UTF8 + orjson.dumps(document))

    # When it is read, expect the document's requests, not one JSONL line
    file = BatchFile(path)
    entries = list(file)
    assert file.document
    assert [entry["custom_id"] for _, entry in entries] == [
        "my-first-request",
        "my-second-request",
    ]
    assert {number for number, _ in entries} == {1}


def test_a_jsonl_file_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    # Given a UTF-8 JSONL file saved with a BOM (as some editors do)
    path = tmp_path / "bom.jsonl"
    path.write_bytes(codecs.BOM_UTF8 + b"".join(orjson.dumps(e) + b"\n" for e in ANTHROPIC_EXAMPLE))

    # Expect its first line read as JSON
    entries = list(BatchFile(path))
    assert [(n, e["custom_id"]) for n, e in entries] == [
        (1, "my-first-request"),
        (2, "my-second-request"),
    ]


def test_a_requests_document_not_in_utf8_is_refused_where_it_is_not(tmp_path: Path) -> None:
    # Given a document of requests in UTF-8 ("é" is 2 bytes, one cut by a read block's end)
    requests = [
        {"custom_id": f"r{i}", "params": {"model": "m", "max_tokens": 5, "messages": [
            {"role": "user", "content": "é" * 50}]}}
        for i in range(2000)
    ]  # fmt: skip
    raw = codecs.BOM_UTF8 + orjson.dumps({"requests": requests}, option=orjson.OPT_INDENT_2)
    path = tmp_path / "doc.json"
    path.write_bytes(raw)
    # Expect every request read, each "é" whole
    assert [entry["params"]["messages"][0]["content"] for _, entry in BatchFile(path)] == [
        "é" * 50
    ] * 2000
    # When one "é" past the first read block is in Latin-1 instead
    at = raw.index("é".encode(), 100_000)
    path.write_bytes(raw[:at] + b"\xe9" + raw[at + 2 :])
    # Expect the file refused whole, at that byte, on its line: never read as "\ufffd"
    with pytest.raises(NotText) as refused:
        list(BatchFile(path))
    line = raw[:at].count(b"\n") + 1
    assert f": not UTF-8 JSON text (line {line}: byte 0xe9 at offset {at:,})" in str(refused.value)
    assert refused.value.problems == [(line, f"not UTF-8 text: byte 0xe9 at offset {at:,}")]


def test_a_cut_short_requests_document_is_refused(tmp_path: Path) -> None:
    # Given a document cut off in its middle
    raw = _document(tmp_path / "doc.json", 500)
    (tmp_path / "doc.json").write_bytes(raw[: len(raw) // 2])

    # Expect an error naming the file and the line of the request cut short
    with pytest.raises(BatchError, match=r"doc\.json: the request on line \d+ is not valid JSON"):
        list(BatchFile(tmp_path / "doc.json"))


GATEWAY = GatewayInfo(model_requested="gpt-4o-mini")


def _answer(result: ChatResult) -> Answer:
    return Answer("r1", "nightly:r1", "done" if result.status == "ok" else "failed", result)


@pytest.mark.parametrize("served", ["chatcmpl-9xYz", "msg_01XFDUDYJgAACzvnptvVoYEL"])
def test_a_lines_answer_carries_the_gateways_id_not_the_providers(served: str) -> None:
    # Given a request of a batch that an OpenAI or an Anthropic deployment answered, with its
    # own id
    completion = {
        "id": served,
        "object": "chat.completion",
        "model": "gpt-4o-mini",
        "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Hi"}}
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1},
    }
    result = ChatResult(
        job_id="nightly:r1", team="alpha", status="ok", response=completion, gateway=GATEWAY
    )

    # When its line is written in either format
    anthropic = FORMATS["anthropic"].line(_answer(result))["result"]["message"]["id"]
    openai = FORMATS["openai"].line(_answer(result))["response"]["body"]["id"]

    # Expect ids made from the gateway's job id, as its other answers have (the provider's
    # would say what served the job), the same on every collect
    digest = _answer(result).digest
    assert (anthropic, openai) == (f"msg_{digest}", f"chatcmpl-{digest}")
    assert served[-8:] not in anthropic + openai
    assert FORMATS["anthropic"].line(_answer(result))["result"]["message"]["id"] == anthropic


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        ("invalid_request", "invalid_request_error"),
        ("unknown_model", "invalid_request_error"),
        ("unauthorized", "invalid_request_error"),
        ("idempotency_conflict", "invalid_request_error"),
        ("budget_exhausted", "insufficient_quota"),
        ("rate_limited", "requests"),
        ("all_providers_failed", "server_error"),
        ("deadline_exceeded", "server_error"),
    ],
)
def test_openai_error_lines_use_openais_error_types(code: ErrorCode, kind: str) -> None:
    # Given a request that failed with one of the gateway's codes
    error = ErrorInfo(code=code, message="it failed")
    result = ChatResult(
        job_id="nightly:r1", team="alpha", status="error", error=error, gateway=GATEWAY
    )

    # When its OpenAI line is written, expect OpenAI's error type and the gateway's code
    body = FORMATS["openai"].line(_answer(result))["response"]["body"]
    assert body["error"]["type"] == kind and body["error"]["code"] == code


def test_top_k_for_a_model_another_provider_may_serve_is_an_invalid_line() -> None:
    # Given an Anthropic request with top_k, and a catalog where only claude-haiku is
    # served by Anthropic alone (gpt-4o-mini is OpenAI's, falling back to Anthropic)
    entry = {"custom_id": "r1", "params": {**ANTHROPIC_EXAMPLE[0]["params"], "top_k": 5}}
    catalog = load_catalog(None, {})
    only = anthropic_only(catalog)
    assert only == {"claude-haiku"}

    def reader(model: str) -> JobReader:
        return JobReader(
            batch="b", jobs="b", team="alpha", model=model, deadline=None, anthropic_models=only
        )

    # When it is read for each, expect it refused for the OpenAI model and kept for Claude
    with pytest.raises(ValueError, match="top_k is Anthropic's alone"):
        reader("gpt-4o-mini").job(entry)
    assert reader("claude-haiku").job(entry).params.model_extra == {"top_k": 5}


def _with_fallbacks(format: FormatName, fallbacks: Any) -> dict[str, Any]:
    """A batch entry of ``format`` for flaky-gpt naming ``fallbacks``."""
    if format == "anthropic":
        params = {**ANTHROPIC_EXAMPLE[0]["params"], "model": "flaky-gpt", "fallbacks": fallbacks}
        return {"custom_id": "r1", "params": params}
    body = {"model": "flaky-gpt", "messages": [{"role": "user", "content": "Hi"}]}
    return {
        "custom_id": "r1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": body | {"fallbacks": fallbacks},
    }


def _cli_reader() -> JobReader:
    """A reader as ``queuegate batch submit`` makes it: the catalog's aliases, its checks."""
    aliases = frozenset(load_catalog(None, {}).models)
    limits = Limits(models=aliases, max_messages=100, max_job_bytes=1_000_000)
    return JobReader(
        batch="b",
        jobs="b",
        team="alpha",
        model=None,
        deadline=None,
        models=aliases,
        checks=batch_checks(limits),
    )


@pytest.mark.parametrize("format", ["openai", "anthropic"])
def test_a_requests_own_fallbacks_are_its_jobs_never_a_parameter(format: FormatName) -> None:
    job = _cli_reader().job(_with_fallbacks(format, ["gpt-4o-mini"]))

    assert job.fallbacks == ["gpt-4o-mini"]
    assert "fallbacks" not in (job.params.model_extra or {})


@pytest.mark.parametrize("format", ["openai", "anthropic"])
def test_a_fallback_the_catalog_lacks_is_a_problem_of_the_file_as_a_model_is(
    format: FormatName,
) -> None:
    with pytest.raises(ValueError, match=r"fallbacks\.1: model 'gpt-9' is not in the catalog"):
        _cli_reader().job(_with_fallbacks(format, ["gpt-4o-mini", "gpt-9"]))


@pytest.mark.parametrize(
    ("format", "reason"),
    [
        ("openai", "fallbacks: List should have at most 8 items"),
        ("anthropic", "params.fallbacks: List should have at most 8 items"),
    ],
)
def test_too_many_fallbacks_are_refused_as_the_endpoint_refuses_them(
    format: FormatName, reason: str
) -> None:
    with pytest.raises(Refused) as refused:
        _cli_reader().job(_with_fallbacks(format, ["gpt-4o-mini"] * 9))

    assert refused.value.error.message.startswith(reason)


def test_top_k_is_refused_where_a_requests_own_fallback_is_another_providers() -> None:
    # Given an Anthropic request with top_k for claude-haiku, which Anthropic alone serves
    entry = {"custom_id": "r1", "params": {**ANTHROPIC_EXAMPLE[0]["params"], "top_k": 5}}
    entry["params"] |= {"model": "claude-haiku", "fallbacks": ["gpt-4o-mini"]}
    only = anthropic_only(load_catalog(None, {}))
    reader = JobReader(
        batch="b", jobs="b", team="alpha", model=None, deadline=None, anthropic_models=only
    )

    # When it names an OpenAI model as its fallback, expect it refused as for that model
    with pytest.raises(ValueError, match="top_k is Anthropic's alone"):
        reader.job(entry)


def test_an_openai_line_without_url_is_told_the_url_is_missing() -> None:
    # Given an OpenAI batch line with no url
    entry = {"custom_id": "r1", "method": "POST", "body": {"messages": []}}

    # When it is read, expect the missing field named, not "url None"
    with pytest.raises(ValueError, match="url is missing: it must be /v1/chat/completions"):
        FORMATS["openai"].body(entry)
