"""The mock refuses what the real APIs refuse, in their words, and reports the cache and
reasoning usage a request asks for; its field lists are pinned to the providers' SDK types."""

from __future__ import annotations

import typing
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from anthropic.types import Message, OutputConfigParam, message_create_params
from openai.types import ReasoningEffort
from openai.types.chat import ChatCompletion, completion_create_params

from mockprovider import MockProvider
from mockprovider import validation as mock_checks
from mockprovider.wire import REASONING_TOKENS
from mockprovider.wire import VLLM_PREFIX as VLLM
from queuegate import openai_params
from queuegate.provider_formats import ANTHROPIC_MESSAGES_PARAMS, OPENAI_CHAT_PARAMS

OPENAI = "/v1/chat/completions"
ANTHROPIC = "/v1/messages"
LONG = "Cache me if you can, said the prompt. " * 130


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "gpt-mock", "messages": [{"role": "user", "content": "hello"}], **fields}


def claude(**fields: Any) -> dict[str, Any]:
    return {"max_tokens": 2000, **chat(model="claude-mock"), **fields}


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with MockProvider() as mock, httpx.AsyncClient(base_url=mock.url) as http:
        yield http


def test_the_field_lists_are_the_sdks() -> None:
    openai = typing.get_type_hints(completion_create_params.CompletionCreateParamsBase)
    anthropic = typing.get_type_hints(message_create_params.MessageCreateParamsBase)

    assert set(openai) | {"stream"} == OPENAI_CHAT_PARAMS
    # The Messages API reference also documents the sampling fields and stream.
    assert ANTHROPIC_MESSAGES_PARAMS - set(anthropic) == {"temperature", "top_p", "top_k", "stream"}
    assert set(anthropic) <= ANTHROPIC_MESSAGES_PARAMS


def levels(hint: Any) -> set[str]:
    """The names a type (a Literal, optional or not) allows."""
    return {arg for arg in typing.get_args(hint) if isinstance(arg, str)} | {
        name for arg in typing.get_args(hint) for name in levels(arg)
    }


def test_the_effort_levels_are_the_sdks() -> None:
    openai = levels(ReasoningEffort)
    anthropic = levels(typing.get_type_hints(OutputConfigParam)["effort"])

    # Expect the mock to take, and the gateway to type, every level each SDK has
    assert openai == {"none", "minimal", "low", "medium", "high", "xhigh", "max"}
    assert mock_checks.OPENAI_EFFORTS == levels(openai_params.ReasoningEffort) == openai
    assert set(mock_checks.ANTHROPIC_EFFORTS) == set(openai_params.ANTHROPIC_EFFORTS) == anthropic
    assert anthropic <= openai  # each an OpenAI effort of the same name: how a job carries it


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (chat(top_k=40), "Unrecognized request argument supplied: top_k"),
        (chat(thinking={"type": "enabled"}), "Unrecognized request argument supplied: thinking"),
        (
            chat(messages=[{"role": "user", "content": "hi", "cache_control": {}}]),
            "Unrecognized request argument supplied: messages[0].cache_control",
        ),
        (
            chat(
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}
                        ],
                    }
                ]
            ),
            "Unrecognized request argument supplied: messages[0].content[0].cache_control",
        ),
        (chat(temperature=2.5), "temperature: Input should be between 0 and 2"),
        (chat(top_logprobs=3), "top_logprobs: logprobs must be true when top_logprobs is set"),
        (chat(reasoning_effort="extreme"), "reasoning_effort: invalid value 'extreme'"),
        (chat(metadata={"attempt": 3}), "metadata.attempt: Input should be a valid string"),
        (
            chat(metadata={"note": "x" * 513}),
            "metadata.note: values are at most 512 characters",
        ),
        (chat(metadata={"k" * 65: "v"}), "metadata: keys are at most 64 characters"),
        (
            chat(metadata={f"k{i}": "v" for i in range(17)}),
            "metadata: at most 16 key-value pairs",
        ),
        (chat(response_format={"type": "yaml"}), "response_format.type: invalid value 'yaml'"),
        (
            chat(tools=[{"type": "custom", "custom": {"name": "sql", "grammar": "x"}}]),
            "Unrecognized request argument supplied: tools[0].custom.grammar",
        ),
        (
            chat(tool_choice={"type": "allowed_tools", "allowed_tools": {"mode": "any"}}),
            "tool_choice.allowed_tools.mode: invalid value 'any'",
        ),
        (
            chat(
                tools=[{"type": "function", "function": {"name": "get_weather"}}],
                tool_choice={
                    "type": "allowed_tools",
                    "allowed_tools": {
                        "mode": "required",
                        "tools": [{"type": "function", "function": {"name": "nope"}}],
                    },
                },
            ),
            "tool_choice.allowed_tools.tools: allows the function tool 'nope', which tools",
        ),
        (
            chat(
                tools=[{"type": "function", "function": {"name": "get_weather"}}],
                tool_choice={"type": "function", "function": {"name": "nope"}},
            ),
            "tool_choice.function.name: names the function tool 'nope', which tools",
        ),
        (
            chat(
                tools=[
                    {
                        "type": "custom",
                        "custom": {
                            "name": "sql",
                            "format": {"type": "grammar", "grammar": {"syntax": "lark"}},
                        },
                    }
                ]
            ),
            "tools[0].custom.format.grammar.definition: Field required",
        ),
        (
            chat(response_format={"type": "json_schema"}),
            "response_format.json_schema.name: Field required",
        ),
        (
            chat(
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image_url",
                                "image_url": {"url": "https://x/a.png", "detail": "ultra"},
                            }
                        ],
                    }
                ]
            ),
            "messages[0].content[0].image_url.detail: invalid value 'ultra'",
        ),
        (
            chat(
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {"type": "file", "file": {"file_data": "data:text/plain;base64,aGk="}}
                        ],
                    }
                ]
            ),
            "messages[0].content[0].file.file_data: Invalid file data: only PDF files",
        ),
    ],
)
async def test_openai_refuses_unknown_fields_and_invalid_values(
    client: httpx.AsyncClient, body: dict[str, Any], message: str
) -> None:
    response = await client.post(OPENAI, json=body)

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith(message)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (claude(logprobs=True), "logprobs: Extra inputs are not permitted"),
        (claude(seed=1), "seed: Extra inputs are not permitted"),
        (claude(metadata={"trace": "x"}), "metadata.trace: Extra inputs are not permitted"),
        (
            claude(service_tier="flex"),
            "service_tier: invalid value 'flex'; expected one of ['auto', 'standard_only']",
        ),
        (claude(temperature=1.5), "temperature: Input should be between 0 and 1"),
        (
            claude(messages=[{"role": "user", "content": "hi", "name": "alice"}]),
            "messages.0.name: Extra inputs are not permitted",
        ),
        (
            claude(thinking={"type": "enabled", "budget_tokens": 500}),
            "thinking.budget_tokens: Input should be greater than or equal to 1024",
        ),
        (
            claude(thinking={"type": "enabled", "budget_tokens": 2000}),
            "`max_tokens` must be greater than `thinking.budget_tokens`",
        ),
        (
            claude(thinking={"type": "enabled", "budget_tokens": 1024}, temperature=0.5),
            "`temperature` may only be set to 1 when thinking is enabled",
        ),
        (
            claude(thinking={"type": "adaptive"}, top_k=5),
            "`top_k` must be unset when thinking is enabled",
        ),
        (
            claude(thinking={"type": "adaptive", "budget_tokens": 1024}),
            "thinking.budget_tokens: Extra inputs are not permitted",
        ),
        (
            claude(thinking={"type": "adaptive", "display": "full"}),
            "thinking.display: Input should be 'summarized' or 'omitted'",
        ),
        (
            claude(thinking={"type": "sometimes"}),
            "thinking.type: Input should be 'enabled', 'disabled', 'adaptive' or 'between_tools'",
        ),
        (
            claude(tools=[{"name": "f", "input_schema": {"type": "object"}, "x": 1}]),
            "tools.0.x: Extra inputs are not permitted",
        ),
        (
            claude(
                tools=[{"name": "f", "input_schema": {"type": "object"}}],
                tool_choice={"type": "tool", "name": "nope"},
            ),
            "tool_choice.name: tool 'nope' is not one of tools",
        ),
        (
            claude(tool_choice={"type": "required"}),
            "tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'",
        ),
        (
            claude(tool_choice={"type": "none", "disable_parallel_tool_use": True}),
            "tool_choice.disable_parallel_tool_use: Extra inputs are not permitted",
        ),
        (
            claude(thinking={"type": "adaptive"}, output_config={"effort": "minimal"}),
            "output_config.effort: Input should be 'low', 'medium', 'high', 'xhigh' or 'max'",
        ),
        (
            claude(output_config={"effort": "low", "reasoning_effort": "low"}),
            "output_config.reasoning_effort: Extra inputs are not permitted",
        ),
        (claude(output_config="low"), "output_config: Input should be an object"),
        (
            claude(output_config={"format": {"type": "json_object"}}),
            "output_config.format.type: Input should be 'json_schema'",
        ),
        (
            claude(
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "document",
                                "source": {
                                    "type": "base64",
                                    "media_type": "image/png",
                                    "data": "x",
                                },
                            }
                        ],
                    }
                ]
            ),
            "messages.0.content.0.source.media_type: Input should be 'application/pdf'",
        ),
    ],
)
async def test_anthropic_refuses_unknown_fields_and_invalid_values(
    client: httpx.AsyncClient, body: dict[str, Any], message: str
) -> None:
    response = await client.post(ANTHROPIC, json=body)

    assert response.status_code == 400
    assert response.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": message},
    }


async def test_anthropic_reports_a_cache_write_then_reads(client: httpx.AsyncClient) -> None:
    system = [{"type": "text", "text": LONG, "cache_control": {"type": "ephemeral"}}]

    first = Message.model_validate(
        (await client.post(ANTHROPIC, json=claude(system=system))).json()
    )
    second = Message.model_validate(
        (await client.post(ANTHROPIC, json=claude(system=system))).json()
    )

    written = first.usage.cache_creation_input_tokens
    assert written is not None and written > 1024
    assert first.usage.cache_read_input_tokens == 0
    assert second.usage.cache_read_input_tokens == written
    assert second.usage.cache_creation_input_tokens == 0
    assert first.usage.input_tokens == second.usage.input_tokens  # the rest, uncached


@pytest.mark.parametrize(
    "thinking",
    [
        {"type": "enabled", "budget_tokens": 1024, "display": "summarized"},
        {"type": "adaptive"},
    ],
)
async def test_anthropic_thinks_when_asked(
    client: httpx.AsyncClient, thinking: dict[str, Any]
) -> None:
    message = Message.model_validate(
        (await client.post(ANTHROPIC, json=claude(thinking=thinking))).json()
    )

    kinds = [block.type for block in message.content]
    assert kinds == ["thinking", "text"]
    assert message.usage.output_tokens_details is not None
    assert message.usage.output_tokens_details.thinking_tokens == 4  # "mock thinking about: hello"


@pytest.mark.parametrize("effort", ["low", "medium", "high", "xhigh", "max"])
async def test_anthropic_takes_each_effort_of_adaptive_thinking(
    client: httpx.AsyncClient, effort: str
) -> None:
    body = claude(thinking={"type": "adaptive"}, output_config={"effort": effort})

    response = await client.post(ANTHROPIC, json=body)

    assert response.status_code == 200, response.text
    message = Message.model_validate(response.json())
    assert [block.type for block in message.content] == ["thinking", "text"]


@pytest.mark.parametrize("kind", ["enabled", "adaptive"])
async def test_anthropic_thinking_displayed_omitted_keeps_its_signature_and_tokens(
    client: httpx.AsyncClient, kind: str
) -> None:
    thinking: dict[str, Any] = {"type": kind, "display": "omitted"}
    if kind == "enabled":
        thinking["budget_tokens"] = 1024

    message = Message.model_validate(
        (await client.post(ANTHROPIC, json=claude(thinking=thinking))).json()
    )

    block = message.content[0]
    assert block.type == "thinking"
    assert (block.thinking, block.signature) == ("", "mock-signature")
    assert message.usage.output_tokens_details is not None
    assert message.usage.output_tokens_details.thinking_tokens == 4


async def test_openai_reports_cached_input_and_reasoning_tokens(
    client: httpx.AsyncClient,
) -> None:
    messages = [{"role": "system", "content": LONG}, {"role": "user", "content": "hi"}]
    body = chat(messages=messages, reasoning_effort="low")

    first = ChatCompletion.model_validate((await client.post(OPENAI, json=body)).json())
    second = ChatCompletion.model_validate((await client.post(OPENAI, json=body)).json())

    assert first.usage is not None and second.usage is not None
    assert first.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details is not None
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached is not None and 1024 < cached < second.usage.prompt_tokens
    assert second.usage.completion_tokens_details is not None
    assert second.usage.completion_tokens_details.reasoning_tokens == 64


@pytest.mark.parametrize("effort", sorted(levels(ReasoningEffort) - {"none"}))
async def test_openai_reasons_at_every_effort_it_documents(
    client: httpx.AsyncClient, effort: str
) -> None:
    response = await client.post(OPENAI, json=chat(reasoning_effort=effort))

    assert response.status_code == 200, response.text
    usage = ChatCompletion.model_validate(response.json()).usage
    assert usage is not None and usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == REASONING_TOKENS[effort]


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("effort", ["low", "high", "xhigh"])
async def test_openai_reasoning_never_exceeds_max_tokens(
    client: httpx.AsyncClient, field: str, effort: str
) -> None:
    body = chat(reasoning_effort=effort, **{field: 500})

    completion = ChatCompletion.model_validate((await client.post(OPENAI, json=body)).json())

    assert completion.usage is not None and completion.usage.completion_tokens <= 500
    details = completion.usage.completion_tokens_details
    assert details is not None and details.reasoning_tokens is not None
    assert details.reasoning_tokens <= 500
    if effort != "low":  # more reasoning than fits: the answer is cut
        assert completion.choices[0].finish_reason == "length"


async def test_openai_accepts_valid_metadata_formats_and_details(
    client: httpx.AsyncClient,
) -> None:
    image = {"type": "image_url", "image_url": {"url": "https://x/a.png", "detail": "low"}}
    body = chat(
        metadata={"trace": "t" * 512, "k" * 64: "v"},
        response_format={"type": "json_schema", "json_schema": {"name": "answer"}},
        messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}, image]}],
    )

    response = await client.post(OPENAI, json=body)

    assert response.status_code == 200, response.text


async def test_openai_takes_custom_tools_and_allowed_tools(client: httpx.AsyncClient) -> None:
    sql = {
        "type": "custom",
        "custom": {
            "name": "run_sql",
            "format": {"type": "grammar", "grammar": {"syntax": "regex", "definition": "S.*"}},
        },
    }
    weather = {"type": "function", "function": {"name": "get_weather"}}
    allowed = {"mode": "required", "tools": [{"type": "custom", "custom": {"name": "run_sql"}}]}
    choices: list[Any] = [
        {"type": "custom", "custom": {"name": "run_sql"}},
        {"type": "allowed_tools", "allowed_tools": allowed},
    ]

    for choice in choices:
        body = chat(tools=[weather, sql], tool_choice=choice)
        completion = ChatCompletion.model_validate((await client.post(OPENAI, json=body)).json())

        [call] = completion.choices[0].message.tool_calls or []
        assert call.type == "custom"
        assert (call.custom.name, call.custom.input) == ("run_sql", "")


async def test_openai_takes_four_stop_sequences_and_a_vllm_server_any_number(
    client: httpx.AsyncClient,
) -> None:
    stops = ["#1", "#2", "#3", "#4", "llo"]

    refused = await client.post(OPENAI, json=chat(stop=stops))
    taken = await client.post(OPENAI, json=chat(stop=stops[1:]))
    vllm = await client.post(VLLM + OPENAI, json=chat(stop=stops, top_k=40, min_p=0.1))

    assert refused.status_code == 400
    assert refused.json()["error"]["message"] == "stop: at most 4 sequences"
    assert taken.status_code == 200
    # vLLM takes the list whole, and its own sampling parameters: it stops at "llo"
    assert vllm.status_code == 200, vllm.text
    answer = ChatCompletion.model_validate(vllm.json()).choices[0].message
    assert answer.content == "mock reply to: he"


async def test_a_vllm_server_ignores_fields_it_does_not_know_at_any_depth(
    client: httpx.AsyncClient,
) -> None:
    marked = {"type": "text", "text": "hello", "cache_control": {"type": "ephemeral"}}
    body = chat(messages=[{"role": "user", "content": [marked]}])

    refused = await client.post(OPENAI, json=body)
    taken = await client.post(VLLM + OPENAI, json=body)

    # OpenAI refuses the part's marker (the gateway leaves it out for OpenAI); vLLM, whose
    # request model ignores unknown fields, answers
    assert refused.status_code == 400
    assert taken.status_code == 200, taken.text
    assert ChatCompletion.model_validate(taken.json()).choices[0].message.content
