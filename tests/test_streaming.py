"""Streaming: the providers' server-sent events, relayed in order, with usage, end to end."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from mockprovider import Behavior, MockConfig, MockProvider
from queuegate.errors import StreamInterrupted
from queuegate.messages import ChatJob
from queuegate.settings import Settings
from router import Catalog, load_catalog, open_router
from router.providers import Delta, Piece
from tests.support import running_gateway

ENV = {"QUEUEGATE_MOCK_KEY": "sk-test"}
LONG = "Tell me a story about a lighthouse keeper and the sea, in many words please"
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}


def chat(model: str, text: str = LONG, **fields: Any) -> ChatJob:
    return ChatJob.model_validate(
        {
            "job_id": f"job-{time.monotonic_ns()}",
            "team": "alpha",
            "model": model,
            "messages": [{"role": "user", "content": text}],
            "stream": True,
            **fields,
        }
    )


class Sink:
    """Collects the deltas the router relays."""

    def __init__(self) -> None:
        self.deltas: list[Delta] = []
        self.models: set[str] = set()

    async def __call__(self, piece: Piece, model: str) -> None:
        self.deltas.append(piece.delta)
        self.models.add(model)

    @property
    def text(self) -> str:
        return "".join(d.get("content") or "" for d in self.deltas)


@pytest.fixture
async def mock() -> AsyncIterator[MockProvider]:
    async with MockProvider() as provider:
        yield provider


@pytest.fixture
def catalog(mock: MockProvider) -> Catalog:
    return load_catalog(None, {"QUEUEGATE_MOCK_URL": mock.url})


@pytest.mark.parametrize("alias", ["gpt-4o-mini", "claude-haiku"])
async def test_each_provider_streams_the_whole_answer_in_order_with_usage(
    settings: Settings, mock: MockProvider, catalog: Catalog, alias: str
) -> None:
    sink = Sink()

    async with open_router(catalog, ENV, settings) as router:
        streamed = await router.complete(chat(alias), on_delta=sink)
        whole = await router.complete(chat(alias, stream=False))

    assert len(sink.deltas) > 3
    assert sink.text == whole.response["choices"][0]["message"]["content"]
    [streamed_choice], [whole_choice] = streamed.response["choices"], whole.response["choices"]
    assert streamed_choice["message"] == whole_choice["message"]
    assert streamed_choice["finish_reason"] == whole_choice["finish_reason"] == "stop"
    # every delta names the model the provider said answered, as the whole answer does
    assert sink.models == {streamed.response["model"]} == {whole.response["model"]}
    assert (streamed.input_tokens, streamed.output_tokens) == (
        whole.input_tokens,
        whole.output_tokens,
    )
    assert streamed.input_tokens > 0 and streamed.output_tokens > 0
    [call, _] = mock.requests
    assert call.stream
    if alias == "gpt-4o-mini":
        assert call.body is not None and call.body["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("alias", ["gpt-4o-mini", "claude-haiku"])
async def test_streamed_tool_calls_arrive_as_openai_tool_call_deltas(
    settings: Settings, catalog: Catalog, alias: str
) -> None:
    sink = Sink()

    async with open_router(catalog, ENV, settings) as router:
        routed = await router.complete(chat(alias, params={"tools": [WEATHER]}), on_delta=sink)

    choice = routed.response["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    [call] = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {}
    # (an Anthropic stream's last delta carries only its closing events, for its own callers)
    parts = [part for delta in sink.deltas for part in delta.get("tool_calls") or []]
    assert parts[0]["function"]["name"] == "get_weather" and parts[0]["id"]
    assert "".join(p["function"].get("arguments") or "" for p in parts) == "{}"


async def test_a_failure_before_the_first_chunk_falls_back(
    settings: Settings, mock: MockProvider, catalog: Catalog
) -> None:
    mock.configure(MockConfig(models={"flaky-gpt": Behavior(error_rate=1.0, error_status=503)}))
    sink = Sink()

    async with open_router(catalog, ENV, settings) as router:
        routed = await router.complete(chat("flaky-gpt"), on_delta=sink)

    assert routed.model_used == "claude-haiku"
    assert sink.text == routed.response["choices"][0]["message"]["content"]


async def test_a_failure_after_the_first_chunk_ends_the_stream_with_an_error(
    settings: Settings, mock: MockProvider, catalog: Catalog
) -> None:
    # Given flaky-gpt cutting its stream after the role chunk and one content chunk
    mock.configure(MockConfig(models={"flaky-gpt": Behavior(stream_cut_after=2)}))
    sink = Sink()

    async with open_router(catalog, ENV, settings) as router:
        with pytest.raises(StreamInterrupted) as caught:
            await router.complete(chat("flaky-gpt"), on_delta=sink)

    # Expect no fallback (the caller already has part of the answer), and a clear error
    assert caught.value.code == "provider_error"
    assert "the stream broke after it had started" in caught.value.message
    assert len(sink.deltas) == 1
    assert [(a.deployment, a.error) for a in caught.value.attempts] == [
        ("openai-flaky", "connection")
    ]
    assert mock.stats.calls == 1


@pytest.mark.parametrize("alias", ["gpt-4o-mini", "claude-haiku"])
async def test_a_streamed_job_reaches_the_client_in_order_and_its_usage_is_accounted(
    settings: Settings, alias: str
) -> None:
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        stream = client.stream(alias, [{"role": "user", "content": LONG}], timeout=10)
        chunks = [chunk async for chunk in stream]

        assert [chunk.seq for chunk in chunks] == list(range(len(chunks)))
        assert len(chunks) > 3
        result = stream.result
        assert result is not None and result.status == "ok"
        assert "".join(c.delta.get("content", "") for c in chunks) == result.content
        [row] = await gw.usage_rows(1)
        usage = result.response["usage"] if result.response else {}
        assert row["input_tokens"] == usage["prompt_tokens"] > 0
        assert row["output_tokens"] == usage["completion_tokens"] > 0
        assert row["cost_usd"] > 0
