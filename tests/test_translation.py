"""OpenAI ⇄ Anthropic translation, pure: no HTTP. Examples follow the providers' own docs."""

from __future__ import annotations

import json
from typing import Any

import pytest

from queuegate.messages import ChatJob
from router.providers import AnthropicAdapter, OpenAIAdapter, ProviderError
from router.providers.anthropic import API_VERSION, DEFAULT_MAX_TOKENS

ANTHROPIC = AnthropicAdapter()
OPENAI = OpenAIAdapter()
CLAUDE = "claude-3-5-haiku-latest"

WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a given location",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string", "description": "City and state"}},
            "required": ["location"],
        },
    },
}


def job(messages: list[dict[str, Any]], **params: Any) -> ChatJob:
    return ChatJob.model_validate(
        {"job_id": "j-1", "team": "alpha", "model": "m", "messages": messages, "params": params}
    )


def to_anthropic(messages: list[dict[str, Any]], **params: Any) -> dict[str, Any]:
    return ANTHROPIC.build_request(job(messages, **params), CLAUDE, "sk-test").body


# --- OpenAI -> Anthropic: requests -------------------------------------------------------------


def test_anthropic_request_goes_to_messages_with_key_and_version_headers() -> None:
    request = ANTHROPIC.build_request(job([{"role": "user", "content": "Hi"}]), CLAUDE, "sk-test")

    assert request.path == "/v1/messages"
    assert request.headers == {"x-api-key": "sk-test", "anthropic-version": API_VERSION}
    assert request.body["model"] == CLAUDE
    assert "sk-test" not in repr(request)


def test_system_message_becomes_top_level_system_and_max_tokens_gets_a_default() -> None:
    body = to_anthropic(
        [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Hello, Claude"},
        ]
    )

    assert body == {
        "model": CLAUDE,
        "system": "You are a helpful assistant.",
        "messages": [{"role": "user", "content": "Hello, Claude"}],
        "max_tokens": DEFAULT_MAX_TOKENS,
    }


def test_system_and_developer_messages_anywhere_are_joined_into_system() -> None:
    body = to_anthropic(
        [
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": "Hi"},
            {"role": "developer", "content": "Answer in French."},
        ]
    )

    assert body["system"] == "Be brief.\n\nAnswer in French."
    assert body["messages"] == [{"role": "user", "content": "Hi"}]


def test_multi_turn_conversation_keeps_its_alternating_turns() -> None:
    messages = [
        {"role": "user", "content": "Hello there."},
        {"role": "assistant", "content": "Hi, I'm Claude. How can I help you?"},
        {"role": "user", "content": "Can you explain LLMs in plain English?"},
    ]

    assert to_anthropic(messages)["messages"] == messages


def test_consecutive_turns_of_one_role_are_merged_because_anthropic_requires_alternation() -> None:
    body = to_anthropic(
        [
            {"role": "user", "content": "First question."},
            {"role": "user", "content": "Second question."},
            {"role": "assistant", "content": ""},  # empty: dropped, Anthropic refuses it
            {"role": "user", "content": "Third."},
        ]
    )

    assert body["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "First question."},
                {"type": "text", "text": "Second question."},
                {"type": "text", "text": "Third."},
            ],
        }
    ]


def test_sampling_params_are_translated() -> None:
    body = to_anthropic(
        [{"role": "user", "content": "Hi"}],
        max_tokens=256,
        temperature=0.7,
        top_p=0.9,
        stop="\n\nHuman:",
        user="user-42",
        frequency_penalty=0,  # OpenAI's default: asks for nothing, so nothing to refuse
        top_k=40,  # Anthropic-native extra: passed through
    )

    assert body["max_tokens"] == 256
    assert body["temperature"] == 0.7
    assert body["top_p"] == 0.9
    assert body["stop_sequences"] == ["\n\nHuman:"]
    assert body["metadata"] == {"user_id": "user-42"}
    assert body["top_k"] == 40
    assert "frequency_penalty" not in body


def test_max_completion_tokens_stands_in_for_max_tokens() -> None:
    body = to_anthropic([{"role": "user", "content": "Hi"}], max_completion_tokens=64, stop=["a"])

    assert body["max_tokens"] == 64
    assert body["stop_sequences"] == ["a"]


def test_images_as_content_parts_become_image_blocks() -> None:
    body = to_anthropic(
        [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/ant.jpg"}},
                    {"type": "text", "text": "Compare these images."},
                ],
            }
        ]
    )

    assert body["messages"][0]["content"] == [
        {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQ"},
        },
        {"type": "image", "source": {"type": "url", "url": "https://example.com/ant.jpg"}},
        {"type": "text", "text": "Compare these images."},
    ]


def test_tools_become_name_description_input_schema() -> None:
    no_params = {"type": "function", "function": {"name": "now"}}

    body = to_anthropic([{"role": "user", "content": "Weather?"}], tools=[WEATHER_TOOL, no_params])

    assert body["tools"] == [
        {
            "name": "get_weather",
            "description": "Get the current weather in a given location",
            "input_schema": WEATHER_TOOL["function"]["parameters"],
        },
        {"name": "now", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert body["tool_choice"] == {"type": "auto"}


@pytest.mark.parametrize(
    ("openai", "anthropic"),
    [
        ("auto", {"type": "auto"}),
        ("none", {"type": "none"}),
        ("required", {"type": "any"}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            {"type": "tool", "name": "get_weather"},
        ),
    ],
)
def test_tool_choice_is_mapped(openai: Any, anthropic: dict[str, Any]) -> None:
    body = to_anthropic(
        [{"role": "user", "content": "Hi"}], tools=[WEATHER_TOOL], tool_choice=openai
    )

    assert body["tool_choice"] == anthropic


def test_parallel_tool_calls_false_disables_parallel_tool_use() -> None:
    body = to_anthropic(
        [{"role": "user", "content": "Hi"}],
        tools=[WEATHER_TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
    )

    assert body["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}


def test_tool_calls_and_tool_results_become_tool_use_and_merged_tool_result_blocks() -> None:
    body = to_anthropic(
        [
            {"role": "user", "content": "Weather in San Francisco and Paris?"},
            {
                "role": "assistant",
                "content": "I'll check both.",
                "tool_calls": [
                    {
                        "id": "toolu_01A",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"location": "SF"}'},
                    },
                    {
                        "id": "toolu_01B",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"location": "Paris"}'},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "toolu_01A", "content": "15 degrees"},
            {
                "role": "tool",
                "tool_call_id": "toolu_01B",
                "content": [{"type": "text", "text": "22 degrees"}],
            },
            {"role": "user", "content": "Which is warmer?"},
        ],
        tools=[WEATHER_TOOL],
    )

    assert body["messages"] == [
        {"role": "user", "content": "Weather in San Francisco and Paris?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "I'll check both."},
                {
                    "type": "tool_use",
                    "id": "toolu_01A",
                    "name": "get_weather",
                    "input": {"location": "SF"},
                },
                {
                    "type": "tool_use",
                    "id": "toolu_01B",
                    "name": "get_weather",
                    "input": {"location": "Paris"},
                },
            ],
        },
        {
            "role": "user",  # both results and the next question: one user turn, results first
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01A", "content": "15 degrees"},
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_01B",
                    "content": [{"type": "text", "text": "22 degrees"}],
                },
                {"type": "text", "text": "Which is warmer?"},
            ],
        },
    ]


@pytest.mark.parametrize(
    ("messages", "params"),
    [
        (
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
                    ],
                }
            ],
            {},
        ),
        ([{"role": "user", "content": "Hi"}], {"response_format": {"type": "json_object"}}),
        ([{"role": "user", "content": "Hi"}], {"n": 2}),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x"}}]}],
            {},
        ),
        (
            [
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "t",
                            "type": "function",
                            "function": {"name": "f", "arguments": "not json"},
                        }
                    ],
                }
            ],
            {},
        ),
    ],
    ids=["audio", "json-mode", "n", "ftp-image", "bad-arguments"],
)
def test_what_anthropic_cannot_express_is_unsupported_and_moves_on(
    messages: list[dict[str, Any]], params: dict[str, Any]
) -> None:
    with pytest.raises(ProviderError) as caught:
        to_anthropic(messages, **params)

    assert caught.value.error_class == "unsupported"
    assert caught.value.moves_on


# --- Anthropic -> OpenAI: responses ------------------------------------------------------------


def test_text_response_becomes_a_chat_completion() -> None:
    body = {
        "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
        "type": "message",
        "role": "assistant",
        "content": [{"type": "text", "text": "Hi! My name is Claude."}],
        "model": "claude-3-5-haiku-20241022",
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 2095, "output_tokens": 503},
    }

    completion = ANTHROPIC.parse_response(body, CLAUDE)

    response = completion.response
    assert response["id"] == "msg_013Zva2CMHLNnXjNJJKqJ2EF"
    assert response["object"] == "chat.completion"
    assert isinstance(response["created"], int)
    assert response["model"] == "claude-3-5-haiku-20241022"
    assert response["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hi! My name is Claude."},
            "finish_reason": "stop",
        }
    ]
    assert response["usage"] == {
        "prompt_tokens": 2095,
        "completion_tokens": 503,
        "total_tokens": 2598,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert (completion.usage.input_tokens, completion.usage.output_tokens) == (2095, 503)


def test_tool_use_response_becomes_tool_calls_with_json_arguments() -> None:
    body = {
        "id": "msg_01Aq9w938a90dw8q",
        "type": "message",
        "role": "assistant",
        "model": "claude-3-5-haiku-20241022",
        "content": [
            {"type": "text", "text": "I'll look that up."},
            {
                "type": "tool_use",
                "id": "toolu_01A09q90qw90lq917835lq9",
                "name": "get_weather",
                "input": {"location": "San Francisco, CA"},
            },
        ],
        "stop_reason": "tool_use",
        "usage": {"input_tokens": 472, "output_tokens": 89},
    }

    choice = ANTHROPIC.parse_response(body, CLAUDE).response["choices"][0]

    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "I'll look that up."
    [call] = choice["message"]["tool_calls"]
    assert call["id"] == "toolu_01A09q90qw90lq917835lq9"
    assert call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"location": "San Francisco, CA"}


def test_response_of_only_tool_use_has_null_content() -> None:
    body = {
        "content": [{"type": "tool_use", "id": "t1", "name": "now", "input": {}}],
        "stop_reason": "tool_use",
    }

    message = ANTHROPIC.parse_response(body, CLAUDE).response["choices"][0]["message"]

    assert message["content"] is None
    assert message["tool_calls"][0]["function"]["arguments"] == "{}"


@pytest.mark.parametrize(
    ("stop_reason", "finish_reason"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
    ],
)
def test_stop_reason_becomes_finish_reason(stop_reason: str, finish_reason: str) -> None:
    body = {"content": [{"type": "text", "text": "x"}], "stop_reason": stop_reason}

    choice = ANTHROPIC.parse_response(body, CLAUDE).response["choices"][0]

    assert choice["finish_reason"] == finish_reason


def test_cached_usage_counts_inside_prompt_tokens_as_openai_does() -> None:
    usage = {
        "input_tokens": 150,
        "output_tokens": 87,
        "cache_creation_input_tokens": 30,
        "cache_read_input_tokens": 120,
    }
    body = {"content": [{"type": "text", "text": "x"}], "stop_reason": "end_turn", "usage": usage}

    completion = ANTHROPIC.parse_response(body, CLAUDE)

    assert completion.usage.input_tokens == 300
    assert completion.usage.output_tokens == 87
    assert completion.usage.cached_tokens == 120
    assert completion.usage.cache_write_tokens == 30
    assert completion.response["usage"]["prompt_tokens"] == 300
    assert completion.response["usage"]["prompt_tokens_details"] == {
        "cached_tokens": 120,
        "cache_write_tokens": 30,
    }


@pytest.mark.parametrize("body", [None, [], {"type": "error"}, {"content": "text"}])
def test_anthropic_body_without_content_is_a_bad_response(body: Any) -> None:
    with pytest.raises(ProviderError) as caught:
        ANTHROPIC.parse_response(body, CLAUDE)

    assert caught.value.error_class == "bad_response"


# --- OpenAI wire (openai and openai_compatible) ------------------------------------------------


def test_openai_request_passes_messages_and_params_through_with_the_upstream_model() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
    ]
    chat = job(
        messages,
        max_tokens=10,
        temperature=0.2,
        top_p=0.5,
        stop=["END"],
        tools=[WEATHER_TOOL],
        tool_choice="auto",
        response_format={"type": "json_object"},
        seed=3,
        user="u-1",
        logit_bias={"50256": -100},
        stream=True,  # streaming is not wired yet: never sent
    )

    request = OPENAI.build_request(chat, "gpt-4o-mini", "sk-test")

    assert request.path == "/v1/chat/completions"
    assert request.headers == {"Authorization": "Bearer sk-test"}
    assert request.body == {
        "model": "gpt-4o-mini",
        "messages": messages,
        "max_tokens": 10,
        "temperature": 0.2,
        "top_p": 0.5,
        "stop": ["END"],
        "tools": [WEATHER_TOOL],
        "tool_choice": "auto",
        "response_format": {"type": "json_object"},
        "seed": 3,
        "user": "u-1",
        "logit_bias": {"50256": -100},
    }


def test_openai_compatible_request_without_key_has_no_authorization() -> None:
    request = OPENAI.build_request(job([{"role": "user", "content": "Hi"}]), "llama-3.1-8b", None)

    assert request.headers == {}


def test_openai_response_is_canonical_already_and_usage_is_read() -> None:
    body = {
        "id": "chatcmpl-123",
        "object": "chat.completion",
        "created": 1677652288,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello there, how may I assist you?"},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 9,
            "completion_tokens": 12,
            "total_tokens": 21,
            "prompt_tokens_details": {"cached_tokens": 4},
        },
    }

    completion = OPENAI.parse_response(body, "gpt-4o-mini")

    assert completion.response == body
    assert completion.usage.input_tokens == 9
    assert completion.usage.output_tokens == 12
    assert completion.usage.cached_tokens == 4


def test_openai_compatible_response_without_usage_has_no_counts_to_bill_by() -> None:
    body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}}]}

    # The router counts it from the text (``Completion.usage``): counted zero, it was free
    assert OPENAI.parse_response(body, "llama-3.1-8b").usage is None


@pytest.mark.parametrize("body", [None, {}, {"choices": []}, {"error": {"message": "x"}}])
def test_openai_body_without_choices_is_a_bad_response(body: Any) -> None:
    with pytest.raises(ProviderError) as caught:
        OPENAI.parse_response(body, "gpt-4o-mini")

    assert caught.value.error_class == "bad_response"


def test_streaming_params_in_a_job_are_the_gateways_to_set_not_refused() -> None:
    body = to_anthropic(
        [{"role": "user", "content": "Hi"}], stream=True, stream_options={"include_usage": True}
    )

    assert "stream" not in body and "stream_options" not in body
