"""A batch that meets a fault of ours ends with every answer it was paid for, end to end: the
official SDKs against a real front door, whose runner drives the batch through a real worker,
accounting and the mock provider.

The faults are ours by nature (a bug writing one answer, a collect that keeps failing), so
they are injected in our own code, the one place they can be: the broker, Redis, PostgreSQL
and the provider stay real. A line the gateway cannot write is errored alone; a batch whose
runs keep failing is given up: what its jobs were answered stays in its results, each
request left unserved is an errored line saying why, and its counts add up."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import anthropic
import pytest

from frontdoor.batches import records, runner
from producer.batch.answers import Answer
from producer.batch.formats import FORMATS, FormatName
from producer.batch.lock import LockHeld
from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from tests.frontdoor_support import Door, open_door
from tests.test_frontdoor_batches import (
    anthropic_ended,
    ended_row,
    openai_ended,
    openai_ended_files,
    openai_lines,
    parse_jsonl,
    upload,
)

FAULT = "a bug of ours"


def unwritable(monkeypatch: pytest.MonkeyPatch, api: FormatName, custom_id: str) -> None:
    """The batch format ``api`` fails on the answer to ``custom_id``, as a bug would."""
    fmt = FORMATS[api]

    def line(answer: Answer) -> dict[str, Any]:
        if answer.custom_id == custom_id and answer.result is not None:
            raise RuntimeError(FAULT)
        return fmt.line(answer)

    monkeypatch.setitem(FORMATS, api, dataclasses.replace(fmt, line=line))


def message_requests(custom_ids: list[str]) -> list[Any]:
    return [
        {
            "custom_id": custom_id,
            "params": {
                "model": "gpt-4o-mini",
                "max_tokens": 20,
                "messages": [{"role": "user", "content": f"Hello {custom_id}"}],
            },
        }
        for custom_id in custom_ids
    ]


def claude(door: Door) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=door.url, api_key=door.keys["alpha"], max_retries=0)


async def ok_rows(door: Door) -> int:
    pool = door.gateway.pool
    return int(await pool.fetchval("SELECT count(*) FROM usage_log WHERE status = 'ok'"))


def said(caplog: pytest.LogCaptureFixture, batch_id: str) -> list[logging.LogRecord]:
    """What was logged at ERROR about the batch."""
    return [r for r in caplog.records if r.levelno >= logging.ERROR and batch_id in r.getMessage()]


async def test_a_message_batch_line_the_gateway_cannot_write_errors_alone(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a Message Batch of 3 requests, the answer to one of which the gateway fails to
    # write
    unwritable(monkeypatch, "anthropic", "bad")
    async with open_door(settings) as door, claude(door) as client:
        # When it runs
        batch = await client.messages.batches.create(
            requests=message_requests(["good-0", "bad", "good-1"])
        )
        ended = await anthropic_ended(client, batch.id)
        results = {
            r.custom_id: r.result async for r in await client.messages.batches.results(batch.id)
        }
        rows = await door.gateway.usage_rows(3)
        calls = door.gateway.mock.stats.calls

    # Expect the two others answered, the one errored saying why, and the counts adding up
    counts = ended.request_counts
    assert (counts.succeeded, counts.errored, counts.processing) == (2, 1, 0)
    assert {results["good-0"].type, results["good-1"].type} == {"succeeded"}
    bad = results["bad"]
    assert bad.type == "errored" and bad.error.error.type == "api_error"
    message = bad.error.error.message
    assert message.startswith("internal_error: the gateway could not write its answer")
    assert f"RuntimeError: {FAULT}" in message and "not served again" in message
    # each served and billed once
    assert calls == 3 and len(rows) == 3
    # and the fault logged once, naming the batch and the request
    [logged] = said(caplog, batch.id)
    assert "bad" in logged.getMessage() and logged.exc_info is not None


async def test_an_openai_batch_line_the_gateway_cannot_write_is_in_the_error_file(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an OpenAI batch of 3 lines, the answer to one of which the gateway fails to write
    unwritable(monkeypatch, "openai", "req-1")
    async with open_door(settings) as door, door.client() as client:
        # When it runs
        file_id = await upload(client, openai_lines(3))
        batch = await client.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        ended, output, errors = await openai_ended_files(client, batch.id)
        calls = door.gateway.mock.stats.calls

    # Expect it completed, the two others in its output, the one in its error file, a 500
    assert ended.status == "completed" and ended.request_counts is not None
    counts = ended.request_counts
    assert (counts.total, counts.completed, counts.failed) == (3, 2, 1)
    assert sorted(line["custom_id"] for line in output) == ["req-0", "req-2"]
    [error] = errors
    assert error["custom_id"] == "req-1" and error["response"]["status_code"] == 500
    body = error["response"]["body"]["error"]
    assert body["code"] == "internal_error" and f"RuntimeError: {FAULT}" in body["message"]
    # billed with what it cost, served once
    assert float(error["gateway"]["cost_usd"]) > 0 and calls == 3


def collect_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every run of the runner fails collecting, as a bug would; runs rest 0.05 s after."""

    async def failing(*_: object, **__: object) -> Any:
        raise RuntimeError(FAULT)

    monkeypatch.setattr(runner, "collect_into", failing)
    monkeypatch.setattr(runner, "RETRY_AFTER", 0.05)


SLOW_TEAM = {"alpha": TeamConfig(rpm=60, burst=2)}
"""One request a second after two at once: most of a batch waits when it is given up."""
LINES = 12


@pytest.mark.parametrize("api", ["anthropic", "openai"])
async def test_a_batch_given_up_keeps_what_was_answered_and_errors_the_rest(
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    api: FormatName,
) -> None:
    # Given a batch of 12 requests of a team served one a second, whose runs keep failing
    collect_fails(monkeypatch)
    async with open_door(settings, teams=SLOW_TEAM) as door:
        # When it is given up
        if api == "anthropic":
            async with claude(door) as client:
                custom_ids = [f"req-{i}" for i in range(LINES)]
                batch = await client.messages.batches.create(requests=message_requests(custom_ids))
                ended = await anthropic_ended(client, batch.id)
                results = [r async for r in await client.messages.batches.results(batch.id)]
            answered = {r.custom_id for r in results if r.result.type == "succeeded"}
            errored = {
                r.custom_id: r.result.error.error.message
                for r in results
                if r.result.type == "errored"
            }
            counts = ended.request_counts
            assert counts.processing == 0 and (counts.canceled, counts.expired) == (0, 0)
            assert (counts.succeeded, counts.errored) == (len(answered), len(errored))
            batch_id = batch.id
        else:
            async with door.client() as openai_client:
                file_id = await upload(openai_client, openai_lines(LINES))
                made = await openai_client.batches.create(
                    input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
                )
                done = await openai_ended(openai_client, made.id)
                assert done.output_file_id and done.error_file_id
                output = await openai_client.files.content(done.output_file_id)
                error_file = await openai_client.files.content(done.error_file_id)
                lines = parse_jsonl(await output.aread()) + parse_jsonl(await error_file.aread())
            answered = {
                line["custom_id"] for line in lines if line["response"]["status_code"] == 200
            }
            errored = {
                line["custom_id"]: line["response"]["body"]["error"]["message"]
                for line in lines
                if line["response"]["status_code"] == 500
            }
            assert done.status == "failed" and done.request_counts is not None
            totals = done.request_counts
            assert (totals.total, totals.completed, totals.failed) == (
                LINES,
                len(answered),
                len(errored),
            )
            assert done.errors is not None and len(done.errors.data) == 1
            assert done.errors.data[0].code == "batch_failed"
            batch_id = made.id
        served = await ok_rows(door)
        calls = door.gateway.mock.stats.calls
        row = await ended_row(door.gateway, batch_id)

    # Expect every request with one result: those answered (paid for) kept, the rest errored
    assert answered.isdisjoint(errored) and len(answered) + len(errored) == LINES
    assert len(answered) >= 2
    # saying why, each served once and none served after it was given up
    for message in errored.values():
        assert "not served: the gateway gave up running this batch" in message
        assert f"after {records.MAX_FAULTS} failed runs (RuntimeError: {FAULT})" in message
    assert calls == served == len(answered)
    assert (row["phase"], row["faults"]) == ("done", records.MAX_FAULTS)
    # and the give-up logged once, naming the batch
    [logged] = said(caplog, batch_id)
    assert "given up" in logged.getMessage()


async def test_a_batch_whose_collect_lock_another_holds_waits_for_it_not_failed(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a runner whose collects find the batch's lock held for more runs than fail a
    # batch, as when the runner before it stalled past its lease: the broker lets its lock
    # go only at its missed heartbeats (a minute on)
    collect = runner.collect_into
    refused: list[int] = []

    async def held_then_free(*args: Any, **kwargs: Any) -> Any:
        if len(refused) < records.MAX_FAULTS + 2:
            refused.append(1)
            raise LockHeld("batch 'b' is being collected by another process")
        return await collect(*args, **kwargs)

    monkeypatch.setattr(runner, "collect_into", held_then_free)
    monkeypatch.setattr(runner, "RETRY_AFTER", 0.05)
    async with open_door(settings) as door, door.client() as client:
        # When a batch runs
        file_id = await upload(client, openai_lines(3))
        made = await client.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        done = await openai_ended(client, made.id)
        row = await ended_row(door.gateway, made.id)

    # Expect it completed once the lock was free, no run counted failed (before: failed
    # after five runs, its answered lines in no file)
    assert done.status == "completed", done.errors
    assert done.request_counts is not None and done.request_counts.completed == 3
    assert len(refused) == records.MAX_FAULTS + 2
    assert row["faults"] == 0
