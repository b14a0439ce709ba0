"""What the provider said comes back to the caller whole, in either API's format, streamed or
not: the stop sequence it stopped at and the model it served. The official openai and
anthropic SDKs against a real front door, worker and mock provider over HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anthropic
import openai
import pytest
from anthropic import AsyncAnthropic
from anthropic.types import MessageParam

from mockprovider import Behavior, MockConfig
from queuegate.settings import Settings
from router import load_catalog
from tests.frontdoor_support import Door, open_door

STORY: list[MessageParam] = [{"role": "user", "content": "Tell me a story"}]
"""The mock answers ``mock reply to: Tell me a story``: it stops at ``story`` when asked."""


@pytest.fixture
async def door(settings: Settings) -> AsyncIterator[Door]:
    async with open_door(settings) as opened:
        yield opened


def anthropic_client(door: Door) -> AsyncAnthropic:
    return AsyncAnthropic(base_url=door.url, api_key=door.keys["alpha"], max_retries=0)


def served_model(door: Door, alias: str) -> str:
    """The upstream model of the alias's deployment, which the mock reports serving."""
    catalog = load_catalog(None, {"QUEUEGATE_MOCK_URL": door.gateway.mock.url})
    return catalog.models[alias].deployments[0].model


async def test_an_anthropic_caller_is_told_the_stop_sequence_streamed_or_not(door: Door) -> None:
    async with anthropic_client(door) as sdk:
        # When a Claude model stops at one of the request's stop sequences, asked whole
        whole = await sdk.messages.create(
            model="claude-haiku", max_tokens=50, stop_sequences=["story"], messages=STORY
        )
        # and streamed
        async with sdk.messages.stream(
            model="claude-haiku", max_tokens=50, stop_sequences=["story"], messages=STORY
        ) as stream:
            deltas = [e async for e in stream if e.type == "message_delta"]
            final = await stream.get_final_message()

    # Expect Anthropic's own answer: stop_sequence, naming the sequence
    for message in (whole, final):
        assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "story")
        assert message.content[0].type == "text"
        assert message.content[0].text.rstrip() == "mock reply to: Tell me a"
    [delta] = deltas
    assert (delta.delta.stop_reason, delta.delta.stop_sequence) == ("stop_sequence", "story")


async def test_an_openai_caller_gets_the_stop_sequence_beside_finish_reason(door: Door) -> None:
    async with door.client() as sdk:
        # When an OpenAI-format caller's Claude model stops at a stop sequence
        whole = await sdk.chat.completions.create(
            model="claude-haiku", max_tokens=50, stop=["story"], messages=[dict(STORY[0])]
        )
        chunks = [
            chunk
            async for chunk in await sdk.chat.completions.create(
                model="claude-haiku",
                max_tokens=50,
                stop=["story"],
                messages=[dict(STORY[0])],
                stream=True,
            )
        ]

    # Expect OpenAI's finish_reason stop, and the sequence Anthropic named beside it
    [choice] = whole.choices
    assert choice.finish_reason == "stop"
    assert choice.model_extra == {"stop_sequence": "story"}
    [last] = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason]
    assert last.finish_reason == "stop" and last.model_extra == {"stop_sequence": "story"}


async def test_an_openai_provider_cannot_say_it_stopped_at_a_sequence(door: Door) -> None:
    async with anthropic_client(door) as sdk:
        # When a model served by OpenAI's API stops at a stop sequence
        message = await sdk.messages.create(
            model="gpt-4o-mini", max_tokens=50, stop_sequences=["story"], messages=STORY
        )

    # Expect the sequence honoured, but end_turn: OpenAI's finish_reason "stop" does not tell
    # a stop sequence from a natural end (docs/providers.md)
    assert message.content[0].type == "text"
    assert message.content[0].text.rstrip() == "mock reply to: Tell me a"
    assert (message.stop_reason, message.stop_sequence) == ("end_turn", None)


@pytest.mark.parametrize("alias", ["claude-haiku", "gpt-4o-mini"])
async def test_every_answer_names_the_model_the_provider_served(door: Door, alias: str) -> None:
    served = served_model(door, alias)
    async with door.client() as openai_sdk, anthropic_client(door) as anthropic_sdk:
        # When the alias is asked for in both formats, whole and streamed
        raw = await openai_sdk.chat.completions.with_raw_response.create(
            model=alias, messages=[dict(STORY[0])]
        )
        completion = raw.parse()
        chunks = [
            chunk
            async for chunk in await openai_sdk.chat.completions.create(
                model=alias, messages=[dict(STORY[0])], stream=True
            )
        ]
        message = await anthropic_sdk.messages.create(model=alias, max_tokens=50, messages=STORY)
        async with anthropic_sdk.messages.stream(
            model=alias, max_tokens=50, messages=STORY
        ) as stream:
            [start] = [e async for e in stream if e.type == "message_start"]
            final = await stream.get_final_message()

    # Expect the model the provider reported everywhere, as the providers themselves answer;
    # the gateway's header names the alias that served (another one after a fallback)
    assert completion.model == served
    assert {chunk.model for chunk in chunks} == {served}
    assert message.model == start.message.model == final.model == served
    assert raw.headers["x-queuegate-model-used"] == alias


FLAKY_DOWN = MockConfig(models={"flaky-gpt": Behavior(error_rate=1.0, error_status=503)})
"""flaky-gpt's deployment failing every call: its fallback, claude-haiku, serves it."""


async def test_a_streamed_answer_names_the_fallback_serving_it_as_a_whole_one_does(
    settings: Settings,
) -> None:
    # Given flaky-gpt served by its fallback, claude-haiku
    async with (
        open_door(settings, mock_config=FLAKY_DOWN) as door,
        door.client() as openai_sdk,
        anthropic_client(door) as anthropic_sdk,
    ):
        # When it is asked for streamed, in either API's format, and whole
        streamed = await openai_sdk.chat.completions.with_raw_response.create(
            model="flaky-gpt", messages=[dict(STORY[0])], stream=True
        )
        chunks = [chunk async for chunk in streamed.parse()]
        messages = await anthropic_sdk.messages.with_raw_response.create(
            model="flaky-gpt", max_tokens=50, messages=STORY, stream=True
        )
        events = [event async for event in await messages.parse()]
        whole = await openai_sdk.chat.completions.with_raw_response.create(
            model="flaky-gpt", messages=[dict(STORY[0])]
        )

    # Expect each answer's head to name the fallback, the streams' before their first byte
    assert chunks and events
    for answer in (streamed, messages, whole):
        assert answer.headers["x-queuegate-model-used"] == "claude-haiku"
        assert answer.headers["x-queuegate-fallback"] == "true"
        assert answer.headers["x-queuegate-cached"] == "false"


async def test_more_than_four_stop_sequences_reach_a_vllm_server_and_openai_refuses_them(
    door: Door,
) -> None:
    stops = ["never", "seen", "here", "at", "all", "story"]
    async with door.client() as sdk:
        # When a caller sends six stop sequences to a model a vLLM server serves
        served = await sdk.chat.completions.create(
            model="local-llama", max_tokens=50, stop=stops, messages=[dict(STORY[0])]
        )
        sent = door.gateway.mock.requests[-1].body
        # and to one OpenAI serves
        with pytest.raises(openai.BadRequestError) as refused:
            await sdk.chat.completions.create(
                model="gpt-4o-mini", max_tokens=50, stop=stops, messages=[dict(STORY[0])]
            )

    # Expect vLLM, which takes a list of any length, to get them all and stop at the last
    assert sent is not None and sent["stop"] == stops
    assert served.choices[0].message.content == "mock reply to: Tell me a"
    # and OpenAI's limit of 4 to be kept, naming the parameter
    assert refused.value.param == "stop"


async def test_anthropics_thinking_in_an_openai_request_keeps_anthropics_rules(
    door: Door,
) -> None:
    hi = [dict(STORY[0])]
    thinking = {"type": "enabled", "budget_tokens": 2000}
    async with door.client() as sdk:
        # When an OpenAI-format request to a Claude model thinks with no max_tokens
        unbounded = await sdk.chat.completions.create(
            model="claude-haiku", messages=hi, extra_body={"thinking": thinking}
        )
        unbounded_sent = door.gateway.mock.requests[-1].body
        # and with a max_tokens below its budget
        await sdk.chat.completions.create(
            model="claude-haiku", messages=hi, max_tokens=1500, extra_body={"thinking": thinking}
        )
        bounded_sent = door.gateway.mock.requests[-1].body
        # and with a thinking Anthropic's own API refuses, to either provider
        refused = []
        for model, bad in [
            ("claude-haiku", {"type": "disabled", "display": "omitted"}),
            ("gpt-4o-mini", {"type": "disabled", "display": "omitted"}),
            ("gpt-4o-mini", thinking | {"foo": 1}),
        ]:
            with pytest.raises(openai.BadRequestError) as error:
                await sdk.chat.completions.create(
                    model=model, messages=hi, extra_body={"thinking": bad}
                )
            refused.append(error.value.param)

    # Expect Anthropic to get room to answer past the budget, as reasoning_effort gets it
    assert unbounded.choices[0].message.content == "mock reply to: Tell me a story"
    assert unbounded_sent is not None
    assert (unbounded_sent["max_tokens"], unbounded_sent["thinking"]) == (3024, thinking)
    # ... the budget lowered below a max_tokens that bounds thinking and answer together
    assert bounded_sent is not None and bounded_sent["max_tokens"] == 1500
    assert bounded_sent["thinking"] == {"type": "enabled", "budget_tokens": 1499}
    # ... and what /v1/messages refuses refused the same, naming the field, never called
    assert refused == ["thinking.display", "thinking.display", "thinking.foo"]
    assert door.gateway.mock.stats.calls == 2


async def test_an_allowed_tools_choice_allowing_no_tool_offered_is_refused(door: Door) -> None:
    function = {"type": "function", "function": {"name": "get_w", "parameters": {"type": "object"}}}
    refused = []
    async with door.client() as sdk:
        # When an allowed_tools choice to a Claude model requires a tool the request does not
        # offer: unknown, none at all, or a function's name as a custom tool's
        for allowed in [
            [{"type": "function", "function": {"name": "nope"}}],
            [],
            [{"type": "custom", "custom": {"name": "get_w"}}],
        ]:
            choice = {
                "type": "allowed_tools",
                "allowed_tools": {"mode": "required", "tools": allowed},
            }
            with pytest.raises(openai.BadRequestError) as error:
                await sdk.chat.completions.create(
                    model="claude-haiku",
                    messages=[dict(STORY[0])],
                    tools=[function],  # type: ignore[list-item]
                    tool_choice=choice,  # type: ignore[arg-type]
                )
            refused.append((error.value.code, error.value.param))

    # Expect each refused naming the allowed tools, never sent as no tool to call
    assert refused == [("invalid_request", "tool_choice.allowed_tools.tools")] * 3
    assert door.gateway.mock.stats.calls == 0


@pytest.mark.parametrize("alias", ["claude-haiku", "gpt-4o-mini"])
async def test_a_tool_choice_naming_a_tool_not_offered_is_refused_in_either_format(
    door: Door, alias: str
) -> None:
    function = {"type": "function", "function": {"name": "get_w", "parameters": {"type": "object"}}}
    tool: Any = {"name": "get_w", "input_schema": {"type": "object"}}
    async with door.client() as openai_sdk, anthropic_client(door) as anthropic_sdk:
        # When a request names a tool its tools do not offer, in OpenAI's format (another
        # function, a custom tool of a function's name, or with no tools at all)
        refused = []
        for tools, choice in [
            ([function], {"type": "function", "function": {"name": "nope"}}),
            ([function], {"type": "custom", "custom": {"name": "get_w"}}),
            (openai.omit, {"type": "function", "function": {"name": "get_w"}}),
        ]:
            with pytest.raises(openai.BadRequestError) as error:
                await openai_sdk.chat.completions.create(
                    model=alias, messages=[dict(STORY[0])], tools=tools, tool_choice=choice
                )
            refused.append((error.value.code, error.value.param))
        # and in Anthropic's
        with pytest.raises(anthropic.BadRequestError) as anthropic_error:
            await anthropic_sdk.messages.create(
                model=alias,
                max_tokens=50,
                messages=STORY,
                tools=[tool],
                tool_choice={"type": "tool", "name": "nope"},
            )
        # while naming the tool offered is served, that tool called
        served = await anthropic_sdk.messages.create(
            model=alias,
            max_tokens=50,
            messages=STORY,
            tools=[tool],
            tool_choice={"type": "tool", "name": "get_w"},
        )

    # Expect each refused naming the field as its caller sent it, none sent to be refused by
    # the provider after its turn in the queue
    assert refused == [
        ("invalid_request", "tool_choice.function.name"),
        ("invalid_request", "tool_choice.custom.name"),
        ("invalid_request", "tool_choice.function.name"),
    ]
    message = anthropic_error.value.body["error"]["message"]  # type: ignore[index]
    assert "tool_choice.name: names the function tool 'nope', which tools does not offer" in (
        message
    )
    assert [block.type for block in served.content] == ["tool_use"]
    assert door.gateway.mock.stats.calls == 1


async def test_reasoning_effort_beside_adaptive_thinking_reaches_anthropic_as_its_effort(
    door: Door,
) -> None:
    async with door.client() as sdk:
        # When an OpenAI-format request to a Claude model thinks adaptively at an effort
        answer = await sdk.chat.completions.create(
            model="claude-haiku",
            messages=[dict(STORY[0])],
            reasoning_effort="max",
            extra_body={"thinking": {"type": "adaptive"}},
        )
        sent = door.gateway.mock.requests[-1].body

    # Expect Anthropic to get the effort where it takes it for adaptive thinking, and to think
    assert sent is not None
    assert (sent["thinking"], sent["output_config"]) == ({"type": "adaptive"}, {"effort": "max"})
    assert answer.choices[0].message.model_extra is not None
    assert answer.choices[0].message.model_extra["reasoning_content"]


async def test_an_anthropic_callers_effort_reaches_either_provider_as_its_own(
    door: Door,
) -> None:
    async with anthropic_client(door) as sdk:
        # When an Anthropic-format caller thinks adaptively at an effort, as Anthropic
        # documents it, to a Claude model
        claude = await sdk.messages.create(
            model="claude-haiku",
            max_tokens=8000,
            messages=STORY,
            thinking={"type": "adaptive"},
            output_config={"effort": "max"},
        )
        to_anthropic = door.gateway.mock.requests[-1].body
        # and to a model OpenAI serves
        gpt = await sdk.messages.create(
            model="gpt-4o-mini",
            max_tokens=8000,
            messages=STORY,
            thinking={"type": "adaptive"},
            output_config={"effort": "max"},
        )
        to_openai = door.gateway.mock.requests[-1].body

    # Expect Anthropic to get the same effort and to think at it
    assert to_anthropic is not None
    assert to_anthropic["thinking"] == {"type": "adaptive"}
    assert to_anthropic["output_config"] == {"effort": "max"}
    assert [block.type for block in claude.content] == ["thinking", "text"]
    # and OpenAI its reasoning_effort of that name, with nothing of Anthropic's
    assert to_openai is not None and to_openai["reasoning_effort"] == "max"
    assert not {"thinking", "output_config"} & to_openai.keys()
    assert [block.type for block in gpt.content] == ["text"]  # OpenAI shows no reasoning
    assert gpt.usage.output_tokens > 4096  # the mock's reasoning at max, then the answer
    assert door.gateway.mock.stats.calls == 2


async def test_an_effort_the_gateway_cannot_carry_and_a_format_are_refused_by_name(
    door: Door,
) -> None:
    refused = []
    async with anthropic_client(door) as sdk:
        # When an Anthropic-format caller sets an effort without adaptive thinking (a job's
        # reasoning_effort would be a thinking budget then), or a structured output format
        for thinking, config in [
            (anthropic.omit, {"effort": "low"}),
            ({"type": "enabled", "budget_tokens": 1024}, {"effort": "high"}),
            ({"type": "adaptive"}, {"format": {"type": "json_schema", "schema": {}}}),
        ]:
            with pytest.raises(anthropic.BadRequestError) as error:
                await sdk.messages.create(
                    model="claude-haiku",
                    max_tokens=2000,
                    messages=STORY,
                    thinking=thinking,
                    output_config=config,  # type: ignore[arg-type]
                )
            refused.append(error.value.body["error"]["message"])  # type: ignore[index]

    # Expect each refused naming the field, none sent
    carried_beside = "output_config.effort: this gateway carries an effort beside adaptive"
    assert carried_beside in refused[0] and carried_beside in refused[1]
    assert refused[2] == "invalid_request: output_config.format: not supported by this gateway"
    assert door.gateway.mock.stats.calls == 0


async def test_an_openai_caller_gets_the_max_effort_openai_documents(door: Door) -> None:
    async with door.client() as sdk:
        # When an OpenAI-format caller asks a model OpenAI serves for its max effort
        answer = await sdk.chat.completions.create(
            model="gpt-4o-mini", messages=[dict(STORY[0])], reasoning_effort="max"
        )
        sent = door.gateway.mock.requests[-1].body

    # Expect OpenAI to get it as asked (the openai SDK's ReasoningEffort has it) and reason
    assert sent is not None and sent["reasoning_effort"] == "max"
    assert answer.usage is not None and answer.usage.completion_tokens_details is not None
    assert answer.usage.completion_tokens_details.reasoning_tokens


async def test_a_custom_tool_call_in_history_is_refused_by_anthropic_by_name(door: Door) -> None:
    call = {"id": "call_x1", "type": "custom", "custom": {"name": "exec", "input": "ls -la"}}
    history = [
        {"role": "user", "content": "run"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_x1", "content": "file.txt"},
    ]
    async with door.client() as sdk:
        # When a conversation holding a custom tool's call goes to a Claude model, whose
        # tool_use takes an object, not a custom tool's text
        with pytest.raises(openai.BadRequestError) as refused:
            await sdk.chat.completions.create(model="claude-haiku", messages=history)  # type: ignore[arg-type]
        # and to an OpenAI model, which has custom tools
        served = await sdk.chat.completions.create(model="gpt-4o-mini", messages=history)  # type: ignore[arg-type]

    # Expect it refused naming the call, never sent with its input lost
    error = refused.value
    assert (error.code, error.param) == ("invalid_request", "messages.1.tool_calls.0"), error
    assert "unsupported: messages.1.tool_calls.0: custom tool calls" in error.message
    assert served.choices[0].message.content
    assert [r.path for r in door.gateway.mock.requests] == ["/v1/chat/completions"]


async def test_a_vllm_server_takes_cache_control_on_a_content_part(door: Door) -> None:
    part = {"type": "text", "text": "Tell me a story", "cache_control": {"type": "ephemeral"}}
    async with door.client() as sdk:
        # When a content part marked for Anthropic's prompt cache goes to a vLLM server
        served = await sdk.chat.completions.create(
            model="local-llama",
            messages=[{"role": "user", "content": [part]}],  # type: ignore[list-item]
        )

    # Expect it passed on as it is, and vLLM (which ignores what it does not know) to answer
    sent = door.gateway.mock.requests[-1].body
    assert sent is not None and sent["messages"][0]["content"] == [part]
    assert served.choices[0].message.content == "mock reply to: Tell me a story"
