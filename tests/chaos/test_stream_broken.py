"""Chaos: a streamed job whose worker is SIGKILLed mid-stream is called again by another, and
its reader's stream ends broken after the first call's chunks, never joined to the second
call's (an answer no model gave), nor ended as if whole: through the client of a team added
the default way, and through the front door to the OpenAI SDK of an API-key team."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import openai
import pytest

from admin.teams import add
from mockprovider import Behavior, MockConfig, MockProvider
from producer import GatewayClient
from queuegate.errors import StreamBroken
from queuegate.management import BrokerAdmin
from queuegate.messages import StreamChunk
from queuegate.settings import Settings
from tests.chaos.harness import declare_teams, start_worker, stop_workers, worker_env
from tests.frontdoor_support import HELLO, open_door
from tests.support import consumers

SLOW_STREAM = MockConfig(default=Behavior(chunk_gap_ms=250))
"""A stream long enough to kill its worker in: an event every 250 ms."""
TAKER = {"QUEUEGATE_CLAIM_LEASE": "1", "QUEUEGATE_TEAMS_REFRESH": "0.5"}
"""Workers that take a dead one's job once its claim's lease (1 s) has lapsed."""


class Workers:
    """Team alpha's worker process, replaced when killed (``kill_and_replace``)."""

    def __init__(self, env: dict[str, str]) -> None:
        self._env = env
        self.processes: list[asyncio.subprocess.Process] = []

    async def start(self) -> None:
        self.processes.append(await start_worker(self._env, ("alpha",)))

    async def kill_and_replace(self) -> None:
        """SIGKILL the one serving, and start another in its place."""
        serving = self.processes[-1]
        serving.send_signal(signal.SIGKILL)
        await serving.wait()
        await self.start()


@asynccontextmanager
async def killed_mid_stream(settings: Settings, mock: MockProvider) -> AsyncIterator[Workers]:
    """A worker of team alpha's, whose lease of a job lapses 1 s after its death, serving
    while the body runs (and the ones that replace it)."""
    workers = Workers(worker_env(settings, mock, **TAKER))
    try:
        await workers.start()
        await consumers(settings, ["alpha"], 1)
        yield workers
    finally:
        await stop_workers(workers.processes)


async def test_a_clients_stream_whose_worker_dies_mid_stream_breaks_and_the_answer_is_read_whole(
    settings: Settings,
) -> None:
    # Given team alpha added the default way (its own broker user), a provider streaming an
    # event every 250 ms, and a worker whose lease of a job lapses 1 s after its death
    credentials = await add(settings, "alpha")
    await declare_teams(settings, ("alpha",))
    assert credentials.amqp_url is not None
    team_settings = settings.model_copy(update={"amqp_url": credentials.amqp_url})
    try:
        async with (
            MockProvider(SLOW_STREAM) as mock,
            killed_mid_stream(settings, mock) as workers,
            GatewayClient(team_settings, team="alpha") as client,
        ):
            stream = client.stream("gpt-4o-mini", HELLO, max_tokens=16, timeout=30)
            read: list[StreamChunk] = []
            # When its worker is killed once two of its chunks were read, and another takes
            # the job and calls it again
            with pytest.raises(StreamBroken, match="read its answer whole"):
                async for chunk in stream:
                    read.append(chunk)
                    if len(read) == 2:
                        await workers.kill_and_replace()
            answer = await client.wait(stream.job_id, timeout=30)
    finally:
        async with BrokerAdmin.of(settings) as admin:
            if credentials.user:
                await admin.delete_user(credentials.user)

    # Expect the stream broken after the first call's chunks (all of one stream), and the
    # job's answer, the second call's, read whole
    assert len(read) >= 2 and len({c.stream for c in read}) == 1
    assert answer.status == "ok" and answer.content
    assert answer.gateway.stream is not None and answer.gateway.stream != read[0].stream
    assert mock.stats.calls == 2


async def test_a_front_door_stream_whose_worker_dies_mid_stream_ends_in_an_error_event(
    settings: Settings,
) -> None:
    # Given the front door, an API-key team, a provider streaming an event every 250 ms, and
    # a worker whose lease of a job lapses 1 s after its death
    async with open_door(settings, mock_config=SLOW_STREAM) as door:
        await door.gateway.stop_worker()
        async with (
            killed_mid_stream(settings, door.gateway.mock) as workers,
            door.client(timeout=60) as sdk,
        ):
            text: list[str] = []
            # When its worker is killed once two chunks came, and another calls the job again
            with pytest.raises(openai.APIError, match="read its answer whole") as broke:
                stream = await sdk.chat.completions.create(
                    model="gpt-4o-mini", messages=HELLO, max_tokens=16, stream=True
                )
                async for event in stream:
                    text += [c.delta.content or "" for c in event.choices]
                    if len(text) == 2:
                        await workers.kill_and_replace()

    # Expect the stream ended with an error event, as a provider failing mid-stream ends it,
    # never finished with the second call's chunks joined to the first's
    assert "provider_error" in str(broke.value.body) or broke.value.code == "provider_error"
    assert door.gateway.mock.stats.calls == 2
