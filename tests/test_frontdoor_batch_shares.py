"""What one team's batches over HTTP may take from the others: the front door's batch runners
and the file storage every team's accounting shares. The official SDKs against a real
front door, gateway and mock provider."""

from __future__ import annotations

import asyncio

import anthropic
import openai
import pytest
from openai.types import Batch

from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from tests.frontdoor_support import Door, open_door
from tests.test_frontdoor_batches import (
    ENDED,
    jsonl,
    message_requests,
    openai_lines,
    polled,
    upload,
)

SLOW = TeamConfig(rpm=1)
"""A team whose every batch is slow: one request a minute, the first at once."""
GRACE = 0.2
"""Seconds the gateway gives jobs in progress at its stop: the slow team's are waiting for
its rate, which no grace would see come (the default held each test's end 5 s)."""


async def _batch(client: openai.AsyncOpenAI, lines: int) -> str:
    file_id = await upload(client, openai_lines(lines))
    batch = await client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    return batch.id


async def _statuses(client: openai.AsyncOpenAI, batch_ids: list[str]) -> list[str]:
    return [(await client.batches.retrieve(b)).status for b in batch_ids]


async def _ended(client: openai.AsyncOpenAI, batch_id: str, timeout: float) -> Batch:
    return await polled(
        lambda: client.batches.retrieve(batch_id), lambda b: b.status in ENDED, timeout=timeout
    )


async def _faults(door: Door) -> list[int]:
    rows = await door.gateway.pool.fetch("SELECT faults FROM api_batches")
    return [row["faults"] for row in rows]


async def test_a_team_holding_every_runner_gives_one_to_another_teams_batch_at_once(
    settings: Settings,
) -> None:
    # Given two runners, both held by a slow team's batches, a third of them waiting
    settings = settings.model_copy(update={"batch_runners": 2, "shutdown_grace": GRACE})
    teams = {"alpha": SLOW, "beta": TeamConfig()}
    async with (
        open_door(settings, teams) as door,
        door.client("alpha") as slow,
        door.client("beta") as other,
    ):
        hogs = [await _batch(slow, 2) for _ in range(3)]
        await polled(
            lambda: _statuses(slow, hogs), lambda s: s.count("in_progress") == 2, timeout=30
        )

        # When another team creates a batch of one line
        batch_id = await _batch(other, 1)

        # Expect it to start and end in seconds, not after a slow batch ends (minutes)
        ended = await _ended(other, batch_id, timeout=20)
        slowed = await _statuses(slow, hogs)
        faults = await _faults(door)
    assert ended.status == "completed"
    assert ended.request_counts is not None and ended.request_counts.completed == 1
    # and the slow team's batches, none ended yet, kept without a fault counted
    assert not set(slowed) & set(ENDED), slowed
    assert faults == [0, 0, 0, 0]


async def test_teams_holding_as_many_runners_take_turns(settings: Settings) -> None:
    # Given one runner, held by a slow team's batch that collects for minutes
    settings = settings.model_copy(
        update={"batch_runners": 1, "batch_runner_turn": 1.0, "shutdown_grace": GRACE}
    )
    teams = {"alpha": SLOW, "beta": TeamConfig()}
    async with (
        open_door(settings, teams) as door,
        door.client("alpha") as slow,
        door.client("beta") as other,
    ):
        hog = await _batch(slow, 3)
        await polled(lambda: _statuses(slow, [hog]), lambda s: s == ["in_progress"], timeout=30)

        # When another team creates a batch
        batch_id = await _batch(other, 2)

        # Expect it to take the runner within about a turn and end
        ended = await _ended(other, batch_id, timeout=20)
        # and the slow batch to have it back, still running
        await polled(
            lambda: door.gateway.pool.fetchval(
                "SELECT runner IS NOT NULL FROM api_batches WHERE id = $1", hog
            ),
            bool,
            timeout=10,
        )
        slowed = await _statuses(slow, [hog])
        faults = await _faults(door)
    assert ended.status == "completed"
    assert slowed == ["in_progress"]
    assert faults == [0, 0]


async def test_a_team_whose_batch_outputs_took_it_over_its_quota_starts_no_more_batches(
    settings: Settings,
) -> None:
    one = jsonl(openai_lines(5))
    # Given a team whose quota holds its input file and one byte more
    teams = {"alpha": TeamConfig(file_storage_bytes=len(one) + 1)}
    async with open_door(settings, teams) as door, door.client("alpha") as alpha:
        file_id = (await alpha.files.create(file=("in.jsonl", one), purpose="batch")).id
        first = await alpha.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        # whose batch's output, always written, took its stored files past the quota
        ended = await polled(lambda: alpha.batches.retrieve(first.id), lambda b: b.status in ENDED)
        assert ended.status == "completed" and ended.output_file_id is not None
        stored = [f.bytes async for f in alpha.files.list()]
        assert sum(stored) > len(one) + 1

        # When it creates another batch over the same input, and a Message Batch
        with pytest.raises(openai.BadRequestError) as refused:
            await alpha.batches.create(
                input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
            )
        async with anthropic.AsyncAnthropic(
            base_url=door.url, api_key=door.keys["alpha"], max_retries=0
        ) as claude:
            with pytest.raises(anthropic.BadRequestError, match="storage_quota_exceeded"):
                await claude.messages.batches.create(requests=message_requests(2))  # type: ignore[arg-type]

        # Expect both refused 400 storage_quota_exceeded, saying what to do, no batch kept
        error = refused.value.body
        assert isinstance(error, dict)
        assert error["code"] == "storage_quota_exceeded"
        assert "delete files" in error["message"] and "\n" not in error["message"]
        assert [b.id async for b in alpha.batches.list()] == [first.id]
        # and once its output is deleted, a batch starts again
        await alpha.files.delete(ended.output_file_id)
        await alpha.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        )


async def test_a_team_stores_files_up_to_its_quota_and_others_are_not_held_by_it(
    settings: Settings,
) -> None:
    one = jsonl(openai_lines(20))
    # Given teams whose stored files may total two such files, and one allowed five
    settings = settings.model_copy(update={"team_file_storage_bytes": 2 * len(one) + 10})
    teams = {
        "alpha": TeamConfig(),
        "beta": TeamConfig(),
        "gamma": TeamConfig(file_storage_bytes=5 * len(one)),
    }
    async with (
        open_door(settings, teams) as door,
        door.client("alpha") as alpha,
        door.client("beta") as beta,
        door.client("gamma") as gamma,
    ):
        kept = [(await alpha.files.create(file=("a.jsonl", one), purpose="batch")).id]
        kept.append((await alpha.files.create(file=("b.jsonl", one), purpose="batch")).id)

        # When the team uploads one more
        with pytest.raises(openai.BadRequestError) as refused:
            await alpha.files.create(file=("c.jsonl", one), purpose="batch")

        # Expect it refused 400 in OpenAI's shape, saying what to do, and nothing kept
        error = refused.value.body
        assert isinstance(error, dict)
        assert error["code"] == "storage_quota_exceeded"
        assert error["type"] == "invalid_request_error"
        assert "quota" in error["message"] and "delete files" in error["message"]
        assert "\n" not in error["message"]
        assert sorted([f.id async for f in alpha.files.list()]) == sorted(kept)
        # a Message Batch, stored as a file too, refused as Anthropic answers it
        async with anthropic.AsyncAnthropic(
            base_url=door.url, api_key=door.keys["alpha"], max_retries=0
        ) as claude:
            with pytest.raises(anthropic.BadRequestError, match="storage_quota_exceeded"):
                await claude.messages.batches.create(requests=message_requests(2))  # type: ignore[arg-type]
        # another team stores its own files, under the default and under its own quota,
        # where of two uploads at once with room for one, one is stored
        await beta.files.create(file=("a.jsonl", one), purpose="batch")
        both = await asyncio.gather(
            *(beta.files.create(file=(f"{n}.jsonl", one), purpose="batch") for n in "bc"),
            return_exceptions=True,
        )
        assert sorted(type(r).__name__ for r in both) == ["BadRequestError", "FileObject"]
        assert len([f async for f in beta.files.list()]) == 2
        for name in "abcd":
            await gamma.files.create(file=(f"{name}.jsonl", one), purpose="batch")
        # and a file deleted makes room again
        await alpha.files.delete(kept[0])
        await alpha.files.create(file=("c.jsonl", one), purpose="batch")
