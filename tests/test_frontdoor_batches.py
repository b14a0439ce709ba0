"""OpenAI's Files and Batches and Anthropic's Message Batches over HTTP, end to end: the
official SDKs against a real uvicorn server, whose batch runner drives each batch through a
real worker, accounting and the mock provider."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import aio_pika
import anthropic
import openai
import orjson
import pytest
import redis.asyncio as aioredis
from anthropic.types.messages import MessageBatch
from openai.types import Batch
from openai.types.chat import ChatCompletion

from frontdoor.batches import files, records
from frontdoor.serve import serving
from queuegate.db import create_pool
from queuegate.keys import Keys
from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from queuegate.tenancy import api_key_id
from queuegate.topology import Topology
from router import load_catalog
from tests.frontdoor_support import issue_key
from tests.support import Gateway, running_gateway
from tests.teams import register

ENDED = ("completed", "failed", "expired", "cancelled")
T = TypeVar("T")


def openai_lines(n: int, *, model: str = "gpt-4o-mini") -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"req-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": f"Question {i}"}]},
        }
        for i in range(n)
    ]


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)


def message_requests(n: int) -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"msg-{i}",
            "params": {
                "model": "claude-haiku",
                "max_tokens": 64,
                "messages": [{"role": "user", "content": f"Hello {i}"}],
            },
        }
        for i in range(n)
    ]


@dataclass
class Door:
    url: str
    keys: dict[str, str]

    def openai(self, team: str = "alpha") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=self.keys[team], max_retries=0)

    def anthropic(self, team: str = "alpha") -> anthropic.AsyncAnthropic:
        return anthropic.AsyncAnthropic(base_url=self.url, api_key=self.keys[team], max_retries=0)


@contextlib.asynccontextmanager
async def front_door(
    settings: Settings, gateway: Gateway, keys: dict[str, str]
) -> AsyncIterator[Door]:
    catalog = load_catalog(None, {"QUEUEGATE_MOCK_URL": gateway.mock.url})
    async with serving(settings, catalog) as url:
        yield Door(url, keys)


@pytest.fixture
async def keys(settings: Settings) -> dict[str, str]:
    """Teams alpha and beta, registered with their queues (as ``teams add`` leaves them, so
    their jobs wait there while no worker serves them), and an API key each."""
    topology = Topology(settings.namespace, settings.delivery_limit)
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        for team in ("alpha", "beta"):
            await register(settings, team, TeamConfig())
            await topology.declare_team_queue(channel, team)
    return {team: (await issue_key(settings, team))[1] for team in ("alpha", "beta")}


@pytest.fixture
async def gateway(settings: Settings, keys: dict[str, str]) -> AsyncIterator[Gateway]:
    async with running_gateway(settings, teams=("alpha", "beta")) as gw:
        yield gw


@pytest.fixture
async def door(settings: Settings, gateway: Gateway, keys: dict[str, str]) -> AsyncIterator[Door]:
    async with front_door(settings, gateway, keys) as d:
        yield d


async def polled(
    probe: Callable[[], Awaitable[T]], until: Callable[[T], bool], timeout: float = 60
) -> T:
    """Ask ``probe`` until ``until`` holds of its answer: nothing announces a batch's
    progress, so its client polls it, as an API client does."""
    async with asyncio.timeout(timeout):
        while True:
            answer = await probe()
            if until(answer):
                return answer
            await asyncio.sleep(0.05)


async def openai_ended(client: openai.AsyncOpenAI, batch_id: str) -> Batch:
    return await polled(lambda: client.batches.retrieve(batch_id), lambda b: b.status in ENDED)


async def anthropic_ended(client: anthropic.AsyncAnthropic, batch_id: str) -> MessageBatch:
    return await polled(
        lambda: client.messages.batches.retrieve(batch_id),
        lambda b: b.processing_status == "ended",
    )


async def upload(client: openai.AsyncOpenAI, lines: list[dict[str, Any]]) -> str:
    created = await client.files.create(file=("prompts.jsonl", jsonl(lines)), purpose="batch")
    return created.id


def parse_jsonl(raw: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in raw.splitlines() if line.strip()]


async def test_an_openai_batch_ends_with_output_and_error_files_each_line_billed_once(
    door: Door, gateway: Gateway
) -> None:
    # Given 30 lines uploaded as a batch file, two of them for a model nobody serves
    lines = openai_lines(28) + openai_lines(2, model="no-such-model")
    lines[-2]["custom_id"], lines[-1]["custom_id"] = "bad-0", "bad-1"
    async with door.openai() as client:
        file_id = await upload(client, lines)
        uploaded = await client.files.retrieve(file_id)
        assert uploaded.purpose == "batch" and uploaded.bytes == len(jsonl(lines))
        assert await (await client.files.content(file_id)).aread() == jsonl(lines)

        # When a batch is created from it, with metadata
        batch = await client.batches.create(
            input_file_id=file_id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"job": "nightly"},
        )
        assert batch.status == "validating" and batch.metadata == {"job": "nightly"}
        ended = await openai_ended(client, batch.id)
        listed = [b.id async for b in client.batches.list(limit=1)]
        output = parse_jsonl(await (await client.files.content(ended.output_file_id)).aread())
        errors = parse_jsonl(await (await client.files.content(ended.error_file_id)).aread())
        files = [f.id async for f in client.files.list()]

    # Expect it completed, counted, its files listed and in OpenAI's batch output format
    assert ended.status == "completed"
    assert ended.request_counts is not None
    assert (ended.request_counts.total, ended.request_counts.completed) == (30, 28)
    assert ended.request_counts.failed == 2
    assert ended.in_progress_at and ended.finalizing_at and ended.completed_at
    assert listed == [batch.id]
    assert set(files) == {file_id, ended.output_file_id, ended.error_file_id}
    assert sorted(line["custom_id"] for line in output) == sorted(f"req-{i}" for i in range(28))
    for line in output:
        assert line["id"].startswith("batch_req_") and line["error"] is None
        assert line["response"]["status_code"] == 200
        completion = ChatCompletion.model_validate(line["response"]["body"])
        assert completion.choices[0].message.content
    assert sorted(line["custom_id"] for line in errors) == ["bad-0", "bad-1"]
    for line in errors:
        assert line["response"]["status_code"] == 404
        assert line["response"]["body"]["error"]["code"] == "unknown_model"
    # and each line served once and billed once, as its own job
    rows = await gateway.usage_rows(30)
    assert len({row["job_id"] for row in rows}) == 30
    assert {row["job_id"].partition(":")[0].partition(".")[0] for row in rows} == {batch.id}
    assert all(row["identity"].startswith("frontdoor:") for row in rows)
    assert gateway.mock.stats.calls == 28
    assert sum(float(row["cost_usd"]) > 0 for row in rows) == 28


async def test_a_message_batch_ends_with_results_the_sdk_reads(
    door: Door, gateway: Gateway
) -> None:
    # Given 20 requests, one of whose params Anthropic would refuse (max_tokens 0)
    requests = message_requests(20)
    requests[7]["params"]["max_tokens"] = 0
    async with door.anthropic() as client:
        batch = await client.messages.batches.create(requests=requests)  # type: ignore[arg-type]
        assert batch.processing_status == "in_progress"
        assert batch.request_counts.processing == 20
        ended = await anthropic_ended(client, batch.id)
        results = [r async for r in await client.messages.batches.results(batch.id)]
        listed = [b.id async for b in client.messages.batches.list()]

    # Expect every request answered once: 19 succeeded, the invalid one errored
    assert ended.ended_at is not None and ended.results_url
    counts = ended.request_counts
    assert (counts.succeeded, counts.errored, counts.processing) == (19, 1, 0)
    assert sorted(r.custom_id for r in results) == sorted(f"msg-{i}" for i in range(20))
    by_id = {r.custom_id: r.result for r in results}
    assert by_id["msg-7"].type == "errored"
    assert by_id["msg-7"].error.error.type == "invalid_request_error"
    assert "max_tokens" in by_id["msg-7"].error.error.message
    first = by_id["msg-0"]
    assert first.type == "succeeded" and first.message.content[0].type == "text"
    assert listed == [batch.id]
    # the valid ones served and billed once; the refused one never published
    rows = await gateway.usage_rows(19)
    assert len({row["job_id"] for row in rows}) == 19
    assert gateway.mock.stats.calls == 19


async def test_another_team_finds_none_of_its_files_or_batches(door: Door) -> None:
    # Given alpha's batch file, OpenAI batch and Message Batch
    async with door.openai("alpha") as alpha, door.anthropic("alpha") as alpha_messages:
        file_id = await upload(alpha, openai_lines(2))
        batch = await alpha.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        message_batch = await alpha_messages.messages.batches.create(
            requests=message_requests(2)  # type: ignore[arg-type]
        )
        await openai_ended(alpha, batch.id)
        await anthropic_ended(alpha_messages, message_batch.id)

    # Expect beta, guessing the ids, to get 404 for each, and nothing of alpha's in its lists
    async with door.openai("beta") as beta, door.anthropic("beta") as beta_messages:
        for call in (
            beta.files.retrieve(file_id),
            beta.files.content(file_id),
            beta.files.delete(file_id),
            beta.batches.retrieve(batch.id),
            beta.batches.cancel(batch.id),
            beta.batches.create(
                input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
            ),
        ):
            with pytest.raises(openai.NotFoundError):
                await call
        for message_call in (
            beta_messages.messages.batches.retrieve(message_batch.id),
            beta_messages.messages.batches.cancel(message_batch.id),
            beta_messages.messages.batches.delete(message_batch.id),
        ):
            with pytest.raises(anthropic.NotFoundError):
                await message_call
        with pytest.raises(anthropic.NotFoundError):
            await beta_messages.messages.batches.results(message_batch.id)
        assert [f.id async for f in beta.files.list()] == []
        assert [b.id async for b in beta.batches.list()] == []
        assert [b.id async for b in beta_messages.messages.batches.list()] == []
    async with door.openai("alpha") as alpha:
        assert (await alpha.files.retrieve(file_id)).id == file_id


async def test_cancel_answers_what_was_not_served_canceled_without_a_provider_call(
    settings: Settings, keys: dict[str, str], redis_client: aioredis.Redis
) -> None:
    # Given a batch published while no worker serves its team (its jobs wait in the queue)
    async with (
        running_gateway(settings, teams=("gamma",)) as idle,
        front_door(settings, idle, keys) as door,
        door.openai() as client,
    ):
        file_id = await upload(client, openai_lines(10))
        batch = await client.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        keys_of = Keys(settings.redis_prefix)
        published = keys_of.batch_published("alpha", batch.id)
        await polled(lambda: redis_client.scard(published), lambda n: n == 10)
        # When it is canceled, the gateway told, and only then its team served
        cancelling = await client.batches.cancel(batch.id)
        assert cancelling.status == "cancelling" and cancelling.cancelling_at
        flag = keys_of.batch_canceled("alpha", batch.id)
        await polled(lambda: redis_client.exists(flag), bool)
        async with running_gateway(settings, teams=("alpha",)) as serving:
            ended = await openai_ended(client, batch.id)
            rows = await serving.usage_rows(10)
            calls = serving.mock.stats.calls
        errors = parse_jsonl(await (await client.files.content(ended.error_file_id)).aread())

    # Expect it cancelled, each request answered canceled and none called or paid
    assert ended.status == "cancelled" and ended.cancelled_at
    assert ended.output_file_id is None
    assert ended.request_counts is not None and ended.request_counts.failed == 10
    assert sorted(line["custom_id"] for line in errors) == sorted(f"req-{i}" for i in range(10))
    assert {line["error"]["code"] for line in errors} == {"batch_cancelled"}
    assert all(line["response"] is None for line in errors)
    assert {row["error_code"] for row in rows} == {"canceled"}
    assert calls == 0


async def test_a_message_batch_canceled_before_it_ran_lists_every_request_canceled(
    settings: Settings, gateway: Gateway, keys: dict[str, str]
) -> None:
    # Given a Message Batch recorded and canceled while no front-door process ran
    requests = b"".join(orjson.dumps(r) + b"\n" for r in message_requests(3))
    pool = await create_pool(settings)
    try:
        stored = await files.store_file(
            pool,
            team="alpha",
            purpose="message_batch_requests",
            filename="requests.json",
            chunks=_once(requests),
            max_bytes=len(requests),
        )
        batch_id = records.new_batch_id("anthropic")
        await records.create_batch(
            pool,
            batch_id=batch_id,
            team="alpha",
            api="anthropic",
            key_id=str(api_key_id(keys["alpha"])),
            input_file_id=stored.id,
            endpoint="/v1/messages",
            completion_window="24h",
            metadata=None,
            expires_at=datetime.now(UTC) + timedelta(hours=24),
            total=3,
        )
        canceled = await records.request_cancel(pool, "alpha", "anthropic", batch_id)
        assert canceled is not None and canceled.status == "cancelling"
    finally:
        await pool.close()
    # When a front door starts and its runner takes the batch up
    async with front_door(settings, gateway, keys) as door, door.anthropic() as client:
        ended = await anthropic_ended(client, batch_id)
        results = [r async for r in await client.messages.batches.results(batch_id)]
        deleted = await client.messages.batches.delete(batch_id)
        with pytest.raises(anthropic.NotFoundError):
            await client.messages.batches.retrieve(batch_id)

    # Expect each request canceled, nothing published or called
    assert ended.cancel_initiated_at is not None
    assert ended.request_counts.canceled == 3 and ended.request_counts.processing == 0
    assert sorted(r.custom_id for r in results) == ["msg-0", "msg-1", "msg-2"]
    assert {r.result.type for r in results} == {"canceled"}
    assert gateway.mock.stats.calls == 0
    assert deleted.type == "message_batch_deleted"


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def test_a_batch_outlives_the_front_door_process_that_took_it(
    settings: Settings, keys: dict[str, str]
) -> None:
    settings = settings.model_copy(update={"batch_runner_lease": 1.0})
    async with running_gateway(settings, teams=("gamma",)) as idle:
        # Given a batch published by one front-door process, its jobs still queued
        async with front_door(settings, idle, keys) as first, first.openai() as client:
            file_id = await upload(client, openai_lines(12))
            batch = await client.batches.create(
                input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            await polled(
                lambda: client.batches.retrieve(batch.id), lambda b: b.status == "in_progress"
            )
        # When that process is gone, leaving its hold as a crash would (a lease to lapse)
        pool = await create_pool(settings)
        try:
            await pool.execute(
                "UPDATE api_batches SET runner = 'crashed', "
                "lease_until = now() + interval '1 second' WHERE id = $1",
                batch.id,
            )
        finally:
            await pool.close()
        # and another one runs beside a worker serving the team
        async with running_gateway(settings, teams=("alpha",)) as serving:
            async with front_door(settings, serving, keys) as second, second.openai() as client:
                ended = await openai_ended(client, batch.id)
                output = parse_jsonl(
                    await (await client.files.content(ended.output_file_id)).aread()
                )
            rows = await serving.usage_rows(12)
            calls = serving.mock.stats.calls

    # Expect it completed once: every line written, called and billed exactly once
    assert ended.status == "completed"
    assert sorted(line["custom_id"] for line in output) == sorted(f"req-{i}" for i in range(12))
    assert len(rows) == 12 and len({row["job_id"] for row in rows}) == 12
    assert calls == 12


async def test_invalid_lines_fail_an_openai_batch_listing_them_and_publish_nothing(
    door: Door, gateway: Gateway
) -> None:
    lines = jsonl(openai_lines(3)).split(b"\n")
    lines[1] = b'{"custom_id": "broken", "method": "POST"'
    async with door.openai() as client:
        file_id = (
            await client.files.create(file=("bad.jsonl", b"\n".join(lines)), purpose="batch")
        ).id
        batch = await client.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        ended = await openai_ended(client, batch.id)
    assert ended.status == "failed" and ended.failed_at
    assert ended.errors is not None and ended.errors.data
    assert ended.errors.data[0].line == 2
    assert "not JSON" in (ended.errors.data[0].message or "")
    assert ended.output_file_id is None and ended.error_file_id is None
    assert gateway.mock.stats.calls == 0


async def test_uploads_are_bounded_and_batches_checked_before_anything_is_kept(
    settings: Settings, gateway: Gateway, keys: dict[str, str]
) -> None:
    bounded = settings.model_copy(update={"batch_file_max_bytes": 2048})
    async with front_door(bounded, gateway, keys) as door, door.openai() as client:
        # A file over the limit is refused 413, and nothing is kept
        with pytest.raises(openai.APIStatusError) as too_large:
            await client.files.create(file=("big.jsonl", jsonl(openai_lines(40))), purpose="batch")
        assert too_large.value.status_code == 413
        # another purpose is refused
        with pytest.raises(openai.BadRequestError):
            await client.files.create(file=("x.jsonl", b"{}\n"), purpose="fine-tune")
        assert [f.id async for f in client.files.list()] == []
        # a batch names a served endpoint and window, and an uploaded file
        file_id = await upload(client, openai_lines(1))
        with pytest.raises(openai.BadRequestError, match="/v1/chat/completions"):
            await client.batches.create(
                input_file_id=file_id, endpoint="/v1/embeddings", completion_window="24h"
            )
        with pytest.raises(openai.NotFoundError):
            await client.batches.create(
                input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h"
            )
        assert [b.id async for b in client.batches.list()] == []
    async with front_door(settings, gateway, keys) as door, door.anthropic() as client:
        with pytest.raises(anthropic.BadRequestError, match="used twice"):
            await client.messages.batches.create(
                requests=message_requests(2) + message_requests(1)  # type: ignore[arg-type]
            )
        assert [b.id async for b in client.messages.batches.list()] == []


async def test_lists_page_newest_first_with_the_sdks(door: Door) -> None:
    # Given three batches of each API (whose requests are all refused: nothing is called)
    async with door.openai() as client, door.anthropic() as claude:
        file_id = (await client.files.create(file=("bad.jsonl", b"{\n"), purpose="batch")).id
        created = [
            (
                await client.batches.create(
                    input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
                )
            ).id
            for _ in range(3)
        ]
        bad = message_requests(1)
        bad[0]["params"]["max_tokens"] = 0
        messages = [
            (await claude.messages.batches.create(requests=bad)).id  # type: ignore[arg-type]
            for _ in range(3)
        ]
        # When they are listed two at a time
        first = await client.batches.list(limit=2)
        every = [b.id async for b in client.batches.list(limit=2)]
        first_messages = await claude.messages.batches.list(limit=2)
        every_message = [b.id async for b in claude.messages.batches.list(limit=2)]
        back = await claude.messages.batches.list(limit=1, before_id=messages[0])

    # Expect pages of two, newest first, the SDKs following the cursors to the end
    assert [b.id for b in first.data] == created[:0:-1] and first.has_more
    assert every == created[::-1]
    assert [b.id for b in first_messages.data] == messages[:0:-1] and first_messages.has_more
    assert every_message == messages[::-1]
    assert [b.id for b in back.data] == [messages[1]] and back.has_more


async def test_a_batch_past_its_window_expires_its_requests_uncalled(
    settings: Settings, gateway: Gateway, keys: dict[str, str]
) -> None:
    # Given a batch whose 24 hours were over before any runner took it up
    async with front_door(settings, gateway, keys) as door, door.openai() as client:
        file_id = await upload(client, openai_lines(3))
    pool = await create_pool(settings)
    try:
        batch_id = records.new_batch_id("openai")
        await records.create_batch(
            pool,
            batch_id=batch_id,
            team="alpha",
            api="openai",
            key_id=str(api_key_id(keys["alpha"])),
            input_file_id=file_id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata=None,
            expires_at=datetime.now(UTC) - timedelta(seconds=1),
        )
    finally:
        await pool.close()
    # When a front door runs it
    async with front_door(settings, gateway, keys) as door, door.openai() as client:
        ended = await openai_ended(client, batch_id)
        errors = parse_jsonl(await (await client.files.content(ended.error_file_id)).aread())

    # Expect it expired, each request written batch_expired, none called
    assert ended.status == "expired" and ended.expired_at
    assert ended.output_file_id is None
    assert sorted(line["custom_id"] for line in errors) == ["req-0", "req-1", "req-2"]
    assert {line["error"]["code"] for line in errors} == {"batch_expired"}
    assert gateway.mock.stats.calls == 0
