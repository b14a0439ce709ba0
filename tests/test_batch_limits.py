"""The front door's limits on a request, applied to each request of a batch as its
synchronous endpoint applies them to a body: a request whose job is larger than
``max_job_bytes`` is answered ``request_too_large`` (413), one of more messages than
``max_job_messages`` or nested deeper than ``MAX_NESTING`` levels 400, each alone, in the
words of the synchronous refusal, while the rest of its batch is served: over HTTP (the
official SDKs) and by ``queuegate batch submit``/``collect`` (a team added the default
way)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import orjson
import pytest
from anthropic.types.messages import MessageBatchResult

from producer.batch.jobs import JobReader
from producer.batch.submitted import SubmittedFile
from queuegate.control import MAX_CUSTOM_ID
from queuegate.request_limits import MAX_NESTING
from queuegate.settings import Settings
from tests.batch_files import openai_line, read_jsonl, write_jsonl
from tests.frontdoor_support import Door, open_door
from tests.support import sized
from tests.teams import TeamIdentity
from tests.test_batch_checks import (
    alpha,
    batch_and_sync,
    message_batch_results,
    submitted_and_collected,
)
from tests.test_frontdoor_batches import (
    message_requests,
    openai_lines,
)

__all__ = ["alpha"]  # the CLI's team, a fixture

JOB_BYTES = 4096
"""The door's ``max_job_bytes``: small, so an oversize request is a few kilobytes."""
LARGE = "x" * (JOB_BYTES + 100)
JOB_MESSAGES = 8
"""The door's ``max_job_messages``."""
DEEP = 150
"""Levels a request nests: past ``MAX_NESTING``, inside what the jobs' JSON carries."""


def long_id(tag: str) -> str:
    """The longest custom_id a batch takes: its job's id and metadata are as long as can be."""
    return tag + "-" * (MAX_CUSTOM_ID - len(tag))


def nested(levels: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(levels - 1):
        value = [value]
    return value


def deep_tool_openai(levels: int = DEEP) -> dict[str, Any]:
    """A chat completions tool whose schema nests ``levels`` levels below the request."""
    schema = {"type": "object", "properties": {"x": {"enum": nested(levels)}}}
    return {"type": "function", "function": {"name": "f", "parameters": schema}}


def deep_tool_anthropic() -> dict[str, Any]:
    return {"name": "f", "input_schema": {"type": "object", "x": nested(DEEP)}}


def assert_errored_as(
    results: dict[str, MessageBatchResult], custom_id: str, error: dict[str, Any]
) -> None:
    """That ``custom_id``'s result errored with ``error``, the body's error of the refusal
    /v1/messages answered the same params with."""
    result = results[custom_id]
    assert result.type == "errored", custom_id
    assert result.error.error.model_dump() == error, custom_id


NULLS = dict.fromkeys(
    ("temperature", "top_p", "presence_penalty", "frequency_penalty", "seed", "stop", "user")
) | {"logprobs": None}
"""Parameters an OpenAI client may send as explicit nulls: its body is larger than the
request it makes, which leaves them out."""


@pytest.fixture
async def door(settings: Settings) -> AsyncIterator[Door]:
    async with open_door(
        settings.model_copy(update={"max_job_bytes": JOB_BYTES, "max_job_messages": JOB_MESSAGES})
    ) as d:
        yield d


async def test_an_openai_batch_answers_an_oversize_and_a_deep_line_alone_as_sync_does(
    door: Door,
) -> None:
    # Given an OpenAI batch with a line past the size limit and one nested 150 levels,
    # beside one served
    plain, large, deep = openai_lines(3)
    large["body"]["messages"][0]["content"] = LARGE
    deep["body"]["tools"] = [deep_tool_openai()]
    # When its batch ends, and the same bodies are sent to /v1/chat/completions
    ended, output, errors, sync = await batch_and_sync(door, plain, [large, deep])

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


@pytest.mark.parametrize("nulls", [False, True], ids=["compact", "nulls"])
async def test_an_openai_batch_takes_a_request_at_the_limit_as_sync_does_and_refuses_one_past(
    door: Door, nulls: bool
) -> None:
    # Given OpenAI batch lines of the longest custom_id, one whose request (its body as
    # compact JSON, what the SDK sends, less the explicit nulls its job leaves out: it keeps
    # three) is exactly the limit and one a byte past it
    kept = dict.fromkeys(("presence_penalty", "frequency_penalty", "logprobs")) if nulls else {}
    at, over = openai_lines(2)
    for line, size in ((at, JOB_BYTES), (over, JOB_BYTES + 1)):
        line["custom_id"] = long_id(line["custom_id"])
        line["body"]["messages"][0]["content"] = sized(size, line["body"]["model"], **kept)
        line["body"] |= NULLS if nulls else {}
    assert (len(orjson.dumps(at["body"])) > JOB_BYTES + 50) == nulls
    # When their batch ends, and the same bodies are sent to /v1/chat/completions through
    # the SDK (nulls and all)
    ended, output, errors, sync = await batch_and_sync(door, at, [over])
    async with door.client() as client:
        served = await client.chat.completions.create(**at["body"])

    # Expect one limit: the request at it served both ways, the one past it refused both
    # ways alike (413, in the same words)
    assert served.choices[0].message.content
    assert ended.status == "completed", ended.errors
    assert [line["custom_id"] for line in output] == [at["custom_id"]]
    assert output[0]["response"]["status_code"] == 200
    [refused] = errors
    assert refused["custom_id"] == over["custom_id"]
    said = sync[over["custom_id"]]
    assert said.status_code == refused["response"]["status_code"] == 413
    assert refused["response"]["body"] == said.response.json()
    assert door.gateway.mock.stats.calls == 2


async def test_a_message_batch_takes_a_request_at_the_limit_as_sync_does_and_refuses_one_past(
    door: Door,
) -> None:
    # Given Message Batch requests of the longest custom_id, one whose request is exactly
    # the limit and one a byte past it
    at, over = message_requests(2)
    for request, size in ((at, JOB_BYTES), (over, JOB_BYTES + 1)):
        request["custom_id"] = long_id(request["custom_id"])
        params = request["params"]
        content = sized(size, params["model"], max_tokens=params["max_tokens"])
        params["messages"][0]["content"] = content
    # When its batch ends, and the same params are sent to /v1/messages
    results = await message_batch_results(door, [at, over])
    async with anthropic.AsyncAnthropic(
        base_url=door.url, api_key=door.keys["alpha"], max_retries=0
    ) as client:
        served = await client.messages.create(**at["params"])
        with pytest.raises(anthropic.APIStatusError) as refused:
            await client.messages.create(**over["params"])

    # Expect one limit: the request at it served both ways, the one past it errored as
    # /v1/messages refuses it (413)
    assert served.content
    assert results[at["custom_id"]].type == "succeeded"
    assert refused.value.status_code == 413
    assert_errored_as(results, over["custom_id"], refused.value.response.json()["error"])
    assert door.gateway.mock.stats.calls == 2


async def test_messages_takes_a_request_sent_with_empties_at_the_limit_as_a_batch_does(
    door: Door,
) -> None:
    # Given Message Batch requests carrying nulls and empties, one whose request (without
    # them) is exactly the limit, its body past it, and one a byte past the limit
    at, over = message_requests(2)
    empties = {"stop_sequences": [], "metadata": {}, "temperature": None, "top_p": None}
    for request, size in ((at, JOB_BYTES), (over, JOB_BYTES + 1)):
        params = request["params"]
        content = sized(size, params["model"], max_tokens=params["max_tokens"])
        params["messages"][0]["content"] = content
        params |= empties
    assert len(orjson.dumps(at["params"])) > JOB_BYTES + 50
    # When its batch ends, and the same params are sent to /v1/messages as they are
    results = await message_batch_results(door, [at, over])
    async with httpx.AsyncClient(
        base_url=door.url, headers={"x-api-key": door.keys["alpha"]}
    ) as client:
        served = await client.post("/v1/messages", json=at["params"])
        refused = await client.post("/v1/messages", json=over["params"])

    # Expect one limit, of the request: the one at it served both ways, the one past it
    # refused both ways alike (413)
    assert served.status_code == 200, served.text
    assert results[at["custom_id"]].type == "succeeded"
    assert refused.status_code == 413
    assert_errored_as(results, over["custom_id"], refused.json()["error"])


async def test_a_body_far_past_the_limit_is_refused_before_it_is_read_whole(
    door: Door,
) -> None:
    # Given a body twice the limit and a byte, of whitespace around a small request
    body = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]'
    padded = body + b" " * (2 * JOB_BYTES + 1 - len(body) - 1) + b"}"
    # When it is sent to /v1/chat/completions
    async with httpx.AsyncClient(
        base_url=door.url, headers={"authorization": f"Bearer {door.keys['alpha']}"}
    ) as client:
        refused = await client.post(
            "/v1/chat/completions", content=padded, headers={"content-type": "application/json"}
        )
    # Expect it refused 413 (a body is read up to twice the limit, no further)
    assert refused.status_code == 413
    assert door.gateway.mock.stats.calls == 0


async def test_a_message_batch_errors_an_oversize_and_a_deep_request_alone_as_sync_does(
    door: Door,
) -> None:
    # Given a Message Batch with a request past the size limit and one nested 150 levels,
    # beside one served
    plain, large, deep = message_requests(3)
    large["params"]["messages"][0]["content"] = LARGE
    deep["params"]["tools"] = [deep_tool_anthropic()]
    # When its batch ends
    results = await message_batch_results(door, [plain, large, deep])
    async with anthropic.AsyncAnthropic(
        base_url=door.url, api_key=door.keys["alpha"], max_retries=0
    ) as client:
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
        assert_errored_as(results, custom_id, said.response.json()["error"])
    assert door.gateway.mock.stats.calls == 1


async def test_a_message_batch_errors_a_request_with_too_many_messages_as_sync_does(
    door: Door,
) -> None:
    # Given a Message Batch with a request of more messages than a job carries, beside one
    # served
    plain, many = message_requests(2)
    many["params"]["messages"] = many["params"]["messages"] * (JOB_MESSAGES + 1)
    # When its batch ends, and the same params are sent to /v1/messages
    results = await message_batch_results(door, [plain, many])
    async with anthropic.AsyncAnthropic(
        base_url=door.url, api_key=door.keys["alpha"], max_retries=0
    ) as client:
        with pytest.raises(anthropic.APIStatusError) as refused:
            await client.messages.create(**many["params"])

    # Expect it errored alone, never published, in the words of /v1/messages' refusal
    assert results[plain["custom_id"]].type == "succeeded"
    assert refused.value.status_code == 400
    assert_errored_as(results, many["custom_id"], refused.value.response.json()["error"])
    assert door.gateway.mock.stats.calls == 1


async def test_a_message_batch_errors_a_request_nested_past_what_orjson_writes_alone(
    door: Door,
) -> None:
    # Given a Message Batch with a request nested 300 levels (orjson writes 254), beside one
    # served, and a create with one nested past what any decoder here reads (sent as bytes:
    # no client's encoder writes it either)
    plain, deep = message_requests(2)
    deep["params"]["tools"] = [{"name": "f", "input_schema": {"type": "object", "x": nested(300)}}]
    levels = 1100
    deepest = b'{"custom_id": "deepest", "params": {"metadata": %s%s}}' % (
        b"[" * levels,
        b"]" * levels,
    )
    body = b'{"requests": [\n%s,\n%s]}' % (orjson.dumps(plain), deepest)
    # When its batch ends
    results = await message_batch_results(door, [plain, deep])
    async with httpx.AsyncClient(base_url=door.url) as http:
        unreadable = await http.post(
            "/v1/messages/batches",
            content=body,
            headers={"x-api-key": door.keys["alpha"], "content-type": "application/json"},
        )

    # Expect it errored alone, not a 500 for the whole batch
    assert results[plain["custom_id"]].type == "succeeded"
    result = results[deep["custom_id"]]
    assert result.type == "errored"
    assert result.error.error.message == (
        f"invalid_request: the request nests deeper than {MAX_NESTING} levels: flatten it"
    )
    # and the unreadable one refused in one line naming it
    assert unreadable.status_code == 400
    said = unreadable.json()["error"]["message"]
    assert said.endswith(
        f"line 3 nests too deep to read: a request may nest at most {MAX_NESTING} levels"
    )
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
    # When the team's CLI submits it and collects it, failures apart
    submitted, collected, calls = await submitted_and_collected(settings, alpha, source, "limits")

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


async def test_the_cli_serves_a_request_at_the_limit_and_refuses_one_past_it(
    settings: Settings, tmp_path: Path, alpha: TeamIdentity
) -> None:
    # Given an OpenAI-format file of the longest custom_ids, with a request exactly at the
    # gateway's 1 MiB limit and one a byte past it
    at, over = openai_line(0), openai_line(1)
    for line, size in ((at, settings.max_job_bytes), (over, settings.max_job_bytes + 1)):
        line["custom_id"] = long_id(line["custom_id"])
        line["body"]["messages"][0]["content"] = sized(size, line["body"]["model"])
    source = write_jsonl(tmp_path / "edge.jsonl", [at, over])
    # When the team's CLI submits it and collects it
    submitted, collected, calls = await submitted_and_collected(settings, alpha, source, "edge")

    # Expect the one at the limit published and served (its worker takes it), the one past
    # it refused at submit and answered 413, as /v1/chat/completions answers them
    code, stdout, stderr = submitted
    assert code == 0, stderr
    too_large = f"the request is larger than {settings.max_job_bytes} bytes: send less"
    assert stderr.count(too_large) == 1 and f"{source}:2: {too_large}" in stderr
    assert "1 refused" in stdout
    assert collected[0] == 0, collected[2]
    assert [line["custom_id"] for line in read_jsonl(tmp_path / "out.jsonl")] == [at["custom_id"]]
    failed = {line["custom_id"]: line["response"] for line in read_jsonl(tmp_path / "errors.jsonl")}
    assert {c: r["status_code"] for c, r in failed.items()} == {over["custom_id"]: 413}
    assert len(calls) == 1


async def test_the_cli_errors_an_anthropic_request_with_too_many_messages_alone(
    settings: Settings, tmp_path: Path, alpha: TeamIdentity
) -> None:
    # Given an Anthropic-format file with a request of more messages than a job carries,
    # beside one served
    plain, many = message_requests(2)
    many["params"]["messages"] = many["params"]["messages"] * (settings.max_job_messages + 1)
    source = write_jsonl(tmp_path / "many.jsonl", [plain, many])
    # When the team's CLI submits it and collects it
    submitted, collected, calls = await submitted_and_collected(settings, alpha, source, "many")

    # Expect the submit to name it refused, never published, and collect to error it alone
    said = f"{settings.max_job_messages + 1} messages; at most {settings.max_job_messages} are"
    code, stdout, stderr = submitted
    assert code == 0, stderr
    assert f"{source}:2: {said}" in stderr
    assert "1 refused" in stdout
    assert collected[0] == 0, collected[2]
    lines = read_jsonl(tmp_path / "out.jsonl") + read_jsonl(tmp_path / "errors.jsonl")
    results = {line["custom_id"]: line["result"] for line in lines}
    assert results[plain["custom_id"]]["type"] == "succeeded"
    assert results[many["custom_id"]]["type"] == "errored"
    assert said in results[many["custom_id"]]["error"]["error"]["message"]
    assert len(calls) == 1


def test_a_file_read_again_for_its_jobs_passes_over_a_request_nested_past_orjson(
    tmp_path: Path,
) -> None:
    # Given a submitted file with a line nested 300 levels (orjson writes 254), refused at
    # submit, beside one published (written by the json module, which writes it)
    plain, deep = openai_line(0), openai_line(1)
    deep["body"]["tools"] = [deep_tool_openai(300)]
    source = tmp_path / "deep.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in (plain, deep)))
    reader = JobReader(batch="deep", jobs="deep.0", team="alpha", model=None, deadline=None)

    # When it is read again for the published line's job (collect asking for it again)
    submitted = SubmittedFile.read(source, reader, hashlib.sha256(source.read_bytes()).hexdigest())
    assert submitted is not None
    try:
        jobs = submitted.jobs([(plain["custom_id"], 1)])
    finally:
        submitted.close()

    # Expect that job, as submit made it
    assert [job.metadata["custom_id"] for job in jobs] == [plain["custom_id"]]
