"""A streamed answer under an SDK's timeout: the read timeout the SDKs announce
(``x-stainless-read-timeout``) bounds the wait for each chunk, not the whole stream, as it
does with the provider itself; ``x-queuegate-timeout`` still bounds the whole."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import anthropic
import openai
import pytest

from mockprovider import Behavior, MockConfig
from queuegate.settings import Settings
from tests.frontdoor_support import Door, open_door

GAP = 0.25
"""Seconds between the provider's events: well inside the callers' read timeout."""
TIMEOUT = 1.5
"""The SDK clients' timeout: a few of the provider's gaps (an Anthropic answer's first text
comes after three), less than its whole stream."""
LONG = [{"role": "user", "content": " ".join(f"w{i}" for i in range(18))}]
"""A prompt the mock answers in 10 events or more, GAP apart: longer than TIMEOUT."""
STALL = 3.0
"""Seconds a stalling provider stops for, after its first few chunks: past the callers'
timeout."""

TAIL_GAP = 0.7
"""Seconds between the events of a slower provider: half the callers' read timeout, though
its finish reason, usage and end after the last text span more than that timeout."""

DRIPPING = MockConfig(
    models={
        "gpt-4o-mini": Behavior(chunk_gap_ms=GAP * 1000),
        "llama-3.1-8b": Behavior(chunk_gap_ms=TAIL_GAP * 1000),
        "claude-3-5-haiku-latest": Behavior(chunk_gap_ms=GAP * 1000),
        "flaky-gpt": Behavior(stream_stall_after=3, hang_s=STALL),
    }
)


@pytest.fixture
async def door(settings: Settings) -> AsyncIterator[Door]:
    async with open_door(settings, mock_config=DRIPPING) as opened:
        yield opened


async def test_a_stream_longer_than_the_sdks_read_timeout_is_served_whole(door: Door) -> None:
    # Given each SDK with a 1.5 s timeout, and a provider sending a chunk every quarter second,
    # which makes a stream of a few seconds: as the SDK, straight to the provider, reads it
    async with (
        door.client(timeout=TIMEOUT) as client,
        anthropic.AsyncAnthropic(
            base_url=door.url, api_key=door.keys["alpha"], timeout=TIMEOUT, max_retries=0
        ) as claude,
    ):
        # When each streams an answer
        started = time.monotonic()
        chunks = await client.chat.completions.create(
            model="gpt-4o-mini", messages=LONG, stream=True
        )
        ends = [c.choices[0].finish_reason async for c in chunks if c.choices]
        openai_took = time.monotonic() - started
        started = time.monotonic()
        async with claude.messages.stream(
            model="claude-haiku", max_tokens=200, messages=LONG
        ) as stream:
            message = await stream.get_final_message()
        claude_took = time.monotonic() - started

    # Expect both whole, though each took longer than the timeout: each chunk came within it
    assert ends[-1] == "stop" and message.stop_reason == "end_turn"
    assert len(ends) > 4 and message.content
    assert openai_took > TIMEOUT and claude_took > TIMEOUT
    # One provider call each, accounted once, answered
    rows = await door.gateway.usage_rows(2)
    assert [row["status"] for row in rows] == ["ok", "ok"]
    assert door.gateway.mock.stats.calls == 2


async def test_a_stream_whose_ending_events_outlast_the_read_timeout_is_served_whole(
    door: Door,
) -> None:
    # Given a provider sending an event every 0.7 s, its finish reason, usage and end after
    # the last text, so that more than the callers' 1.5 s pass from that text to the end
    hi = [{"role": "user", "content": "hi"}]
    async with (
        door.client(timeout=TIMEOUT) as client,
        anthropic.AsyncAnthropic(
            base_url=door.url, api_key=door.keys["alpha"], timeout=TIMEOUT, max_retries=0
        ) as claude,
        door.gateway.client("alpha") as gateway,
    ):
        # When each official SDK streams an answer, and the gateway's own client
        chunks = await client.chat.completions.create(model="local-llama", messages=hi, stream=True)
        ends = [c.choices[0].finish_reason async for c in chunks if c.choices]
        async with claude.messages.stream(
            model="local-llama", max_tokens=50, messages=hi
        ) as stream:
            message = await stream.get_final_message()
        queued = gateway.stream("local-llama", hi, timeout=TIMEOUT)
        relayed = [chunk async for chunk in queued]

    # Expect each served whole: every event came within the wait of the one before
    assert ends[-1] == "stop" and message.stop_reason == "end_turn" and message.content
    assert queued.result is not None and queued.result.status == "ok" and relayed
    rows = await door.gateway.usage_rows(3)
    assert [row["status"] for row in rows] == ["ok", "ok", "ok"]


async def test_a_stream_stalling_past_the_read_timeout_ends_in_the_gateways_error(
    door: Door,
) -> None:
    # Given an SDK with a 1.5 s timeout, and a provider that stalls 3 s after its first chunks
    async with door.client(timeout=TIMEOUT) as client:
        started = time.monotonic()
        chunks = await client.chat.completions.create(model="flaky-gpt", messages=LONG, stream=True)
        # When it reads the stream
        with pytest.raises(openai.APIError) as broken:
            async for _ in chunks:
                pass
        took = time.monotonic() - started

    # Expect the gateway's error, read before the SDK's own read timeout fires (which it
    # would report as APITimeoutError), well before the provider's next chunk
    assert not isinstance(broken.value, openai.APITimeoutError)
    assert took < STALL
    # The call cut and accounted once, as an error
    rows = await door.gateway.usage_rows(1)
    assert [row["status"] for row in rows] == ["error"]
    assert door.gateway.mock.stats.calls == 1


async def test_x_queuegate_timeout_still_bounds_the_whole_stream(door: Door) -> None:
    # Given an SDK with a long timeout of its own, whose caller bounds the request to 1 s
    async with door.client(timeout=30) as client:
        started = time.monotonic()
        chunks = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=LONG,
            stream=True,
            extra_headers={"x-queuegate-timeout": "1"},
        )
        # When its stream goes on past that, a chunk every quarter second
        with pytest.raises(openai.APIError):
            async for _ in chunks:
                pass
        took = time.monotonic() - started

    # Expect it cut at the caller's bound, not served whole
    assert took < 1 + 2 * GAP
    rows = await door.gateway.usage_rows(1)
    assert [row["status"] for row in rows] == ["error"]
