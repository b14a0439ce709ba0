"""OpenAI's Files and Batches and Anthropic's Message Batches over HTTP, end to end: the
official SDKs against a real uvicorn server, whose batch runner drives each batch through a
real worker, accounting and the mock provider."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aio_pika
import anthropic
import asyncpg
import httpx
import openai
import orjson
import pytest
import redis.asyncio as aioredis
from anthropic.types.messages import MessageBatch
from openai.types import Batch
from openai.types.chat import ChatCompletion

from admin.keys import revoke_team_key
from admin.teams import configure, quota_policy
from frontdoor.batches import files, records, runner
from frontdoor.serve import serving
from mockprovider import Behavior, MockConfig
from producer import GatewayClient
from producer.batch import batch_list, batch_status, collect, delete_batch
from producer.batch.state import BatchState
from queuegate.db import create_pool
from queuegate.errors import ControlRefused
from queuegate.keys import Keys
from queuegate.management import BrokerAdmin
from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from queuegate.tenancy import api_key_id
from queuegate.topology import Topology
from router import load_catalog
from tests.frontdoor_support import issue_key
from tests.support import Gateway, running_gateway
from tests.teams import quota_in_force, register

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

    def reading(self, key: str) -> Door:
        """The same door, called with another key of the team."""
        return Door(self.url, {**self.keys, "alpha": key})

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
    topology = Topology(settings.namespace)
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


async def chat_batch(client: openai.AsyncOpenAI, file_id: str) -> Batch:
    """The batch of ``file_id``'s chat completions, due within 24 h, as created."""
    return await client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )


def parse_jsonl(raw: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in raw.splitlines() if line.strip()]


async def openai_ended_files(
    client: openai.AsyncOpenAI, batch_id: str
) -> tuple[Batch, list[dict[str, Any]], list[dict[str, Any]]]:
    """An OpenAI batch once it ended with both files, and their lines: output, errors."""
    ended = await openai_ended(client, batch_id)
    assert ended.output_file_id and ended.error_file_id
    output = parse_jsonl(await (await client.files.content(ended.output_file_id)).aread())
    errors = parse_jsonl(await (await client.files.content(ended.error_file_id)).aread())
    return ended, output, errors


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
        assert batch.completion_window == "24h"
        assert batch.expires_at is not None
        assert abs(batch.expires_at - batch.created_at - 24 * 3600) <= 1
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


async def test_result_files_escape_what_a_unicode_reader_takes_for_a_line_break(
    door: Door,
) -> None:
    # Given a line served and a line refused, their custom_ids holding U+2028, U+2029 and
    # NEL, which JSON leaves raw
    lines = openai_lines(1) + openai_lines(1, model="no-such-model")
    lines[0]["custom_id"], lines[1]["custom_id"] = "a\u2028b", "c\u2029d\x85e"
    async with door.openai() as client:
        # When the batch ends
        ended = await openai_ended(
            client, (await chat_batch(client, await upload(client, lines))).id
        )
        assert ended.output_file_id and ended.error_file_id
        raw = [
            await (await client.files.content(file_id)).aread()
            for file_id in (ended.output_file_id, ended.error_file_id)
        ]
    # Expect each file read line by line as Python's str.splitlines reads it, every line whole
    output, errors = ([orjson.loads(line) for line in f.decode().splitlines()] for f in raw)
    assert [line["custom_id"] for line in output] == ["a\u2028b"]
    assert [line["custom_id"] for line in errors] == ["c\u2029d\x85e"]


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
        assert abs((batch.expires_at - batch.created_at).total_seconds() - 24 * 3600) <= 1
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


FAILING = MockConfig(models={"flaky-gpt": Behavior(error_rate=1.0, error_status=500)})
"""flaky-gpt, whose catalog fallback is claude-haiku, answers 500 to everything."""


async def test_an_openai_batch_lines_own_fallbacks_serve_it_as_its_jobs(
    settings: Settings, keys: dict[str, str]
) -> None:
    # Given flaky-gpt failing, and a batch file of a line for it naming gpt-4o-mini as its
    # fallback, one naming a fallback the catalog lacks, and one whose fallbacks are no list
    lines = openai_lines(3, model="flaky-gpt")
    for line, fallbacks in zip(lines, (["gpt-4o-mini"], ["gpt-9"], "gpt-4o-mini"), strict=True):
        line["body"]["fallbacks"] = fallbacks
    async with (
        running_gateway(settings, teams=("alpha", "beta"), mock_config=FAILING) as gateway,
        front_door(settings, gateway, keys) as door,
        door.openai() as client,
    ):
        # When the batch ends
        batch = await chat_batch(client, await upload(client, lines))
        ended, output, errors = await openai_ended_files(client, batch.id)
        rows = await gateway.usage_rows(1)
        called = [call.model for call in gateway.mock.requests]

    # Expect the first line served by its fallback, never the catalog's claude-haiku
    assert ended.status == "completed"
    [served] = output
    assert served["custom_id"] == "req-0" and served["response"]["status_code"] == 200
    assert [row["model_used"] for row in rows if row["status"] == "ok"] == ["gpt-4o-mini"]
    assert called == ["flaky-gpt", "flaky-gpt", "gpt-4o-mini"]
    # the unknown fallback answered as an unknown model, the malformed one as the endpoint
    # refuses it, each line alone
    failed = {line["custom_id"]: line["response"] for line in errors}
    assert failed["req-1"]["status_code"] == 404
    assert failed["req-1"]["body"]["error"]["code"] == "unknown_model"
    assert failed["req-1"]["body"]["error"]["param"] == "fallbacks.0"
    assert failed["req-2"]["status_code"] == 400
    assert failed["req-2"]["body"]["error"]["param"] == "fallbacks"


async def test_a_message_batch_requests_own_fallbacks_serve_it_as_its_jobs(
    settings: Settings, keys: dict[str, str]
) -> None:
    # Given flaky-gpt failing, and a Message Batch of a request for it naming gpt-4o-mini as
    # its fallback, and one whose fallbacks name nothing
    served, malformed = message_requests(2)
    served["params"] |= {"model": "flaky-gpt", "fallbacks": ["gpt-4o-mini"]}
    malformed["params"] |= {"model": "flaky-gpt", "fallbacks": [""]}
    async with (
        running_gateway(settings, teams=("alpha", "beta"), mock_config=FAILING) as gateway,
        front_door(settings, gateway, keys) as door,
        door.anthropic() as client,
    ):
        # When the batch ends
        batch = await client.messages.batches.create(
            requests=[served, malformed]  # type: ignore[list-item]
        )
        await anthropic_ended(client, batch.id)
        results = {
            r.custom_id: r.result async for r in await client.messages.batches.results(batch.id)
        }
        [row] = await gateway.usage_rows(1)
        called = [call.model for call in gateway.mock.requests]

    # Expect the first served by its fallback, the other errored naming the field
    assert results["msg-0"].type == "succeeded"
    assert row["model_used"] == "gpt-4o-mini"
    assert called == ["flaky-gpt", "flaky-gpt", "gpt-4o-mini"]
    refused = results["msg-1"]
    assert refused.type == "errored"
    assert "params.fallbacks.0: String should have at least 1 character" in (
        refused.error.error.message
    )


async def test_a_message_batch_result_keeps_the_thinking_signature(door: Door) -> None:
    # Given a request that thinks
    [request] = message_requests(1)
    request["params"] |= {
        "max_tokens": 2048,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
    }
    async with door.anthropic() as client:
        # When its batch ends
        batch = await client.messages.batches.create(requests=[request])  # type: ignore[list-item]
        await anthropic_ended(client, batch.id)
        [result] = [r async for r in await client.messages.batches.results(batch.id)]

    # Expect the thinking block with the signature to send it back with
    assert result.result.type == "succeeded"
    thinking = result.result.message.content[0]
    assert thinking.type == "thinking" and thinking.signature == "mock-signature"


async def test_a_message_batch_carries_an_adaptive_effort_and_refuses_what_it_cannot(
    door: Door, gateway: Gateway
) -> None:
    # Given requests setting output_config: an effort beside adaptive thinking, as Anthropic
    # documents it; the same effort without thinking; a structured output format
    adaptive, bare, formatted = message_requests(3)
    adaptive["params"] |= {"thinking": {"type": "adaptive"}, "output_config": {"effort": "low"}}
    bare["params"] |= {"output_config": {"effort": "low"}}
    formatted["params"] |= {
        "thinking": {"type": "adaptive"},
        "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}},
    }
    async with door.anthropic() as client:
        # When their batch ends
        batch = await client.messages.batches.create(
            requests=[adaptive, bare, formatted]  # type: ignore[list-item]
        )
        await anthropic_ended(client, batch.id)
        results = {
            r.custom_id: r.result async for r in await client.messages.batches.results(batch.id)
        }

    # Expect the effort to reach Anthropic as it was sent, the model thinking at it
    [call] = gateway.mock.requests
    assert call.body is not None and call.body["output_config"] == {"effort": "low"}
    served = results["msg-0"]
    assert served.type == "succeeded" and served.message.content[0].type == "thinking"
    # and the others errored naming the field, never sent (not carried without a word)
    for custom_id, reason in [
        ("msg-1", "params.output_config.effort: this gateway carries an effort beside"),
        ("msg-2", "params.output_config.format: not supported by this gateway"),
    ]:
        refused = results[custom_id]
        assert refused.type == "errored", custom_id
        assert reason in refused.error.error.message


async def test_another_team_finds_none_of_its_files_or_batches(door: Door) -> None:
    # Given alpha's batch file, OpenAI batch and Message Batch
    async with door.openai("alpha") as alpha, door.anthropic("alpha") as alpha_messages:
        file_id = await upload(alpha, openai_lines(2))
        batch = await chat_batch(alpha, file_id)
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
            chat_batch(beta, file_id),
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
        batch = await chat_batch(client, file_id)
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
    pool = await create_pool(settings)
    try:
        stored = await _stored_message_requests(settings, pool, 3)
        recorded = _recorded(
            "anthropic", stored.id, str(api_key_id(keys["alpha"])), endpoint="/v1/messages", total=3
        )
        batch_id = recorded["batch_id"]
        await records.create_batch(pool, **recorded)
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
            batch = await chat_batch(client, file_id)
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
        batch = await chat_batch(client, file_id)
        ended = await openai_ended(client, batch.id)
    assert ended.status == "failed" and ended.failed_at
    assert ended.errors is not None and ended.errors.data
    assert ended.errors.data[0].line == 2
    assert "not JSON" in (ended.errors.data[0].message or "")
    assert ended.output_file_id is None and ended.error_file_id is None
    # ... and so with a line that is not UTF-8 text (Latin-1), named with its byte
    lines = jsonl(openai_lines(3)).split(b"\n")
    lines[1] = lines[1].replace(b"req-1", b"r\xe9q-1")
    async with door.openai() as client:
        file_id = (
            await client.files.create(file=("latin.jsonl", b"\n".join(lines)), purpose="batch")
        ).id
        batch = await chat_batch(client, file_id)
        ended = await openai_ended(client, batch.id)
    assert ended.status == "failed" and ended.errors is not None
    assert [(e.line, e.message) for e in ended.errors.data] == [
        (2, f"not UTF-8 text: byte 0xe9 at offset {len(lines[0]) + 1 + lines[1].index(0xE9)}")
    ]
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
            await chat_batch(client, "file-nope")
        assert [b.id async for b in client.batches.list()] == []
    async with front_door(bounded, gateway, keys) as door, door.anthropic() as client:
        # A Message Batch over the limit is refused 413, whether its Content-Length says so
        # or it comes in chunks of no announced length, and nothing is kept
        with pytest.raises(anthropic.APIStatusError, match="split it into several") as big:
            await client.messages.batches.create(requests=message_requests(40))  # type: ignore[arg-type]
        assert big.value.status_code == 413

        async def chunked() -> AsyncIterator[bytes]:
            yield b'{"requests": ['
            for _ in range(40):
                yield orjson.dumps(message_requests(1)[0]) + b","

        async with httpx.AsyncClient(base_url=door.url) as http:
            streamed = await http.post(
                "/v1/messages/batches", content=chunked(), headers={"x-api-key": keys["alpha"]}
            )
        assert streamed.status_code == 413, streamed.text
        assert "split it into several" in streamed.text
        assert [b.id async for b in client.messages.batches.list()] == []
    async with front_door(settings, gateway, keys) as door, door.anthropic() as client:
        with pytest.raises(anthropic.BadRequestError, match="used twice"):
            await client.messages.batches.create(
                requests=message_requests(2) + message_requests(1)  # type: ignore[arg-type]
            )
        # a body that is not UTF-8 (a request in Latin-1) is refused where it is not, never
        # read with its bytes replaced
        document = orjson.dumps({"requests": message_requests(1)}, option=orjson.OPT_INDENT_2)
        at = document.index(b'"user"') + 1
        latin = document[:at] + b"\xe9" + document[at:]
        line = document[:at].count(b"\n") + 1
        async with httpx.AsyncClient(base_url=door.url) as http:
            refused = await http.post(
                "/v1/messages/batches", content=latin, headers={"x-api-key": keys["alpha"]}
            )
        assert refused.status_code == 400, refused.text
        assert f"not UTF-8 JSON text (line {line}: byte 0xe9 at offset {at})" in refused.text
        assert "/tmp" not in refused.text
        assert [b.id async for b in client.messages.batches.list()] == []


async def test_lists_page_newest_first_with_the_sdks(door: Door) -> None:
    # Given three batches of each API (whose requests are all refused: nothing is called)
    async with door.openai() as client, door.anthropic() as claude:
        file_id = (await client.files.create(file=("bad.jsonl", b"{\n"), purpose="batch")).id
        created = [(await chat_batch(client, file_id)).id for _ in range(3)]
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
        batch_id = await _batch_expiring(pool, keys, file_id, "- interval '1 second'")
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


NEVER_ANSWERED = MockConfig(default=Behavior(latency_ms=120_000))
"""Each call held far past any deadline a test sets: the deadline ends it mid-call."""


async def test_a_request_called_when_its_batch_expires_says_it_was_called_and_billed(
    settings: Settings, keys: dict[str, str]
) -> None:
    # Given a batch of one line whose window ends in 5 seconds, served by a provider that
    # answers no call before then
    async with (
        running_gateway(settings, teams=("alpha",), mock_config=NEVER_ANSWERED) as gateway,
        front_door(settings, gateway, keys) as door,
        door.openai() as client,
    ):
        file_id = await upload(client, openai_lines(1))
        batch_id = await _batch_expiring(gateway.pool, keys, file_id, "+ interval '5 seconds'")
        # When the deadline passes while its request is at the provider
        ended = await openai_ended(client, batch_id)
        assert ended.error_file_id
        errors = parse_jsonl(await (await client.files.content(ended.error_file_id)).aread())

    # Expect it expired, its request written batch_expired as OpenAI writes it, saying it
    # was called and billed (as its gateway block shows), not that it never ran
    # (the mock records a call when it ends: the one cut is not yet among them)
    assert ended.status == "expired"
    (line,) = errors
    assert line["response"] is None and line["error"]["code"] == "batch_expired"
    assert line["gateway"]["attempts"] == 1
    message = line["error"]["message"]
    assert "deadline passed while this request was being served" in message
    assert "billed" in message and "could not be executed" not in message


SERVED_SLOWLY = MockConfig(default=Behavior(latency_ms=300))
"""Each call a third of a second: a batch is still being served when its key is revoked."""
RUNNER_LOG = "frontdoor.batches.runner"


async def _revoke(settings: Settings, keys: dict[str, str]) -> str:
    """Revoke alpha's key (as ``queuegate teams revoke-key alpha ID`` does); its id."""
    key_id = str(api_key_id(keys["alpha"]))
    pool = await create_pool(settings)
    try:
        assert await revoke_team_key(pool, "alpha", key_id)
    finally:
        await pool.close()
    return key_id


async def ended_row(gateway: Gateway, batch_id: str, timeout: float = 10.0) -> Any:
    """The batch's row once its runner is done with it: the batch reads ended as soon as its
    files are written, and the runner cleans up after (phase ``clean``, then ``done``). The
    row as it is after ``timeout`` s if it never gets there."""
    until = time.monotonic() + timeout
    while True:
        row = await gateway.pool.fetchrow(
            "SELECT phase, faults FROM api_batches WHERE id = $1", batch_id
        )
        if row is None or row["phase"] == "done" or time.monotonic() > until:
            return row
        await asyncio.sleep(0.01)


async def _ok_rows(gateway: Gateway) -> int:
    return int(await gateway.pool.fetchval("SELECT count(*) FROM usage_log WHERE status = 'ok'"))


async def _revocable(settings: Settings) -> tuple[Settings, str]:
    """``settings`` for workers that learn of a revoked key within 0.1 s, and a second key of
    alpha's, to read its batch with once the first is revoked."""
    settings = settings.model_copy(update={"security_cache_ttl": 0.1})
    _, second = await issue_key(settings, "alpha")
    return settings, second


async def _revoke_once_answered(
    settings: Settings, keys: dict[str, str], gateway: Gateway, answered: int
) -> str:
    """Revoke alpha's key once ``answered`` of its jobs are answered ok; its id."""
    await polled(lambda: _ok_rows(gateway), lambda n: n >= answered)
    return await _revoke(settings, keys)


async def _paid(gateway: Gateway, answered: int) -> set[str]:
    """The custom_ids of the jobs answered ok, once accounting has all ``answered`` rows."""
    rows = await gateway.usage_rows(answered)
    assert len(rows) == answered
    return {row["job_id"].partition(":")[2] for row in rows if row["status"] == "ok"}


def _runner_said(caplog: pytest.LogCaptureFixture, batch_id: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == RUNNER_LOG and r.levelno >= logging.WARNING and batch_id in r.getMessage()
    ]


async def test_a_key_revoked_mid_batch_keeps_every_paid_answer_and_ends_it_once(
    settings: Settings, keys: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    # Given a batch of 120 lines served 32 at a time, a third of a second each, by workers
    # that learn of a revoked key within 0.1 s, and a second key of the team to read it with
    settings, second = await _revocable(settings)
    async with (
        running_gateway(settings, teams=("alpha",), mock_config=SERVED_SLOWLY) as gateway,
        front_door(settings, gateway, keys) as door,
        door.openai() as client,
        door.reading(second).openai() as reader,
    ):
        file_id = await upload(client, openai_lines(120))
        batch = await chat_batch(client, file_id)
        # When the key that created it is revoked once 32 lines are answered
        key_id = await _revoke_once_answered(settings, keys, gateway, 32)
        ended, output, errors = await openai_ended_files(reader, batch.id)
        # the lines the runner wrote itself name the key: their requests were never published
        unpublished = [e for e in errors if key_id in e["response"]["body"]["error"]["message"]]
        paid = await _paid(gateway, 120 - len(unpublished))
        row = await ended_row(gateway, batch.id)

    # Expect every answer paid for in the output file, once, and only those
    served = [line["custom_id"] for line in output]
    refused = [line["custom_id"] for line in errors]
    assert 0 < len(served) < 120
    assert sorted(served) == sorted(paid) and gateway.mock.stats.calls == len(served)
    # the rest in the error file, each once, answered 401 for the revoked key
    assert sorted(served + refused) == sorted(f"req-{i}" for i in range(120))
    for line in errors:
        body = line["response"]["body"]["error"]
        assert line["response"]["status_code"] == 401 and body["code"] == "unauthorized"
        assert "revoked" in body["message"]
    # and the batch ended once, failed, naming why, its counts those of its files
    assert ended.status == "failed" and ended.failed_at
    assert ended.errors is not None and len(ended.errors.data) == 1
    [error] = ended.errors.data
    assert error.code == "key_revoked" and key_id in (error.message or "")
    assert ended.request_counts is not None
    counts = ended.request_counts
    assert (counts.total, counts.completed, counts.failed) == (120, len(output), len(errors))
    assert (row["phase"], row["faults"]) == ("done", 0)
    [said] = _runner_said(caplog, batch.id)
    assert said.exc_info is None and "revoked" in said.getMessage()


async def test_requests_waiting_on_a_bucket_when_the_key_is_revoked_are_401_lines(
    settings: Settings, keys: dict[str, str]
) -> None:
    # Given team alpha held to one request a second (a bucket of 2), so most of a batch of
    # 12 waits for its bucket in the workers, and workers that learn of a revocation at once
    settings, second = await _revocable(settings)
    await configure(settings, "alpha", {"rpm": 60, "burst": 2})
    async with (
        running_gateway(settings, teams=("alpha",)) as gateway,
        front_door(settings, gateway, keys) as door,
        door.openai() as client,
        door.reading(second).openai() as reader,
    ):
        file_id = await upload(client, openai_lines(12))
        batch = await chat_batch(client, file_id)
        # When its key is revoked once 3 lines are answered
        key_id = await _revoke_once_answered(settings, keys, gateway, 3)
        ended = await openai_ended(reader, batch.id)
        assert ended.error_file_id
        errors = parse_jsonl(await (await reader.files.content(ended.error_file_id)).aread())

    # Expect every unserved line answered 401 unauthorized for the revoked key (named by its
    # id, never the key itself), as the batch's own error says; none a cancel of the batch
    assert ended.status == "failed"
    assert ended.errors is not None and [e.code for e in ended.errors.data] == ["key_revoked"]
    assert 0 < len(errors) < 12
    for line in errors:
        assert (line["response"] or {}).get("status_code") == 401, line
        body = line["response"]["body"]["error"]
        assert body["code"] == "unauthorized" and line["error"] is None
        assert "revoked" in body["message"]
        assert keys["alpha"] not in orjson.dumps(line).decode()
    assert any(key_id in line["response"]["body"]["error"]["message"] for line in errors)
    assert ended.request_counts is not None and ended.request_counts.failed == len(errors)


async def test_a_message_batch_whose_key_is_revoked_lists_what_was_served(
    settings: Settings, keys: dict[str, str]
) -> None:
    # Given a Message Batch of 120 requests being served when its key is revoked
    settings, second = await _revocable(settings)
    async with (
        running_gateway(settings, teams=("alpha",), mock_config=SERVED_SLOWLY) as gateway,
        front_door(settings, gateway, keys) as door,
        door.anthropic() as client,
        door.reading(second).anthropic() as reader,
    ):
        batch = await client.messages.batches.create(
            requests=message_requests(120)  # type: ignore[arg-type]
        )
        key_id = await _revoke_once_answered(settings, keys, gateway, 32)
        # When the team reads it with its other key
        ended = await anthropic_ended(reader, batch.id)
        results = [r async for r in await reader.messages.batches.results(batch.id)]
        unpublished = [
            r for r in results if r.result.type == "errored" and key_id in str(r.result.error)
        ]
        paid = await _paid(gateway, 120 - len(unpublished))

    # Expect each request once: those answered before the revocation succeeded, the rest
    # errored for the revoked key
    assert sorted(r.custom_id for r in results) == sorted(f"msg-{i}" for i in range(120))
    succeeded = sorted(r.custom_id for r in results if r.result.type == "succeeded")
    assert 0 < len(succeeded) < 120 and succeeded == sorted(paid)
    for r in results:
        if r.result.type != "succeeded":
            assert r.result.type == "errored"
            assert r.result.error.error.type == "authentication_error"
            assert "revoked" in r.result.error.error.message
    counts = ended.request_counts
    assert (counts.succeeded, counts.errored) == (len(succeeded), 120 - len(succeeded))
    assert counts.processing == 0 and ended.results_url


async def _published(redis_client: aioredis.Redis, published: str) -> set[str]:
    """The custom_ids of a batch's jobs the broker confirmed, as the gateway records them."""
    return {m.decode() for m in await redis_client.smembers(published)}


async def _paused(gateway: Gateway, redis_client: aioredis.Redis, batch: Batch) -> bool:
    """Whether a run of the batch published and ended (no runner holds it: the next waits
    out its rest), its confirmed publishes all recorded."""
    published = Keys(gateway.settings.redis_prefix).batch_published("alpha", batch.id)
    runner = await gateway.pool.fetchval("SELECT runner FROM api_batches WHERE id = $1", batch.id)
    return runner is None and await redis_client.scard(published) > 0


async def test_requests_a_revoked_key_never_published_are_failed_lines_naming_it(
    settings: Settings, keys: dict[str, str], redis_client: aioredis.Redis
) -> None:
    # Given team alpha's queue held to 5 jobs and nobody serving it: a batch of 500 publishes
    # what the broker takes and pauses, its run ended, to wait for room (not a fault: the
    # queue drains when served). A quorum queue may take past its 5 the publishes already on
    # their way, at most the publishing window of 256: never the 500.
    total = 500
    await configure(settings, "alpha", {"max_queue_length": 5})
    await quota_in_force(settings, "alpha")
    _, second = await issue_key(settings, "alpha")
    try:
        async with (
            running_gateway(settings, teams=("gamma",)) as idle,
            front_door(settings, idle, keys) as door,
            door.openai() as client,
            door.reading(second).openai() as reader,
        ):
            file_id = await upload(client, openai_lines(total))
            batch = await chat_batch(client, file_id)
            # Paused, not publishing: what it published is recorded (as a run ends), and no
            # run takes the batch up again before its rest is over
            await polled(lambda: _paused(idle, redis_client, batch), bool)
            # When its key is revoked, and its team served only once the runner, seeing the
            # revocation, has stopped the batch (canceled it in the gateway's record): what
            # was published by then is all that ever is
            key_id = await _revoke(settings, keys)
            gateway_keys = Keys(settings.redis_prefix)
            canceled = gateway_keys.batch_canceled("alpha", batch.id)
            await polled(lambda: redis_client.exists(canceled), bool)
            published = await _published(
                redis_client, gateway_keys.batch_published("alpha", batch.id)
            )
            async with running_gateway(settings, teams=("alpha",)) as serving:
                ended = await openai_ended(reader, batch.id)
                assert ended.error_file_id
                content = await reader.files.content(ended.error_file_id)
                errors = parse_jsonl(await content.aread())
                row = await ended_row(serving, batch.id)
                calls = serving.mock.stats.calls
    finally:
        async with BrokerAdmin.of(settings) as admin:
            await admin.delete_policy(quota_policy(settings, "alpha"))

    # Expect some requests published before the revocation and some not
    everyone = {f"req-{i}" for i in range(total)}
    assert len(published) >= 5 and published < everyone
    # no answer, so no output file; every request a failed line once, 401: the published
    # ones refused by the workers, the ones never published named unserved by the runner
    assert ended.status == "failed" and ended.output_file_id is None
    assert sorted(line["custom_id"] for line in errors) == sorted(everyone)
    assert all(line["response"]["status_code"] == 401 for line in errors)
    by_id = {line["custom_id"]: line["response"]["body"]["error"]["message"] for line in errors}
    refused = {c for c, m in by_id.items() if m.endswith("the API key is unknown or revoked")}
    unserved = {c for c, m in by_id.items() if "not served" in m and key_id in m}
    assert refused == published and unserved == everyone - published
    assert ended.errors is not None and [e.code for e in ended.errors.data] == ["key_revoked"]
    assert calls == 0
    assert (row["phase"], row["faults"]) == ("done", 0)


async def test_batches_revoked_before_they_ran_end_at_once(
    settings: Settings, gateway: Gateway, keys: dict[str, str]
) -> None:
    # Given an OpenAI batch and a Message Batch recorded while no front door ran
    async with front_door(settings, gateway, keys) as door, door.openai() as client:
        file_id = await upload(client, openai_lines(2))
    key_id = str(api_key_id(keys["alpha"]))
    pool = await create_pool(settings)
    try:
        stored = await _stored_message_requests(settings, pool, 3)
        openai_batch = await records.create_batch(
            pool, **_recorded("openai", file_id, key_id, endpoint="/v1/chat/completions")
        )
        message_batch = await records.create_batch(
            pool, **_recorded("anthropic", stored.id, key_id, endpoint="/v1/messages", total=3)
        )
    finally:
        await pool.close()
    # When the key that created them is revoked, and a front door starts
    await _revoke(settings, keys)
    _, second = await issue_key(settings, "alpha")
    async with (
        front_door(settings, gateway, keys) as door,
        door.reading(second).openai() as reader,
        door.reading(second).anthropic() as claude,
    ):
        failed = await openai_ended(reader, openai_batch.id)
        ended = await anthropic_ended(claude, message_batch.id)
        results = [r async for r in await claude.messages.batches.results(message_batch.id)]

    # Expect the OpenAI batch failed with no files, naming the key; each request of the
    # Message Batch errored; nothing published or called
    assert failed.status == "failed" and failed.output_file_id is None
    assert failed.errors is not None and [e.code for e in failed.errors.data] == ["key_revoked"]
    assert ended.request_counts.errored == 3
    assert sorted(r.custom_id for r in results) == ["msg-0", "msg-1", "msg-2"]
    assert {r.result.type for r in results} == {"errored"}
    assert gateway.mock.stats.calls == 0


async def _stored_message_requests(
    settings: Settings, pool: asyncpg.Pool, count: int
) -> files.StoredFile:
    """``count`` Message Batch requests of alpha's, stored as its route stores them."""
    requests = b"".join(orjson.dumps(r) + b"\n" for r in message_requests(count))
    return await files.store_file(
        pool,
        team="alpha",
        purpose="message_batch_requests",
        filename="requests.json",
        chunks=_once(requests),
        max_bytes=len(requests),
        quota=settings.team_file_storage_bytes,
    )


def _recorded(
    api: records.Api, input_file_id: str, key_id: str, *, endpoint: str, total: int = 0
) -> dict[str, Any]:
    """The arguments of ``records.create_batch`` for a batch of alpha's, as its route makes."""
    return {
        "batch_id": records.new_batch_id(api),
        "team": "alpha",
        "api": api,
        "key_id": key_id,
        "input_file_id": input_file_id,
        "endpoint": endpoint,
        "metadata": None,
        "total": total,
    }


async def test_a_batch_that_keeps_failing_fails_once_keeping_what_it_wrote(
    settings: Settings,
    keys: dict[str, str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    # Given runs that rest a twentieth of a second after a fault, a collect lock found held
    # counted as one at once (not after LOCK_PATIENCE, which covers a stalled runner's lock),
    # and a batch of 2 fast lines and 3 slow ones (2 s each)
    monkeypatch.setattr(runner, "RETRY_AFTER", 0.05)
    monkeypatch.setattr(runner, "LOCK_PATIENCE", 0.0)
    lines = openai_lines(2) + openai_lines(3, model="local-llama")
    for i, line in enumerate(lines[2:]):
        line["custom_id"] = f"slow-{i}"
    mock = MockConfig(models={"llama-3.1-8b": Behavior(latency_ms=2000)})
    async with running_gateway(settings, teams=("alpha",), mock_config=mock) as gateway:
        async with front_door(settings, gateway, keys) as first, first.openai() as client:
            file_id = await upload(client, lines)
            batch = await chat_batch(client, file_id)
            await polled(
                lambda: client.batches.retrieve(batch.id),
                lambda b: b.request_counts is not None and b.request_counts.completed == 2,
            )
        # When that front door stops, and the team holds the batch's collect lock itself,
        # as its own `queuegate batch collect` would: the next runner cannot collect it
        async with GatewayClient(
            settings, team="alpha", api_key=keys["alpha"], listen=False
        ) as team:
            lock = await BatchState(team.control, batch.id).lock()
        holder = await aio_pika.connect(settings.amqp_url)
        async with holder:
            channel = await holder.channel()
            queue = await channel.get_queue(lock)
            await queue.consume(_drop, exclusive=True)
            async with front_door(settings, gateway, keys) as second, second.openai() as client:
                ended = await openai_ended(client, batch.id)
                assert ended.output_file_id
                content = await client.files.content(ended.output_file_id)
                output = parse_jsonl(await content.aread())
            row = await ended_row(gateway, batch.id)
        # and the team then collects, itself, what the gateway answered and kept
        report = await collect(
            settings, batch.id, tmp_path / "rest.jsonl", team="alpha", api_key=keys["alpha"]
        )
        rest = parse_jsonl((tmp_path / "rest.jsonl").read_bytes())
        calls = gateway.mock.stats.calls
        kept = await batch_list(settings, team="alpha", api_key=keys["alpha"])

    # Expect the batch failed once, after MAX_FAULTS runs and a give-up that could not
    # collect either (the lock is held), its output file holding the two lines written
    # before, and saying why in one error
    assert ended.status == "failed"
    assert sorted(line["custom_id"] for line in output) == ["req-0", "req-1"]
    assert ended.request_counts is not None and ended.request_counts.completed == 2
    assert ended.errors is not None and len(ended.errors.data) == 1
    [error] = ended.errors.data
    assert error.code == "batch_failed" and "being collected" in (error.message or "")
    assert (row["phase"], row["faults"]) == ("done", records.MAX_FAULTS + 1)
    said = _runner_said(caplog, batch.id)
    assert len(said) == records.MAX_FAULTS + 1 and all(r.exc_info is None for r in said)
    # and the answers paid for but not collected reach the team all the same, once
    assert sorted(line["custom_id"] for line in rest) == ["slow-0", "slow-1", "slow-2"]
    assert report.counts.done == 5 and calls == 5
    # and the batch, given up to the team, deleted by that collect once done (before: kept
    # as the front door's, until it expired, and the team's delete of it refused)
    assert kept == []


async def _drop(message: aio_pika.abc.AbstractIncomingMessage) -> None:
    """The lock queue holds nothing."""


async def _batch_expiring(
    pool: asyncpg.Pool, keys: dict[str, str], file_id: str, offset: str
) -> str:
    """Team alpha's OpenAI batch of ``file_id``, made as its create makes it, its 24 hours
    ending at now ``offset`` (an SQL interval term) rather than a day on."""
    batch_id = records.new_batch_id("openai")
    await records.create_batch(
        pool,
        batch_id=batch_id,
        team="alpha",
        api="openai",
        key_id=str(api_key_id(keys["alpha"])),
        input_file_id=file_id,
        endpoint="/v1/chat/completions",
        metadata=None,
    )
    await pool.execute(
        f"UPDATE api_batches SET expires_at = now() {offset} WHERE id = $1", batch_id
    )
    return batch_id


async def _partly_collected(settings: Settings, gateway: Gateway, keys: dict[str, str]) -> str:
    """A batch of 6 of a team admitted one request a second (registered so), 2 collected by
    a front door before it stopped: the batch's id."""
    async with front_door(settings, gateway, keys) as first, first.openai() as client:
        batch = await chat_batch(client, await upload(client, openai_lines(6)))
        await polled(
            lambda: client.batches.retrieve(batch.id),
            lambda b: b.request_counts is not None and b.request_counts.completed >= 2,
        )
    return batch.id


async def _collect_interrupted(
    settings: Settings, keys: dict[str, str], batch_id: str, own: Path
) -> set[str]:
    """Run alpha's own collect of the batch into ``own`` until it took a line, then interrupt
    it: the custom_ids it took."""
    seen: list[int] = []

    def interrupt(done: int, _: int) -> None:
        # Called once lines are on disk and recorded written (the first call says how
        # many the front door wrote): cancelled here, the collect stops before its next
        # line, so each line in its file is one the gateway counts written
        seen.append(done)
        if done > seen[0]:
            collecting.cancel()

    collecting = asyncio.create_task(
        collect(settings, batch_id, own, team="alpha", api_key=keys["alpha"], on_progress=interrupt)
    )
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(collecting, 30)
    return {line["custom_id"] for line in parse_jsonl(await asyncio.to_thread(own.read_bytes))}


def expect_taken_as_error_lines(
    ended: Batch, output: list[dict[str, Any]], errors: list[dict[str, Any]], taken: set[str]
) -> None:
    """Expect the batch completed, its counts its files', each line the team's own collect
    took an error line (409) saying where its answer went."""
    assert ended.status == "completed" and ended.request_counts is not None
    assert taken and ended.request_counts.completed == len(output) == 6 - len(taken)
    assert ended.request_counts.failed == len(errors) == len(taken)
    assert {line["custom_id"] for line in errors} == taken
    assert {line["response"]["status_code"] for line in errors} == {409}
    assert all(
        "queuegate batch collect" in line["response"]["body"]["error"]["message"] for line in errors
    )


async def test_lines_the_teams_own_collect_took_are_error_lines_not_completed_ones(
    settings: Settings, keys: dict[str, str], tmp_path: Path
) -> None:
    # Given a batch of 6 of a team admitted one request a second, 2 collected by the front door
    await register(settings, "alpha", TeamConfig(rpm=60, burst=1))
    async with running_gateway(settings, teams=("alpha",)) as gateway:
        batch_id = await _partly_collected(settings, gateway, keys)
        # When, while no front door runs it, the team's own collect takes some results and
        # is interrupted, and a front door then ends the batch
        taken = await _collect_interrupted(settings, keys, batch_id, tmp_path / "own.jsonl")
        async with front_door(settings, gateway, keys) as second, second.openai() as client:
            ended, output, errors = await openai_ended_files(client, batch_id)

    # Expect the batch's counts to be its files' (before: completed 6, its output holding
    # fewer): each line the team took an error line saying where its answer went
    expect_taken_as_error_lines(ended, output, errors, taken)


async def test_a_batch_the_teams_own_collect_took_to_its_end_ends_completed_not_lost(
    settings: Settings, keys: dict[str, str], tmp_path: Path
) -> None:
    # Given a batch of 6 of a team admitted one request a second, 2 collected by the front door
    await register(settings, "alpha", TeamConfig(rpm=60, burst=1))
    async with running_gateway(settings, teams=("alpha",)) as gateway:
        batch_id = await _partly_collected(settings, gateway, keys)
        # When, while no front door runs it, the team's own collect takes every result left,
        # to its end, and a front door then ends the batch
        own = tmp_path / "own.jsonl"
        await asyncio.wait_for(
            collect(settings, batch_id, own, team="alpha", api_key=keys["alpha"]), 30
        )
        taken = {line["custom_id"] for line in parse_jsonl(own.read_bytes())}
        async with front_door(settings, gateway, keys) as second, second.openai() as client:
            ended, output, errors = await openai_ended_files(client, batch_id)

    # Expect it completed as one the team's collect took a part of (before: failed
    # batch_lost, "no batch named", its counts 2/6 and no error file): its lines the
    # runner's, each line that collect took an error line saying where its answer went
    expect_taken_as_error_lines(ended, output, errors, taken)


async def test_the_teams_delete_of_a_batch_the_front_door_runs_is_refused(
    settings: Settings, keys: dict[str, str], tmp_path: Path
) -> None:
    # Given a batch of 6 of a team admitted one request a second, 2 collected by the front
    # door, and, while no front door runs it, the team's own collect took some results and
    # was interrupted, every request answered by now
    await register(settings, "alpha", TeamConfig(rpm=60, burst=1))
    async with running_gateway(settings, teams=("alpha",)) as gateway:
        batch_id = await _partly_collected(settings, gateway, keys)
        taken = await _collect_interrupted(settings, keys, batch_id, tmp_path / "own.jsonl")
        team = {"team": "alpha", "api_key": keys["alpha"]}
        await polled(lambda: batch_status(settings, batch_id, **team), lambda s: s.queued == 0)
        # When the team deletes it with its own `queuegate batch delete`
        with pytest.raises(ControlRefused) as refused:
            await delete_batch(settings, batch_id, **team)
        # and a front door then ends the batch
        async with front_door(settings, gateway, keys) as second, second.openai() as client:
            ended, output, errors = await openai_ended_files(client, batch_id)
            row = await ended_row(gateway, batch_id)
            kept = await batch_list(settings, **team)

    # Expect the delete refused in one line saying how to cancel it instead (before: deleted,
    # and the batch then failed batch_lost, its counts not adding up, 2 lines in no file)
    assert f"cancel it there (POST /v1/batches/{batch_id}/cancel)" in str(refused.value)
    # and the batch ended as one the team's collect took a part of, each line that collect
    # took an error line, the front door then deleting the gateway's copy as it ended it
    expect_taken_as_error_lines(ended, output, errors, taken)
    assert row["phase"] == "done" and kept == []
