"""The mock provider, over real HTTP: the providers' shapes, injected faults, control endpoints."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

import mockprovider
from mockprovider import Behavior, MockConfig, MockProvider

OPENAI = "/v1/chat/completions"
ANTHROPIC = "/v1/messages"
SECRET = "sk-test-never-log-me-4f9a1c"
CONTEXT_ERROR = {
    "error": {
        "message": "This model's maximum context length is 8192 tokens.",
        "type": "invalid_request_error",
        "code": "context_length_exceeded",
    }
}
WEATHER_TOOL = {"name": "get_weather", "description": "", "parameters": {"type": "object"}}


def chat(model: str = "gpt-mock", text: str = "hello there", **params: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **params}


def claude(model: str = "claude-mock", text: str = "hello there", **params: Any) -> dict[str, Any]:
    return {"model": model, "max_tokens": 100, **chat(model, text), **params}


def seconds(duration: str) -> float:
    """OpenAI's short reset durations: ``850ms``, ``1.5s``."""
    return float(duration[:-2]) / 1000 if duration.endswith("ms") else float(duration[:-1])


@pytest.fixture
async def mock() -> AsyncIterator[MockProvider]:
    async with MockProvider() as provider:
        yield provider


@pytest.fixture
async def client(mock: MockProvider) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=mock.url) as http:
        yield http


async def sse_lines(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> list[str]:
    async with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        return [line async for line in response.aiter_lines() if line]


def test_public_api_is_pinned() -> None:
    assert mockprovider.__all__ == ["Behavior", "MockConfig", "MockProvider", "serve"]


async def test_openai_completion_has_the_documented_shape(client: httpx.AsyncClient) -> None:
    # Given a system prompt and a user turn
    body = chat(text="What is the capital of France?")
    body["messages"].insert(0, {"role": "system", "content": "Be brief."})

    # When OpenAI's endpoint is called twice
    first = await client.post(OPENAI, json=body)
    second = await client.post(OPENAI, json=body)

    # Expect a chat.completion whose text and usage derive from the request alone
    assert first.status_code == 200
    completion = first.json()
    assert completion["id"].startswith("chatcmpl-")
    assert completion["object"] == "chat.completion"
    assert completion["model"] == "gpt-mock"
    assert isinstance(completion["created"], int)
    [choice] = completion["choices"]
    assert choice["index"] == 0
    assert choice["message"] == {
        "role": "assistant",
        "content": "mock reply to: What is the capital of France?",
        "refusal": None,
    }
    assert choice["finish_reason"] == "stop"
    assert choice["logprobs"] is None
    assert completion["system_fingerprint"].startswith("fp_")
    assert completion["service_tier"] == "default"
    assert completion["usage"] == {
        "prompt_tokens": 10,  # (9 + 30 characters) / 4, rounded up
        "completion_tokens": 9,
        "total_tokens": 19,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }
    assert second.json()["choices"] == completion["choices"]


async def test_anthropic_message_has_the_documented_shape(client: httpx.AsyncClient) -> None:
    # Given a system prompt as a list of text blocks and content as blocks
    body = claude(system=[{"type": "text", "text": "Be brief."}])
    body["messages"] = [{"role": "user", "content": [{"type": "text", "text": "Hi there, Claude"}]}]

    response = await client.post(ANTHROPIC, json=body)

    assert response.status_code == 200
    message = response.json()
    assert message["id"].startswith("msg_")
    assert message["type"] == "message"
    assert message["role"] == "assistant"
    assert message["model"] == "claude-mock"
    assert message["content"] == [{"type": "text", "text": "mock reply to: Hi there, Claude"}]
    assert message["stop_reason"] == "end_turn"
    assert message["stop_sequence"] is None
    assert message["usage"] == {
        "input_tokens": 7,  # (9 + 16 characters) / 4, rounded up
        "output_tokens": 6,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
    }


async def test_max_tokens_cuts_the_reply_in_both_formats(client: httpx.AsyncClient) -> None:
    openai = (await client.post(OPENAI, json=chat(max_tokens=3))).json()
    anthropic = (await client.post(ANTHROPIC, json=claude(max_tokens=3))).json()

    assert openai["choices"][0]["message"]["content"] == "mock reply to:"
    assert openai["choices"][0]["finish_reason"] == "length"
    assert openai["usage"]["completion_tokens"] == 3
    assert anthropic["content"][0]["text"] == "mock reply to:"
    assert anthropic["stop_reason"] == "max_tokens"
    assert anthropic["usage"]["output_tokens"] == 3


async def test_a_stop_sequence_ends_the_reply(client: httpx.AsyncClient) -> None:
    body = claude(text="hello there world", stop_sequences=["world", "there"])

    message = (await client.post(ANTHROPIC, json=body)).json()

    assert message["content"][0]["text"] == "mock reply to: hello"
    assert message["stop_reason"] == "stop_sequence"
    assert message["stop_sequence"] == "there"


async def test_anthropic_requires_max_tokens(client: httpx.AsyncClient) -> None:
    body = claude()
    del body["max_tokens"]

    response = await client.post(ANTHROPIC, json=body)

    assert response.status_code == 400
    assert response.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"},
    }


async def test_malformed_json_gets_400_in_each_provider_shape(
    mock: MockProvider, client: httpx.AsyncClient
) -> None:
    headers = {"content-type": "application/json"}
    openai = await client.post(OPENAI, content=b'{"model": ', headers=headers)
    anthropic = await client.post(ANTHROPIC, content=b"[1, 2]", headers=headers)

    assert openai.status_code == 400
    assert openai.json()["error"]["type"] == "invalid_request_error"
    assert anthropic.status_code == 400
    assert anthropic.json()["type"] == "error"
    assert anthropic.json()["error"]["type"] == "invalid_request_error"
    assert mock.stats.by_status == {400: 2}


async def test_fail_first_fails_that_many_calls_then_answers(
    mock: MockProvider, client: httpx.AsyncClient
) -> None:
    # Given a model whose first two calls are overloaded, and another model that is healthy
    mock.configure(MockConfig(models={"claude-flaky": Behavior(fail_first=2, error_status=529)}))

    statuses = [(await client.post(ANTHROPIC, json=claude("claude-flaky"))).status_code]
    healthy = await client.post(ANTHROPIC, json=claude("claude-ok"))
    for _ in range(2):
        response = await client.post(ANTHROPIC, json=claude("claude-flaky"))
        statuses.append(response.status_code)
        if response.status_code == 529:
            assert response.json()["error"]["type"] == "overloaded_error"

    assert statuses == [529, 529, 200]
    assert healthy.status_code == 200
    assert mock.stats.by_model == {"claude-flaky": 3, "claude-ok": 1}


async def test_injected_errors_can_carry_a_given_body(
    mock: MockProvider, client: httpx.AsyncClient
) -> None:
    too_long = Behavior(error_rate=1, error_status=400, error_body=CONTEXT_ERROR)
    mock.configure(MockConfig(default=too_long))

    response = await client.post(OPENAI, json=chat())

    assert response.status_code == 400
    assert response.json() == CONTEXT_ERROR


async def test_rate_limit_answers_429_with_retry_after(
    mock: MockProvider, client: httpx.AsyncClient
) -> None:
    # Given a model limited to two calls a minute
    mock.configure(MockConfig(models={"gpt-small": Behavior(rate_limit_rpm=2, retry_after=0.25)}))

    statuses = [(await client.post(OPENAI, json=chat("gpt-small"))).status_code for _ in range(2)]
    limited = await client.post(OPENAI, json=chat("gpt-small"))
    other = await client.post(OPENAI, json=chat("gpt-other"))

    assert statuses == [200, 200]
    assert limited.status_code == 429
    assert limited.headers["retry-after"] == "1"  # whole seconds, rounded up
    assert limited.headers["retry-after-ms"] == "250"
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert other.status_code == 200  # the window is per model


async def test_a_rate_limit_with_a_burst_refills_like_a_provider_enforcing_per_second(
    mock: MockProvider, client: httpx.AsyncClient
) -> None:
    # Given a model allowed 600 requests a minute (10 a second), 2 at once
    mock.configure(
        MockConfig(models={"gpt-small": Behavior(rate_limit_rpm=600, rate_limit_burst=2)})
    )

    # When 3 calls come at once, then one more after the next request's refill
    answers = [await client.post(OPENAI, json=chat("gpt-small")) for _ in range(3)]
    wait = int(answers[2].headers["retry-after-ms"])
    await asyncio.sleep(wait / 1000)
    later = await client.post(OPENAI, json=chat("gpt-small"))

    # Expect 2 served, the third refused and told when the next request is admitted (within
    # 100 ms, not a minute), and the call after that wait served
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert 1 <= wait <= 100
    assert answers[2].headers["retry-after"] == "1"  # whole seconds, rounded up
    assert later.status_code == 200
    assert mock.stats.by_status == {200: 3, 429: 1}


async def test_a_rate_limited_model_states_its_limit_on_every_answer_as_the_provider_does(
    mock: MockProvider, client: httpx.AsyncClient
) -> None:
    # Given a model allowed 60 requests a minute, 2 at once, on both wire formats
    limited = Behavior(rate_limit_rpm=60, rate_limit_burst=2)
    mock.configure(MockConfig(models={"gpt-small": limited, "claude-small": limited}))

    # When each format is called until it is refused
    openai = [await client.post(OPENAI, json=chat("gpt-small")) for _ in range(3)]
    anthropic = [await client.post(ANTHROPIC, json=claude("claude-small")) for _ in range(3)]

    # Expect OpenAI's x-ratelimit-* headers: the limit, what is left, and when it is full again
    assert [r.headers["x-ratelimit-limit-requests"] for r in openai] == ["60"] * 3
    assert [r.headers["x-ratelimit-remaining-requests"] for r in openai] == ["1", "0", "0"]
    resets = [seconds(r.headers["x-ratelimit-reset-requests"]) for r in openai]
    assert 0.9 <= resets[0] <= 1 and 1.9 <= resets[2] <= 2  # a second per request used
    assert openai[2].status_code == 429 and "retry-after-ms" in openai[2].headers
    # and Anthropic's own, with the instant it is full again
    assert [r.headers["anthropic-ratelimit-requests-remaining"] for r in anthropic] == [
        "1",
        "0",
        "0",
    ]
    assert anthropic[2].status_code == 429
    assert anthropic[2].headers["anthropic-ratelimit-requests-limit"] == "60"
    assert anthropic[2].headers["anthropic-ratelimit-requests-reset"].endswith("Z")
    # while an unlimited model states none
    assert "x-ratelimit-limit-requests" not in (await client.post(OPENAI, json=chat())).headers


def test_a_burst_without_a_rate_is_refused() -> None:
    with pytest.raises(ValueError, match="rate_limit_burst: set rate_limit_rpm too"):
        Behavior(rate_limit_burst=5)


async def test_an_injected_429_also_says_when_to_retry(
    mock: MockProvider, client: httpx.AsyncClient
) -> None:
    mock.configure(MockConfig(default=Behavior(fail_first=1, error_status=429, retry_after=2)))

    response = await client.post(ANTHROPIC, json=claude())

    assert response.status_code == 429
    assert response.headers["retry-after"] == "2"
    assert response.json()["error"]["type"] == "rate_limit_error"


async def test_a_hanging_call_does_not_hold_up_others(
    mock: MockProvider, client: httpx.AsyncClient
) -> None:
    # Given a model whose calls hang well past the client's timeout
    mock.configure(MockConfig(models={"gpt-stuck": Behavior(timeout_rate=1, hang_s=5)}))

    # When a call to it is in flight and hanging
    stuck = asyncio.create_task(client.post(OPENAI, json=chat("gpt-stuck"), timeout=0.5))
    async with asyncio.timeout(2):
        await mock.wait_for_calls(1)
    served = await client.post(OPENAI, json=chat("gpt-fine"))

    # Expect the other call served meanwhile, and the hanging one to time out at the client
    assert served.status_code == 200
    assert not stuck.done()
    with pytest.raises(httpx.ReadTimeout):
        await stuck
    assert mock.stats.hung == 1
    assert mock.requests[0].status is None


async def test_a_call_is_waited_for_as_it_arrives_or_once_answered(
    mock: MockProvider, client: httpx.AsyncClient
) -> None:
    # Given a model answering after 30 s
    mock.configure(MockConfig(models={"gpt-slow": Behavior(latency_ms=30_000)}))

    # When a call to it is sent
    slow = asyncio.create_task(client.post(OPENAI, json=chat("gpt-slow"), timeout=60))
    async with asyncio.timeout(5):
        await mock.wait_for_arrivals(1)

    # Expect it waited for mid-call, its answer not sent: a caller stopped now has not read it
    try:
        assert not slow.done()
        assert (mock.arrived, mock.stats.calls) == (1, 0)
    finally:
        slow.cancel()


async def test_a_hang_ends_by_closing_the_connection_unanswered(
    mock: MockProvider, client: httpx.AsyncClient
) -> None:
    mock.configure(MockConfig(default=Behavior(timeout_rate=1, hang_s=0.05)))

    with pytest.raises(httpx.RemoteProtocolError):
        await client.post(ANTHROPIC, json=claude(), timeout=5)


async def test_openai_stream_parses_back_into_the_full_text(client: httpx.AsyncClient) -> None:
    body = chat(text="tell me a story about a cat", stream_options={"include_usage": True})
    expected = (await client.post(OPENAI, json=body)).json()

    lines = await sse_lines(client, OPENAI, body | {"stream": True})

    assert lines[-1] == "data: [DONE]"
    chunks = [orjson.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    *deltas, usage = chunks
    assert deltas[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in deltas)
    assert text == expected["choices"][0]["message"]["content"]
    assert len(deltas) > 3  # the text came in several pieces
    assert deltas[-1]["choices"][0]["finish_reason"] == "stop"
    assert usage["choices"] == []
    assert usage["usage"] == expected["usage"]


async def test_openai_answers_n_choices_with_logprobs_whole_and_streamed(
    client: httpx.AsyncClient,
) -> None:
    # Given a request for two choices with the logprobs of each token and one alternative
    body = chat(text="tell me a story", n=2, logprobs=True, top_logprobs=1)

    # When it is asked whole and streamed
    whole = ChatCompletion.model_validate((await client.post(OPENAI, json=body)).json())
    lines = await sse_lines(client, OPENAI, body | {"stream": True})
    chunks = [ChatCompletionChunk.model_validate_json(line[6:]) for line in lines[:-1]]

    # Expect OpenAI's shapes (its SDK's types): each choice whole, with its tokens' logprobs
    text = "mock reply to: tell me a story"
    words = len(text.split())  # a token each
    assert [(c.index, c.message.content) for c in whole.choices] == [(0, text), (1, text)]
    for choice in whole.choices:
        assert choice.logprobs is not None and choice.logprobs.content is not None
        assert "".join(t.token for t in choice.logprobs.content) == text
        assert [len(t.top_logprobs) for t in choice.logprobs.content] == [1] * words
    assert whole.usage is not None and whole.usage.completion_tokens == 2 * words
    # and streamed, each choice's deltas under its index, each content piece with its logprobs
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == index]
        assert "".join(c.delta.content or "" for c in mine) == text
        tokens = [t.token for c in mine if c.logprobs for t in c.logprobs.content or []]
        assert "".join(tokens) == text
        assert mine[-1].finish_reason == "stop"
    assert {(c.system_fingerprint, c.service_tier) for c in chunks} == {
        (whole.system_fingerprint, "default")
    }


async def test_a_refusing_openai_model_refuses_whole_and_streamed(
    mock: MockProvider, client: httpx.AsyncClient
) -> None:
    mock.configure(MockConfig(default=Behavior(refusal="I can't help with that.")))

    whole = ChatCompletion.model_validate((await client.post(OPENAI, json=chat())).json())
    lines = await sse_lines(client, OPENAI, chat(stream=True))
    chunks = [ChatCompletionChunk.model_validate_json(line[6:]) for line in lines[:-1]]

    [choice] = whole.choices
    assert (choice.message.content, choice.message.refusal) == (None, "I can't help with that.")
    deltas = [c.choices[0].delta for c in chunks]
    assert "".join(d.refusal or "" for d in deltas) == "I can't help with that."
    assert not any(d.content for d in deltas)


async def test_anthropic_stream_follows_the_documented_event_sequence(
    client: httpx.AsyncClient,
) -> None:
    body = claude(text="tell me a story about a cat")
    expected = (await client.post(ANTHROPIC, json=body)).json()

    lines = await sse_lines(client, ANTHROPIC, body | {"stream": True})

    names = [line.removeprefix("event: ") for line in lines[0::2]]
    events = [orjson.loads(line.removeprefix("data: ")) for line in lines[1::2]]
    assert [event["type"] for event in events] == names
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    assert events[0]["message"]["usage"]["input_tokens"] == expected["usage"]["input_tokens"]
    text = "".join(event["delta"]["text"] for event in events[3:-3])
    assert text == expected["content"][0]["text"]
    assert events[-2]["delta"]["stop_reason"] == "end_turn"
    assert events[-2]["usage"]["output_tokens"] == expected["usage"]["output_tokens"]


async def test_openai_calls_the_first_tool_when_the_user_spoke_last(
    client: httpx.AsyncClient,
) -> None:
    tools = [{"type": "function", "function": WEATHER_TOOL}, {"type": "function", "function": {}}]

    called = (await client.post(OPENAI, json=chat(tools=tools))).json()
    declined = (await client.post(OPENAI, json=chat(tools=tools, tool_choice="none"))).json()

    [choice] = called["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["id"].startswith("call_")
    assert call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": "{}"}
    assert declined["choices"][0]["finish_reason"] == "stop"


async def test_openai_streams_a_tool_call(client: httpx.AsyncClient) -> None:
    body = chat(tools=[{"type": "function", "function": WEATHER_TOOL}], stream=True)

    lines = await sse_lines(client, OPENAI, body)

    deltas = [orjson.loads(line.removeprefix("data: "))["choices"][0] for line in lines[:-1]]
    calls = [part for d in deltas for part in d["delta"].get("tool_calls") or []]
    assert calls[0]["function"]["name"] == "get_weather"
    assert "".join(call["function"]["arguments"] for call in calls) == "{}"
    assert deltas[-1]["finish_reason"] == "tool_calls"


async def test_anthropic_uses_a_tool_then_answers_its_result(client: httpx.AsyncClient) -> None:
    tools = [{"name": "get_weather", "input_schema": {"type": "object"}}]

    first = (await client.post(ANTHROPIC, json=claude(tools=tools))).json()
    [use] = first["content"]
    result = {"type": "tool_result", "tool_use_id": use["id"], "content": "sunny"}
    turns = [
        *claude()["messages"],
        {"role": "assistant", "content": first["content"]},
        {"role": "user", "content": [result]},
    ]
    second = (await client.post(ANTHROPIC, json=claude(tools=tools, messages=turns))).json()

    assert first["stop_reason"] == "tool_use"
    assert use["type"] == "tool_use"
    assert use["id"].startswith("toolu_")
    assert (use["name"], use["input"]) == ("get_weather", {})
    assert second["stop_reason"] == "end_turn"
    assert second["content"] == [{"type": "text", "text": "mock reply to: sunny"}]


async def test_control_endpoints_configure_report_and_reset(
    mock: MockProvider, client: httpx.AsyncClient
) -> None:
    # Given a behaviour set over HTTP, as another process would
    config = {"models": {"gpt-down": {"error_rate": 1, "error_status": 503}}}
    configured = await client.post("/_mock/config", json=config)
    refused = await client.post("/_mock/config", json={"default": {"latency": 5}})

    # When one call fails and one succeeds
    down = await client.post(OPENAI, json=chat("gpt-down"))
    up = await client.post(OPENAI, json=chat("gpt-up"))
    counters = (await client.get("/_mock/stats")).json()
    logged = (await client.get("/_mock/stats", params={"log": "1"})).json()
    await client.post("/_mock/reset")
    after_reset = (await client.get("/_mock/stats")).json()

    # Expect the behaviour applied, counted, logged, and cleared
    assert configured.status_code == 200
    assert mock.config.behavior("gpt-down").error_status == 503
    assert refused.status_code == 400  # a typo in a field name is refused, not ignored
    assert (down.status_code, up.status_code) == (503, 200)
    assert down.json()["error"]["type"] == "server_error"
    assert counters == {
        "calls": 2,
        "hung": 0,
        "by_model": {"gpt-down": 1, "gpt-up": 1},
        "by_status": {"503": 1, "200": 1},
    }
    assert [entry["status"] for entry in logged["log"]] == [503, 200]
    assert logged["log"][1]["body"]["messages"] == [{"role": "user", "content": "hello there"}]
    assert after_reset["calls"] == 0


async def test_the_log_records_what_the_provider_received(
    mock: MockProvider, client: httpx.AsyncClient
) -> None:
    await client.post(ANTHROPIC, json=claude(system="Be brief.", stream=True))

    [record] = mock.requests
    assert (record.path, record.model, record.status, record.stream) == (
        ANTHROPIC,
        "claude-mock",
        200,
        True,
    )
    assert record.system == "Be brief."
    assert record.messages == [{"role": "user", "content": "hello there"}]
    assert record.t <= time.monotonic()


async def test_api_keys_are_noted_but_never_kept(
    mock: MockProvider, client: httpx.AsyncClient
) -> None:
    await client.post(OPENAI, json=chat(), headers={"authorization": f"Bearer {SECRET}"})
    await client.post(ANTHROPIC, json=claude(), headers={"x-api-key": SECRET})
    await client.post(OPENAI, json=chat())
    served = await client.get("/_mock/stats", params={"log": "1"})

    assert [record.had_key for record in mock.requests] == [True, True, False]
    assert SECRET not in served.text
    assert SECRET not in repr(mock.requests)


async def test_unknown_routes_get_404_json(client: httpx.AsyncClient) -> None:
    missing = await client.get("/v1/models")
    wrong_method = await client.get(OPENAI)

    assert missing.status_code == 404
    assert missing.json()["error"]["message"] == "no route for GET /v1/models"
    assert wrong_method.status_code == 404


async def test_many_concurrent_calls_are_served_in_parallel(mock: MockProvider) -> None:
    mock.configure(MockConfig(default=Behavior(latency_ms=200)))
    limits = httpx.Limits(max_connections=100)

    async with httpx.AsyncClient(base_url=mock.url, limits=limits) as client:
        responses = await asyncio.gather(*(client.post(OPENAI, json=chat()) for _ in range(100)))

    assert {response.status_code for response in responses} == {200}
    # Each call held the mock 200 ms; served in parallel, those windows overlap.
    ends = sorted(record.t for record in mock.requests)
    assert max(sum(1 for other in ends if end - 0.2 < other <= end) for end in ends) >= 20


async def test_closing_the_mock_closes_idle_keep_alive_connections() -> None:
    async with MockProvider() as mock:
        port = int(mock.url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /_mock/reset HTTP/1.1\r\nhost: mock\r\ncontent-length: 0\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        await reader.readexactly(len(b'{"ok":true}'))
    try:
        async with asyncio.timeout(1):
            assert await reader.read() == b""  # the server closed its end
    finally:
        writer.close()


async def test_the_same_conversation_gets_the_same_reply_from_both_providers(
    client: httpx.AsyncClient,
) -> None:
    # Given one conversation in each format: a system prompt, a tool call and its result
    openai_turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "call_1", "type": "function"}],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 degrees"},
    ]
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny, 21 degrees"}
    anthropic_turns = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "input": {}}]},
        {"role": "user", "content": [result]},
    ]

    openai = (await client.post(OPENAI, json=chat(messages=openai_turns))).json()
    body = claude(system="Be brief.", messages=anthropic_turns)
    anthropic = (await client.post(ANTHROPIC, json=body)).json()

    assert openai["choices"][0]["message"]["content"] == "mock reply to: sunny, 21 degrees"
    assert anthropic["content"][0]["text"] == openai["choices"][0]["message"]["content"]
    assert anthropic["usage"]["input_tokens"] == openai["usage"]["prompt_tokens"]
    assert anthropic["usage"]["output_tokens"] == openai["usage"]["completion_tokens"]
