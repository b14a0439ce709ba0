"""Requests checked as OpenAI and Anthropic check them, at the front door, before anything is
published: sent with the official SDKs (which send whatever they are given), answered 400
naming the field, and never reaching a worker or the provider."""

from __future__ import annotations

import typing
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import openai
import pytest
from anthropic.types import message_count_tokens_params

from frontdoor import chat_request
from frontdoor.chat_request import check_chat
from frontdoor.errors import ApiError
from queuegate import openai_request
from queuegate.openai_request import REQUEST_JOB_FIELDS, ROUTED_EXTRAS, ChatRequest
from queuegate.provider_formats import ANTHROPIC_COUNT_TOKENS_PARAMS, OPENAI_CHAT_PARAMS
from queuegate.request_limits import Limits, checked_messages
from queuegate.settings import Settings
from tests import openai_message_cases
from tests.frontdoor_support import HELLO, Door, open_door
from tests.openai_param_cases import ENUMS, REFUSED

CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
ANSWER_OF_NONE = {"role": "tool", "tool_call_id": "zz", "content": "r"}
OPENAI_REFUSALS: list[tuple[dict[str, Any], str]] = [
    ({"tools": [{"type": "function"}]}, "tools.0.function: Field required"),
    ({"tools": [{"type": "web"}]}, "tools.0.type: 'web' is not supported"),
    ({"stop": ["x"] * 1000}, "stop: 1000 sequences; OpenAI takes at most 4"),
    ({"max_tokens": "5"}, "max_tokens: Input should be a valid integer"),
    ({"temperature": 3}, "temperature: Input should be less than or equal to 2"),
    ({"n": 0}, "n: Input should be greater than or equal to 1"),
    (
        {"max_tokens": 5, "max_completion_tokens": 5},
        "max_tokens: set together with max_completion_tokens, which OpenAI refuses",
    ),
    ({"logprobs": "yes"}, "logprobs: Input should be a valid boolean"),
    ({"response_format": {"type": "yaml"}}, "response_format.type: 'yaml' is not supported"),
    ({"metadata": {"k": 1}}, "metadata.k: Input should be a valid string"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.tool_call_id: Field required"),
    ({"messages": [{"role": "user"}]}, "messages.0.content: Field required"),
    (
        {"extra_body": {"team": "beta", "job_id": "j", "deadline": "2030-01-01T00:00:00Z"}},
        "unrecognized request arguments deadline, job_id, team: the gateway sets",
    ),
    (
        {"extra_body": {"cache": False, "unsupported_params": "drop"}},
        "unrecognized request arguments cache, unsupported_params: the gateway sets",
    ),
    (
        {"extra_body": {"min_p": 0.1}},
        "unrecognized request arguments min_p: not parameters of OpenAI's chat completions",
    ),
    ({"extra_body": {"extra_body": {"min_p": 0.1}}}, "extra_body: the openai SDK sends"),
    # A parameter OpenAI takes only beside another (an attack's were published and called)
    ({"tool_choice": "required"}, "tool_choice: required needs tools to call"),
    ({"parallel_tool_calls": False}, "parallel_tool_calls: only allowed when tools are offered"),
    ({"top_logprobs": 3}, "top_logprobs: only allowed when logprobs is true"),
    ({"stream_options": {"include_usage": True}}, "stream_options: only allowed when stream"),
    (
        {"messages": [*HELLO, {"role": "assistant", "tool_calls": [CALL]}, *HELLO]},
        "messages.1.tool_calls: an assistant message with tool_calls must be followed by tool "
        "messages answering each tool_call_id; unanswered: call_1",
    ),
    (
        {"messages": [*HELLO, {"role": "assistant", "tool_calls": [CALL]}, ANSWER_OF_NONE]},
        "messages.2.tool_call_id: 'zz' answers no tool call of the assistant message before it",
    ),
    ({"messages": [ANSWER_OF_NONE]}, "messages.0.tool_call_id: 'zz' answers no tool call"),
]


@pytest.fixture
async def door(settings: Settings) -> AsyncIterator[Door]:
    async with open_door(settings) as opened:
        yield opened


async def test_what_openai_refuses_is_refused_naming_the_field_and_never_published(
    door: Door,
) -> None:
    async with door.client() as client:
        for fields, reason in OPENAI_REFUSALS:
            request: dict[str, Any] = {"model": "gpt-4o-mini", "messages": HELLO, **fields}
            with pytest.raises(openai.BadRequestError) as refused:
                await client.chat.completions.create(**request)
            assert refused.value.code == "invalid_request"
            assert reason in refused.value.message, (fields, refused.value.message)
            assert refused.value.response.headers["x-request-id"]
        # Expect the next valid request the only one a worker and the provider saw
        assert await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert len(await door.gateway.usage_rows(1)) == 1
    assert door.gateway.mock.stats.calls == 1


async def test_openai_parameters_the_worker_refuses_are_refused_naming_their_path(
    door: Door,
) -> None:
    async with door.client() as client:
        for params, param in REFUSED:
            # When a request carries a parameter (nested or not) of another type or value than
            # OpenAI's, as a worker refuses it in a job
            with pytest.raises(openai.BadRequestError) as refused:
                await client.chat.completions.create(
                    model="gpt-4o-mini", messages=HELLO, extra_body=params
                )
            # Expect it refused 400 naming it by its path, the values a name may take listed
            error = refused.value
            assert (error.code, error.param) == ("invalid_request", param), error.message
            assert f"{param}: " in error.message
            assert ENUMS.get(param, "") in error.message
        assert await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    # ... none of them published: the next valid request the only one served
    assert len(await door.gateway.usage_rows(1)) == 1
    assert door.gateway.mock.stats.calls == 1


async def test_openai_messages_the_worker_refuses_are_refused_naming_their_path(
    door: Door,
) -> None:
    async with door.client() as client:
        for messages, param in openai_message_cases.REFUSED:
            # When a request's message (nested or not) has another type or value than
            # OpenAI's, as a worker refuses it in a job
            with pytest.raises(openai.BadRequestError) as refused:
                await client.chat.completions.create(model="gpt-4o-mini", messages=messages)  # type: ignore[arg-type]
            # Expect it refused 400 naming it by its path, the values a name may take listed
            error = refused.value
            assert (error.code, error.param) == ("invalid_request", param), error.message
            assert f"{param}: " in error.message
            assert openai_message_cases.ENUMS.get(param, "") in error.message
        assert await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    # ... none of them published: the next valid request the only one served
    assert len(await door.gateway.usage_rows(1)) == 1
    assert door.gateway.mock.stats.calls == 1


async def test_more_stop_sequences_than_openais_are_served_for_a_model_anthropic_serves(
    door: Door,
) -> None:
    # Given a model only Anthropic serves, which takes more stop sequences than OpenAI's 4
    stop = ["a", "b", "c", "d", "e"]
    async with door.client() as client:
        # When an OpenAI caller sends five
        await client.chat.completions.create(model="claude-haiku", messages=HELLO, stop=stop)
    # Expect them sent to Anthropic as they were
    assert door.gateway.mock.requests[-1].body["stop_sequences"] == stop


TOOL = {"name": "f", "input_schema": {"type": "object"}}
RESULT = {"type": "tool_result", "tool_use_id": "t1", "content": "x"}
USE = {"type": "tool_use", "id": "t1", "name": "f", "input": {}}
IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "!!!"}}


async def test_what_anthropic_refuses_is_refused_naming_the_field_and_never_published(
    door: Door,
) -> None:
    refusals: list[tuple[dict[str, Any], str]] = [
        (
            {"messages": [{"role": "user", "content": ""}]},
            "messages.0: all messages must have non-empty content",
        ),
        ({"messages": [{"role": "user", "content": []}]}, "messages.0: all messages must have"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": ""}]}]},
            "messages.0: text content blocks must be non-empty",
        ),
        # The SDK computes with max_tokens itself: a string goes in extra_body, as stream's.
        ({"extra_body": {"stream": "yes"}}, "stream: Input should be a valid boolean"),
        ({"extra_body": {"max_tokens": "5"}}, "max_tokens: Input should be a valid integer"),
        # As Anthropic refuses them (an attack's were published and called)
        ({"tools": [TOOL, TOOL]}, "tools: Tool names must be unique"),
        (
            {"messages": [{"role": "user", "content": [RESULT]}]},
            "messages.0.content.0: unexpected `tool_use_id` found in `tool_result` blocks: t1",
        ),
        (
            {"messages": [*HELLO, {"role": "assistant", "content": [USE]}, *HELLO]},
            "messages.2: `tool_use` ids were found without `tool_result` blocks immediately "
            "after: t1",
        ),
        (
            {"messages": [*HELLO, {"role": "assistant", "content": [USE, USE]}, *HELLO]},
            "messages.1: `tool_use` ids must be unique",
        ),
        (
            {
                "messages": [
                    *HELLO,
                    {"role": "assistant", "content": [USE]},
                    {"role": "user", "content": [{"type": "text", "text": "x"}, RESULT]},
                ]
            },
            "messages.2.content.1: `tool_result` blocks must come first in the message",
        ),
        (
            {
                "messages": [
                    *HELLO,
                    {"role": "assistant", "content": [USE]},
                    {"role": "user", "content": [RESULT, RESULT]},
                ]
            },
            "messages.2.content.1: each `tool_use` must have a single result",
        ),
        ({"stop_sequences": [" "]}, "stop_sequences: each stop sequence must contain non-white"),
        (
            {"messages": [{"role": "user", "content": [IMAGE]}]},
            "messages.0.content.0.source.data: invalid base64 data",
        ),
    ]
    async with anthropic.AsyncAnthropic(
        base_url=door.url, api_key=door.keys["alpha"], max_retries=0
    ) as sdk:
        for fields, reason in refusals:
            request: dict[str, Any] = {
                "model": "claude-haiku",
                "max_tokens": 20,
                "messages": HELLO,
                **fields,
            }
            with pytest.raises(anthropic.BadRequestError) as refused:
                await sdk.messages.create(**request)
            assert reason in refused.value.message, (fields, refused.value.message)
            assert refused.value.response.headers["x-request-id"]
        assert await sdk.messages.create(model="claude-haiku", max_tokens=20, messages=HELLO)
    assert len(await door.gateway.usage_rows(1)) == 1
    assert door.gateway.mock.stats.calls == 1


async def test_each_route_counts_a_requests_messages_once(
    door: Door, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given every count of a request's messages noted, wherever the front door makes it
    counted: list[int] = []

    def counting(body: dict[str, Any], max_messages: int) -> list[Any]:
        counted.append(len(body["messages"]))
        return checked_messages(body, max_messages)

    monkeypatch.setattr(openai_request, "checked_messages", counting)
    monkeypatch.setattr(chat_request, "checked_messages", counting)
    two = [*HELLO, {"role": "assistant", "content": "Hi"}, *HELLO]
    async with (
        door.client() as client,
        anthropic.AsyncAnthropic(
            base_url=door.url, api_key=door.keys["alpha"], max_retries=0
        ) as sdk,
    ):
        # When a request of three messages comes by the OpenAI route, then the Anthropic one
        assert await client.chat.completions.create(model="gpt-4o-mini", messages=two)
        by_openai, counted[:] = list(counted), []
        assert await sdk.messages.create(model="claude-haiku", max_tokens=20, messages=two)

    # Expect each counted once
    assert by_openai == [3]
    assert counted == [3]


# --- which fields, pure ---------------------------------------------------------------------

LIMITS = Limits(
    models={"gpt-4o-mini", "local-llama"},
    max_messages=8,
    max_job_bytes=1 << 20,
    open_models={"local-llama"},
)


def chat(model: str = "gpt-4o-mini", **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": HELLO, **fields}


def test_the_fields_checked_are_openais_those_the_router_takes_and_the_jobs_fallbacks() -> None:
    assert (
        ChatRequest.__required_keys__ | ChatRequest.__optional_keys__
        == OPENAI_CHAT_PARAMS | ROUTED_EXTRAS | REQUEST_JOB_FIELDS
    )
    count_tokens = typing.get_type_hints(message_count_tokens_params.MessageCountTokensParams)
    assert set(count_tokens) == ANTHROPIC_COUNT_TOKENS_PARAMS


def test_anthropics_top_k_and_thinking_pass_for_any_model() -> None:
    check_chat(chat(top_k=40, thinking={"type": "enabled", "budget_tokens": 2048}), LIMITS)


def test_a_server_of_its_own_takes_its_own_parameters_but_never_the_jobs_fields() -> None:
    check_chat(chat("local-llama", min_p=0.1, guided_json={"type": "object"}), LIMITS)

    with pytest.raises(ApiError, match="unrecognized request arguments team: the gateway sets"):
        check_chat(chat("local-llama", min_p=0.1, team="beta"), LIMITS)


def test_an_error_names_a_few_unknown_fields_each_cut_short() -> None:
    fields = {f"{'x' * 5000}{n:02d}": n for n in range(30)}

    with pytest.raises(ApiError) as refused:
        check_chat(chat(**fields), LIMITS)

    assert refused.value.message.endswith(
        "not parameters of OpenAI's chat completions, and no "
        "OpenAI-compatible server that takes its own serves "
        "'gpt-4o-mini'"
    )
    assert " and 25 more: " in refused.value.message
    assert len(refused.value.message) < 1200
