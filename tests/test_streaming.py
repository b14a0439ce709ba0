"""Streaming: the providers' server-sent events, relayed in order, with usage, end to end."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from mockprovider import Behavior, MockConfig, MockProvider
from mockprovider.catalog import mock_deployment
from queuegate.errors import StreamInterrupted
from queuegate.messages import ChatJob, StreamChunk
from queuegate.settings import Settings
from router import Catalog, Routed, load_catalog, open_router
from router.providers import Delta, Piece
from tests.support import running_gateway
from workers.publisher import Publisher

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
        self.aliases: set[str] = set()

    async def __call__(self, piece: Piece, model: str, alias: str) -> None:
        self.deltas.append(piece.delta)
        self.models.add(model)
        self.aliases.add(alias)

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
    # each delta named the fallback serving it
    assert sink.aliases == {"claude-haiku"}


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


# --- the deployment's timeout, per read of a stream ------------------------------------------

TIMEOUT = 0.6
"""The deployment's timeout in these tests: a few of the provider's gaps."""
GAP = 0.2
"""Seconds between the provider's events: well inside TIMEOUT."""
STALL = 3.0
"""Seconds a stalling provider stops for: far past TIMEOUT."""


def slow_and_backup(url: str, primary: str = "slow-model") -> Catalog:
    """Alias ``slow`` (upstream ``primary``, a TIMEOUT deployment) falling back to ``backup``."""
    return Catalog.model_validate(
        {
            "models": {
                "slow": {
                    "fallbacks": ["backup"],
                    "deployments": [mock_deployment("slow-dep", primary, url, timeout=TIMEOUT)],
                },
                "backup": {"deployments": [mock_deployment("backup-dep", "backup-model", url)]},
            }
        }
    )


@dataclass
class Streamed:
    """How a job streamed from ``slow`` ended, what reached its caller, how long it took."""

    routed: Routed | None
    broken: StreamInterrupted | None
    sink: Sink
    took: float


async def stream_slow(
    settings: Settings, mock: MockProvider, behavior: Behavior, within: float | None = None
) -> Streamed:
    """Stream a job from alias ``slow`` (``slow_and_backup``), its provider behaving as
    ``behavior``, its deadline ``within`` seconds away (None: none)."""
    mock.configure(MockConfig(models={"slow-model": behavior}))
    sink = Sink()
    async with open_router(slow_and_backup(mock.url), ENV, settings) as router:
        started = time.monotonic()
        deadline = None if within is None else started + within
        try:
            routed = await router.complete(chat("slow"), deadline=deadline, on_delta=sink)
        except StreamInterrupted as broken:
            return Streamed(None, broken, sink, time.monotonic() - started)
        return Streamed(routed, None, sink, time.monotonic() - started)


async def test_a_stream_longer_than_its_deployments_timeout_runs_while_its_chunks_come(
    settings: Settings, mock: MockProvider
) -> None:
    # Given a deployment with a 0.6 s timeout whose provider sends an event every 0.2 s, a
    # stream of about 2 s; when a job streams from it
    streamed = await stream_slow(settings, mock, Behavior(chunk_gap_ms=GAP * 1000))

    # Expect it served whole by that deployment in one call, though it took longer than the
    # timeout: the timeout bounds each wait for more, as a provider SDK's read timeout does
    routed = streamed.routed
    assert routed is not None, streamed.broken
    assert streamed.took > 2 * TIMEOUT
    assert [(a.deployment, a.error) for a in routed.attempts] == [("slow-dep", None)]
    assert routed.response["choices"][0]["finish_reason"] == "stop"
    assert streamed.sink.text == routed.response["choices"][0]["message"]["content"]
    assert mock.stats.calls == 1


async def test_a_stream_stalling_past_its_deployments_timeout_ends_with_an_error(
    settings: Settings, mock: MockProvider
) -> None:
    # Given a deployment with a 0.6 s timeout whose provider stalls 3 s after 3 events; when
    # a job streams from it
    stalling = Behavior(chunk_gap_ms=GAP * 1000, stream_stall_after=3, hang_s=STALL)
    streamed = await stream_slow(settings, mock, stalling)

    # Expect the stream cut a timeout after its last event, long before the provider goes
    # on, and no fallback (the caller has part of the answer): a provider_error, its call a
    # timeout, billed for what came
    error = streamed.broken
    assert error is not None
    assert streamed.took < STALL
    assert streamed.sink.deltas
    assert error.code == "provider_error"
    assert "the stream broke after it had started" in error.message
    assert f"nothing more within {TIMEOUT:.3g}s" in error.message
    assert [(a.deployment, a.error) for a in error.attempts] == [("slow-dep", "timeout")]
    assert error.billed is not None and error.billed.output_tokens > 0
    assert mock.stats.calls == 1


async def test_a_stream_whose_first_chunk_is_later_than_its_deployments_timeout_falls_back(
    settings: Settings, mock: MockProvider
) -> None:
    # Given a deployment with a 0.6 s timeout whose provider starts answering after 3 s;
    # when a job streams from it
    streamed = await stream_slow(settings, mock, Behavior(latency_ms=STALL * 1000))

    # Expect it retried, then the fallback to serve it, each call cut at the timeout: nothing
    # had reached the caller
    routed = streamed.routed
    assert routed is not None, streamed.broken
    assert streamed.took < STALL
    assert [(a.deployment, a.error) for a in routed.attempts] == [
        ("slow-dep", "timeout"),
        ("slow-dep", "timeout"),
        ("backup-dep", None),
    ]
    assert streamed.sink.text == routed.response["choices"][0]["message"]["content"]


async def test_the_jobs_deadline_still_bounds_a_whole_stream(
    settings: Settings, mock: MockProvider
) -> None:
    # Given a provider sending an event every 0.2 s, well within its deployment's timeout;
    # when a job whose deadline is 0.5 s away streams from it
    streamed = await stream_slow(settings, mock, Behavior(chunk_gap_ms=GAP * 1000), within=0.5)

    # Expect it cut at the deadline, though its chunks kept coming
    error = streamed.broken
    assert error is not None
    assert 0.5 <= streamed.took < 0.5 + 2 * GAP
    assert streamed.sink.deltas
    assert "the job's deadline passed" in error.message
    assert [a.error for a in error.attempts] == ["timeout"]


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


@pytest.mark.parametrize("alias", ["gpt-4o-mini", "claude-haiku"])
async def test_a_stream_publishes_a_piece_per_event_but_the_last_which_its_result_follows(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, alias: str
) -> None:
    # Given a worker whose stream pieces are counted as it publishes them
    published: list[StreamChunk] = []
    publish = Publisher.chunk

    async def counted(
        self: Publisher, team: str, reply_to: str, chunk: StreamChunk, *, held: Callable[[], bool]
    ) -> bool:
        published.append(chunk)
        return await publish(self, team, reply_to, chunk, held=held)

    monkeypatch.setattr(Publisher, "chunk", counted)
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        # When a client streams an answer of N text deltas
        stream = client.stream(alias, [{"role": "user", "content": LONG}], timeout=10)
        chunks = [chunk async for chunk in stream]

    # Expect N + 2 pieces: one per text delta, one per later event with nothing to show
    # (OpenAI's finish reason and usage; Anthropic's block stop and message_delta, which
    # carries the last events), none for the event that ends the stream ([DONE],
    # message_stop): the result, published right after it, ends the stream
    texts = [chunk for chunk in published if chunk.delta.get("content")]
    assert len(texts) > 3
    assert len(published) == len(texts) + 2
    assert [chunk.seq for chunk in chunks] == [chunk.seq for chunk in published]
    result = stream.result
    assert result is not None and result.status == "ok"
    assert "".join(chunk.delta["content"] for chunk in texts) == result.content
