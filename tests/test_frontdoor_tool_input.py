"""A model's tool call that a Messages API answer cannot hold, and the front door's own faults,
end to end: the official SDKs (with their default retries) against a real front door, worker,
accounting and the mock provider, which calls tools with what ``Behavior.tool_input`` says.

A ``tool_use`` block's ``input`` is an object (Anthropic's reference; the SDK's
``ToolUseBlock.input`` is a ``Dict``); an OpenAI model's ``arguments`` may be any text, not even
JSON (OpenAI's reference warns of it), and a deployment may send an array. Such an answer was
served and billed: the Anthropic caller gets an error saying what the model sent, which it is
told not to retry (a retry would call the provider again), and its answer stays readable by
id in OpenAI's format."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import anthropic
import httpx
import httpx2
import openai
import pytest
from anthropic.types import Message, RawMessageStreamEvent, ToolParam
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from frontdoor import anthropic_stream
from frontdoor.answers import note_job
from frontdoor.anthropic_stream import InputText, MessageEvents
from frontdoor.app import create_app
from frontdoor.calls import Opened, streamed
from frontdoor.service import FrontDoor
from mockprovider import Behavior, MockConfig
from producer.streams import ChatStream
from queuegate import provider_formats
from queuegate.messages import ChatJob, ChatResult, GatewayInfo, StreamChunk
from queuegate.settings import Settings
from router import load_catalog
from tests.frontdoor_support import HELLO, Door, open_door
from tests.test_frontdoor_batches import anthropic_ended

TOOLS: list[ToolParam] = [
    {"name": "get_w", "input_schema": {"type": "object", "properties": {"c": {"type": "string"}}}}
]
TRUNCATED = '{"c": "x'
"""An OpenAI model's arguments cut by max_tokens: not JSON."""
LAX = [
    pytest.param('{"c": NaN}', id="nan"),
    pytest.param('{"c": 1e400}', id="beyond-a-float"),
    pytest.param('{"c": "\\ud800"}', id="lone-surrogate"),
]
"""Arguments that Python's ``json`` reads as an object but that are no strict JSON: no
Messages API form holds them (``strict_json``)."""
ODD = [
    pytest.param("gpt-4o-mini", "gpt-4o-mini", TRUNCATED, id="openai-arguments-not-json"),
    pytest.param("gpt-4o-mini", "gpt-4o-mini", "[1, 2]", id="openai-arguments-an-array"),
    *(
        pytest.param("gpt-4o-mini", "gpt-4o-mini", *lax.values, id=f"openai-arguments-{lax.id}")
        for lax in LAX
    ),
    pytest.param("claude-haiku", "claude-3-5-haiku-latest", "[1, 2]", id="anthropic-input-array"),
]
"""The alias asked for, the upstream model the mock serves it as, and its tool call's input."""
STREAMED = [
    # Found in the whole answer, once the stream is done: it begins as an object does
    pytest.param(
        "gpt-4o-mini", "gpt-4o-mini", TRUNCATED, TRUNCATED, id="openai-arguments-not-json"
    ),
    # Found at the first delta of the input, which is no object's beginning
    pytest.param("gpt-4o-mini", "gpt-4o-mini", "[1, 2]", "[1, 2]", id="openai-arguments-an-array"),
    # Found in the whole answer: it begins as an object does, and is JSON only to a lax reader
    *(
        pytest.param(
            "gpt-4o-mini", "gpt-4o-mini", *lax.values, *lax.values, id=f"openai-arguments-{lax.id}"
        )
        for lax in LAX
    ),
    # The deployment's own delta, as it sent it (its JSON without blanks)
    pytest.param(
        "claude-haiku", "claude-3-5-haiku-latest", "[1, 2]", "[1,2]", id="anthropic-input-array"
    ),
]
"""As ``ODD``, and what the error event repeats of the input."""


def sdk(door: Door) -> anthropic.AsyncAnthropic:
    """The SDK as a caller has it: its default 2 retries of a 5xx, unless told not to."""
    return anthropic.AsyncAnthropic(base_url=door.url, api_key=door.keys["alpha"], max_retries=2)


def calling(upstream: str, called_with: str) -> MockConfig:
    return MockConfig(models={upstream: Behavior(tool_input=called_with)})


def accounted(rows: list[Any]) -> list[tuple[str, str | None, bool]]:
    """Each usage row's status, error code, and whether it is billed."""
    return [(row["status"], row["error_code"], row["cost_usd"] > 0) for row in rows]


BILLED_ERROR = ("error", "provider_error", True)
"""The row of a job whose caller got an error after its call was billed."""


async def answer_by_id(door: Door, job_id: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=door.v1) as http:
        got = await http.get(f"/jobs/{job_id}", headers={"x-api-key": door.keys["alpha"]})
    assert got.status_code == 200, got.text
    answer: dict[str, Any] = got.json()
    return answer


@pytest.mark.parametrize(("model", "upstream", "called_with"), ODD)
async def test_a_message_whose_tool_input_is_not_an_object_is_an_error_not_retried(
    settings: Settings, model: str, upstream: str, called_with: str
) -> None:
    # Given a model that calls its tool with input that is not a JSON object
    async with open_door(settings, mock_config=calling(upstream, called_with)) as door:
        # When the SDK, with its default retries, asks it for a message
        async with sdk(door) as claude:
            with pytest.raises(anthropic.APIStatusError) as failed:
                await claude.messages.create(
                    model=model,
                    max_tokens=50,
                    tools=TOOLS,
                    messages=[{"role": "user", "content": "Weather in Paris?"}],
                )
        calls = door.gateway.mock.stats.calls
        rows = await door.gateway.usage_rows(1)
        job_id = failed.value.response.headers["x-queuegate-job-id"]
        answer = await answer_by_id(door, job_id)

    # Expect one call, billed once: a 502 in Anthropic's shape saying what the model sent,
    # which the SDK was told not to retry
    error = failed.value
    assert error.status_code == 502 and error.type == "api_error"
    assert error.response.headers["content-type"] == "application/json"
    assert error.response.headers["x-should-retry"] == "false"
    assert error.api_message is not None
    assert error.api_message.startswith("provider_error: the model called tool 'get_w'")
    assert "not a JSON object" in error.api_message and repr(called_with) in error.api_message
    assert f"GET /v1/jobs/{job_id}" in error.api_message
    assert calls == 1
    assert [row["job_id"] for row in rows] == [job_id]
    # accounted as the error its caller got, billed, not as answered
    assert accounted(rows) == [BILLED_ERROR]
    # and the answer kept, readable by id as the model gave it
    [call] = answer["choices"][0]["message"]["tool_calls"]
    assert call["function"] == {"name": "get_w", "arguments": called_with}


@pytest.mark.parametrize(("model", "upstream", "called_with", "shown"), STREAMED)
async def test_a_stream_whose_tool_input_is_not_an_object_ends_with_an_error_event(
    settings: Settings, model: str, upstream: str, called_with: str, shown: str
) -> None:
    # Given a model that calls its tool with input that is not a JSON object
    async with open_door(settings, mock_config=calling(upstream, called_with)) as door:
        # When the SDK streams a message from it
        events: list[str] = []
        async with sdk(door) as claude:
            with pytest.raises(anthropic.APIStatusError) as failed:
                async with claude.messages.stream(
                    model=model,
                    max_tokens=50,
                    tools=TOOLS,
                    messages=[{"role": "user", "content": "Weather in Paris?"}],
                ) as stream:
                    async for event in stream:
                        events.append(event.type)
        calls = door.gateway.mock.stats.calls
        rows = await door.gateway.usage_rows(1)

    # Expect the model's deltas, then Anthropic's error event in place of message_stop,
    # saying what the model sent: not a dropped connection (which the SDK would retry)
    assert events[0] == "message_start" and "message_stop" not in events
    body = failed.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "api_error"
    message = body["error"]["message"]
    assert message.startswith("provider_error: the model called tool 'get_w'")
    assert repr(shown) in message
    assert calls == 1 and accounted(rows) == [BILLED_ERROR]


@pytest.mark.parametrize("called_with", [pytest.param(TRUNCATED, id="not-json"), *LAX])
async def test_a_batch_line_whose_tool_input_is_not_an_object_errors_alone(
    settings: Settings, called_with: str
) -> None:
    # Given a Message Batch of a request whose model calls its tool with arguments that are
    # not (strict) JSON, beside a plain one
    requests: list[Any] = [
        {
            "custom_id": "odd",
            "params": {
                "model": "gpt-4o-mini",
                "max_tokens": 20,
                "tools": TOOLS,
                "messages": [{"role": "user", "content": "Weather in Paris?"}],
            },
        },
        {
            "custom_id": "plain",
            "params": {
                "model": "gpt-4o-mini",
                "max_tokens": 20,
                "messages": [{"role": "user", "content": "Hello there"}],
            },
        },
    ]
    async with open_door(settings, mock_config=calling("gpt-4o-mini", called_with)) as door:
        # When it ends
        async with sdk(door) as claude:
            batch = await claude.messages.batches.create(requests=requests)
            ended = await anthropic_ended(claude, batch.id)
            results = {
                r.custom_id: r.result async for r in await claude.messages.batches.results(batch.id)
            }
        calls = door.gateway.mock.stats.calls
        rows = await door.gateway.usage_rows(2)

    # Expect the odd line errored, saying what the model sent, and the plain one answered
    counts = ended.request_counts
    assert (counts.succeeded, counts.errored, counts.processing) == (1, 1, 0)
    odd, plain = results["odd"], results["plain"]
    assert odd.type == "errored" and odd.error.error.type == "api_error"
    assert odd.error.error.message.startswith("provider_error: the model called tool 'get_w'")
    assert repr(called_with) in odd.error.error.message
    assert plain.type == "succeeded" and plain.message.content[0].type == "text"
    # each served and billed once, the odd one accounted as the error its line says
    assert calls == 2
    assert sorted(accounted(rows)) == [BILLED_ERROR, ("ok", None, True)]


async def test_a_streamed_tool_input_with_a_surrogate_pair_is_answered(
    settings: Settings,
) -> None:
    # Given a model that calls its tool with a character beyond the BMP, escaped as a pair
    pair = calling("gpt-4o-mini", '{"c": "\\ud83d\\ude00"}')
    async with open_door(settings, mock_config=pair) as door:
        # When the SDK streams a message from it
        async with (
            sdk(door) as claude,
            claude.messages.stream(
                model="gpt-4o-mini",
                max_tokens=50,
                tools=TOOLS,
                messages=[{"role": "user", "content": "Weather in Paris?"}],
            ) as stream,
        ):
            message = await stream.get_final_message()
        rows = await door.gateway.usage_rows(1)

    # Expect the character, not an error: only a lone half has no form
    [block] = message.content
    assert block.type == "tool_use" and block.input == {"c": "\U0001f600"}
    assert message.stop_reason == "tool_use" and accounted(rows) == [("ok", None, True)]


@pytest.mark.parametrize(
    ("pieces", "refused_at"),
    [
        (['{"c": "\\ud8', '00"}'], 1),
        (['{"c": "\\ud83d', "\\", "ude00", ' x"}'], None),
        (['{"c": "\\ud83d', '\\n"}'], 1),
        (['{"c": "\\udc00'], 0),
        (['{"c": "\\\\ud800"}'], None),
        (['{"c": "\\ud83d', '"}'], 1),
        (["  ", " [1"], 1),
    ],
    ids=[
        "high-split",
        "pair-split",
        "high-then-other",
        "low-alone",
        "escaped-backslash",
        "high-then-quote",
        "an-array",
    ],
)
def test_a_streamed_input_is_refused_at_the_piece_that_shows_it_is_no_object(
    pieces: list[str], refused_at: int | None
) -> None:
    # Given a tool input's text as it streams, in pieces
    text = InputText()

    # When each piece comes
    refused = [text.refused(piece) for piece in pieces]

    # Expect it refused from the piece that shows it is no strict JSON object's beginning
    expected = [refused_at is not None and at >= refused_at for at in range(len(pieces))]
    assert refused == expected


@pytest.mark.parametrize("called_with", [TRUNCATED, "[1, 2]", *LAX])
async def test_an_openai_caller_gets_such_a_tool_call_as_sent_and_answered(
    settings: Settings, called_with: str
) -> None:
    # Given a model that calls its tool with arguments that are not a JSON object
    async with open_door(settings, mock_config=calling("gpt-4o-mini", called_with)) as door:
        # When an OpenAI-format caller asks it
        async with door.client() as client:
            completion = await client.chat.completions.create(
                model="gpt-4o-mini",
                max_tokens=50,
                tools=[{"type": "function", "function": {"name": "get_w", "parameters": {}}}],
                messages=[{"role": "user", "content": "Weather in Paris?"}],
            )
        rows = await door.gateway.usage_rows(1)

    # Expect the arguments as the model sent them, and the job accounted as answered
    [call] = completion.choices[0].message.tool_calls or []
    assert call.type == "function" and call.function.arguments == called_with
    assert accounted(rows) == [("ok", None, True)]


@pytest.mark.parametrize(
    ("model", "upstream"),
    [
        pytest.param("gpt-4o-mini", "gpt-4o-mini", id="translated"),
        pytest.param("claude-haiku", "claude-3-5-haiku-latest", id="anthropic-own"),
    ],
)
async def test_an_anthropic_answer_is_built_as_a_message_once(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, model: str, upstream: str
) -> None:
    # Given the Messages API message of every answer counted as it is built, wherever
    built: list[str] = []
    build = provider_formats.anthropic_message

    def counted(response: dict[str, Any], message_id: str) -> dict[str, Any]:
        built.append(message_id)
        return build(response, message_id)

    monkeypatch.setattr(provider_formats, "anthropic_message", counted)
    monkeypatch.setattr(anthropic_stream, "anthropic_message", counted)
    async with open_door(settings, mock_config=calling(upstream, '{"c": "Paris"}')) as door:
        # When the SDK asks a model that calls its tool with an object for a message
        async with sdk(door) as claude:
            message = await claude.messages.create(
                model=model,
                max_tokens=50,
                tools=TOOLS,
                messages=[{"role": "user", "content": "Weather in Paris?"}],
            )
        rows = await door.gateway.usage_rows(1)

    # Expect it answered and accounted, its message built once, by the front door: the
    # worker checks the tool's input without building one
    [call] = [block for block in message.content if block.type == "tool_use"]
    assert call.input == {"c": "Paris"}
    assert accounted(rows) == [("ok", None, True)]
    assert built == [message.id]


async def test_a_deadline_exceeded_names_its_job(settings: Settings) -> None:
    # Given a model whose provider takes 2 s
    slow = MockConfig(models={"gpt-4o-mini": Behavior(latency_ms=2000)})
    async with open_door(settings, mock_config=slow) as door, sdk(door) as claude:
        # When a caller waits 1 s for it
        with pytest.raises(anthropic.GatewayTimeoutError) as late:
            await claude.messages.create(
                model="gpt-4o-mini",
                max_tokens=10,
                messages=[{"role": "user", "content": "Hello there"}],
                extra_headers={"x-queuegate-timeout": "1"},
            )

    # Expect the 504 to carry its job's id, as every answer about a job does
    headers = late.value.response.headers
    assert headers["x-queuegate-job-id"] == headers["x-request-id"]
    assert headers["x-queuegate-job-id"] in (late.value.api_message or "")


# --- the front door's own faults -------------------------------------------------------------


@dataclass
class Faulty:
    """The front door's app with a route of each API that fails (a bug) after naming its job,
    and the paths it served."""

    app: FastAPI
    served: list[str]


@pytest.fixture
def faulty(settings: Settings) -> Faulty:
    app = create_app(settings, catalog=load_catalog(None, {}))
    served: list[str] = []

    async def fail(request: Request) -> None:
        served.append(request.url.path)
        note_job(request, "job-7")
        raise RuntimeError("a bug, holding sk-secret-value")

    async def fail_streaming(request: Request) -> StreamingResponse:
        # A stream whose first text went out, its writer failing at the end
        served.append(request.url.path)
        job = ChatJob(job_id="job-7", team="alpha", model="claude-haiku", messages=HELLO)
        note_job(request, job.job_id)
        stream = ChatStream(job.job_id, nothing, None)
        stream.put(
            ChatResult(
                job_id=job.job_id,
                team="alpha",
                status="ok",
                response={},
                gateway=GatewayInfo(model_requested=job.model),
            )
        )
        first = StreamChunk(job_id=job.job_id, seq=0, delta={"content": "Hel"})
        opened = Opened(stream, first, bridged=False)  # so no bridge is told of it
        door = cast(FrontDoor, None)
        return streamed(door, job, opened, FailingAtTheEnd(job.job_id, job.model), 0.0)

    for path in ("/v1/messages/fault", "/v1/chat/fault"):
        app.add_api_route(path, fail, methods=["POST"])
    app.add_api_route("/v1/messages/stream-fault", fail_streaming, methods=["POST"])
    return Faulty(app, served)


class FailingAtTheEnd(MessageEvents):
    """The Messages API's writer, with a bug at the end of the answer."""

    def end(self, result: ChatResult) -> bytes:
        raise RuntimeError("a bug, holding sk-secret-value")


async def nothing() -> None:
    return None


async def test_a_fault_after_a_job_is_named_is_an_anthropic_error_the_sdk_does_not_retry(
    faulty: Faulty,
) -> None:
    # Given the SDK, with its default retries, reaching the app as it answers (its
    # exceptions too: a plain ASGI server answers them 500)
    transport = httpx2.ASGITransport(faulty.app, raise_app_exceptions=False)
    async with (
        httpx2.AsyncClient(transport=transport, base_url="http://door") as http,
        anthropic.AsyncAnthropic(
            base_url="http://door", api_key="k", http_client=http, max_retries=2
        ) as claude,
    ):
        # When a request meets a fault of the front door's own
        with pytest.raises(anthropic.InternalServerError) as failed:
            await claude.post("/v1/messages/fault", body={}, cast_to=httpx2.Response)

    # Expect Anthropic's error shape, naming the job, nothing of the fault, not retried
    assert faulty.served == ["/v1/messages/fault"]
    error = failed.value
    assert error.type == "api_error"
    assert error.response.headers["x-should-retry"] == "false"
    assert error.response.headers["x-queuegate-job-id"] == "job-7"
    assert error.api_message is not None
    assert error.api_message.startswith("internal_error: ")
    assert "GET /v1/jobs/job-7" in error.api_message and "secret" not in error.api_message


async def test_a_fault_after_a_job_is_named_is_an_openai_error_the_sdk_does_not_retry(
    faulty: Faulty,
) -> None:
    transport = httpx.ASGITransport(faulty.app, raise_app_exceptions=False)
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://door") as http,
        openai.AsyncOpenAI(
            base_url="http://door/v1", api_key="k", http_client=http, max_retries=2
        ) as gpt,
    ):
        with pytest.raises(openai.InternalServerError) as failed:
            await gpt.post("/chat/fault", body={}, cast_to=httpx.Response)

    assert faulty.served == ["/v1/chat/fault"]
    error = failed.value
    assert error.code == "internal_error" and error.type == "server_error"
    assert error.response.headers["x-should-retry"] == "false"
    assert error.response.headers["x-queuegate-job-id"] == "job-7"
    assert "secret" not in error.message


async def test_a_fault_mid_stream_ends_it_with_an_error_event(faulty: Faulty) -> None:
    # Given the SDK reaching the app as it answers
    transport = httpx2.ASGITransport(faulty.app, raise_app_exceptions=False)
    received: list[str] = []
    async with (
        httpx2.AsyncClient(transport=transport, base_url="http://door") as http,
        anthropic.AsyncAnthropic(
            base_url="http://door", api_key="k", http_client=http, max_retries=2
        ) as claude,
    ):
        # When a stream meets a fault of the front door's own after its first text
        with pytest.raises(anthropic.APIStatusError) as failed:
            stream = await claude.post(
                "/v1/messages/stream-fault",
                body={},
                cast_to=Message,
                stream=True,
                stream_cls=anthropic.AsyncStream[RawMessageStreamEvent],
            )
            async for event in stream:
                received.append(event.type)

    # Expect the text that came, then Anthropic's error event naming the job, nothing of the
    # fault: not a dropped connection, which the SDK would take for a network error
    assert faulty.served == ["/v1/messages/stream-fault"]
    assert received[0] == "message_start" and "content_block_delta" in received
    body = failed.value.body
    assert isinstance(body, dict) and body["error"]["type"] == "api_error"
    message = body["error"]["message"]
    assert message.startswith("internal_error: ") and "GET /v1/jobs/job-7" in message
    assert "secret" not in message
