"""The front door's limits on a request, applied to each request of a batch as its
synchronous endpoint applies them to a body: a request whose job is larger than
``max_job_bytes`` is answered ``request_too_large`` (413) and one nested deeper than
``MAX_NESTING`` levels 400, each alone, in the words of the synchronous refusal, while the
rest of its batch is served: over HTTP (the official SDKs) and by ``queuegate batch
submit``/``collect`` (a team added the default way)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from queuegate.request_limits import MAX_NESTING
from queuegate.settings import Settings
from tests.batch_files import openai_line, read_jsonl, write_jsonl
from tests.frontdoor_support import Door, open_door
from tests.support import running_gateway
from tests.teams import TeamIdentity
from tests.test_batch_checks import alpha, cli
from tests.test_frontdoor_batches import (
    anthropic_ended,
    message_requests,
    openai_ended_files,
    openai_lines,
    upload,
)

__all__ = ["alpha"]  # the CLI's team, a fixture

JOB_BYTES = 4096
"""The door's ``max_job_bytes``: small, so an oversize request is a few kilobytes."""
LARGE = "x" * (JOB_BYTES + 100)
DEEP = 150
"""Levels a request nests: past ``MAX_NESTING``, inside what the jobs' JSON carries."""


def nested(levels: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(levels - 1):
        value = [value]
    return value


def deep_tool_openai() -> dict[str, Any]:
    """A chat completions tool whose schema nests ``DEEP`` levels below the request."""
    schema = {"type": "object", "properties": {"x": {"enum": nested(DEEP)}}}
    return {"type": "function", "function": {"name": "f", "parameters": schema}}


def deep_tool_anthropic() -> dict[str, Any]:
    return {"name": "f", "input_schema": {"type": "object", "x": nested(DEEP)}}


@pytest.fixture
async def door(settings: Settings) -> AsyncIterator[Door]:
    async with open_door(settings.model_copy(update={"max_job_bytes": JOB_BYTES})) as d:
        yield d


async def test_an_openai_batch_answers_an_oversize_and_a_deep_line_alone_as_sync_does(
    door: Door,
) -> None:
    # Given an OpenAI batch with a line past the size limit and one nested 150 levels,
    # beside one served
    plain, large, deep = openai_lines(3)
    large["body"]["messages"][0]["content"] = LARGE
    deep["body"]["tools"] = [deep_tool_openai()]
    async with door.client() as client:
        # When its batch ends
        file_id = await upload(client, [plain, large, deep])
        batch = await client.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        ended, output, errors = await openai_ended_files(client, batch.id)
        # and the same bodies are sent to /v1/chat/completions
        sync: dict[str, openai.APIStatusError] = {}
        for line in (large, deep):
            body = dict(line["body"])
            with pytest.raises(openai.APIStatusError) as refused:
                await client.chat.completions.create(
                    model=body.pop("model"), messages=body.pop("messages"), extra_body=body
                )
            sync[line["custom_id"]] = refused.value

    # Expect the batch completed, the plain line served, and each other line alone answered
    # with the synchronous refusal's status, code, type, message and param
    assert ended.status == "completed", ended.errors
    assert [line["custom_id"] for line in output] == [plain["custom_id"]]
    assert sync[large["custom_id"]].status_code == 413
    assert sync[deep["custom_id"]].status_code == 400
    assert f"nests deeper than {MAX_NESTING} levels" in sync[deep["custom_id"]].message
    assert sorted(line["custom_id"] for line in errors) == [large["custom_id"], deep["custom_id"]]
    for line in errors:
        said = sync[line["custom_id"]]
        assert line["response"]["status_code"] == said.status_code
        assert line["response"]["body"] == said.response.json()
    assert door.gateway.mock.stats.calls == 1


async def test_a_message_batch_errors_an_oversize_and_a_deep_request_alone_as_sync_does(
    door: Door,
) -> None:
    # Given a Message Batch with a request past the size limit and one nested 150 levels,
    # beside one served
    plain, large, deep = message_requests(3)
    large["params"]["messages"][0]["content"] = LARGE
    deep["params"]["tools"] = [deep_tool_anthropic()]
    async with anthropic.AsyncAnthropic(
        base_url=door.url, api_key=door.keys["alpha"], max_retries=0
    ) as client:
        # When its batch ends
        batch = await client.messages.batches.create(requests=[plain, large, deep])  # type: ignore[list-item]
        await anthropic_ended(client, batch.id)
        results = {
            r.custom_id: r.result async for r in await client.messages.batches.results(batch.id)
        }
        # and the same params are sent to /v1/messages
        sync: dict[str, anthropic.APIStatusError] = {}
        for request in (large, deep):
            with pytest.raises(anthropic.APIStatusError) as refused:
                await client.messages.create(**request["params"])
            sync[request["custom_id"]] = refused.value

    # Expect the plain request served, and each other errored alone in the words of
    # /v1/messages' refusal
    assert results[plain["custom_id"]].type == "succeeded"
    assert sync[large["custom_id"]].status_code == 413
    assert sync[deep["custom_id"]].status_code == 400
    for custom_id, said in sync.items():
        result = results[custom_id]
        assert result.type == "errored", custom_id
        assert result.error.error.model_dump() == said.response.json()["error"], custom_id
    assert door.gateway.mock.stats.calls == 1


async def test_the_cli_answers_an_oversize_and_a_deep_line_alone_and_serves_the_rest(
    settings: Settings, tmp_path: Path, alpha: TeamIdentity
) -> None:
    # Given an OpenAI-format file with a line past the gateway's 1 MiB job limit and one
    # nested 150 levels, beside one served
    plain, large, deep = (openai_line(i) for i in range(3))
    large["body"]["messages"][0]["content"] = "x" * (settings.max_job_bytes + 100)
    deep["body"]["tools"] = [deep_tool_openai()]
    source = write_jsonl(tmp_path / "limits.jsonl", [plain, large, deep])
    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    async with running_gateway(settings) as gateway:
        # When the team's CLI submits it and collects it, failures apart
        submitted = await cli(alpha, "submit", str(source), "--name", "limits")
        collected = await cli(
            alpha, "collect", "limits", "--out", str(out), "--errors", str(errors)
        )
        calls = gateway.mock.requests

    # Expect the submit to go on, naming each line refused
    code, stdout, stderr = submitted
    assert code == 0, stderr
    too_large = f"the request is larger than {settings.max_job_bytes} bytes: send less"
    assert f"{source}:2: {too_large}" in stderr
    assert f"{source}:3: the request nests deeper than {MAX_NESTING} levels" in stderr
    assert "2 refused" in stdout
    # and collect to answer each an errored line, the other served
    assert collected[0] == 0, collected[2]
    assert [line["custom_id"] for line in read_jsonl(out)] == [plain["custom_id"]]
    failed = {line["custom_id"]: line["response"] for line in read_jsonl(errors)}
    assert {c: (r["status_code"], r["body"]["error"]["code"]) for c, r in failed.items()} == {
        large["custom_id"]: (413, "request_too_large"),
        deep["custom_id"]: (400, "invalid_request"),
    }
    assert failed[large["custom_id"]]["body"]["error"]["message"] == too_large
    assert failed[large["custom_id"]]["body"]["error"]["param"] is None
    assert len(calls) == 1
