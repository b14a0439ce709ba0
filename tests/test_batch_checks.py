"""One check of a batch's requests, however the batch comes in: ``queuegate batch submit``
checks each request as the front door's synchronous endpoint of its API checks a body (a
Message Batch request's ``params`` as ``/v1/messages``, an OpenAI line's ``body`` as
``/v1/chat/completions``), names each one refused, never publishes it, and ``collect``
answers it a failed line in the batch's format (an ``errored`` result; an error line
answered 400, its ``param`` named) while the rest are served. The HTTP batch APIs refuse
a create request's fields their API does not have, by name, and an OpenAI batch's error
line names the field at fault in ``param`` as the synchronous error does. The CLI runs as
a team added the default way; the HTTP APIs through the official SDKs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import orjson
import pytest
from anthropic.types.messages import MessageBatchIndividualResponse, MessageBatchResult
from openai.types import Batch

from queuegate.settings import Settings
from tests.batch_files import kill, openai_line, read_jsonl, start_cli, write_jsonl
from tests.frontdoor_support import Door, open_door
from tests.support import running_gateway, wait_until
from tests.teams import TeamIdentity, team_identities
from tests.test_frontdoor_batches import (
    anthropic_ended,
    message_requests,
    openai_ended,
    openai_ended_files,
    openai_lines,
    parse_jsonl,
    upload,
)

REFUSED_PARAMS: dict[str, tuple[dict[str, Any], str]] = {
    # Fields of Anthropic's Messages API the gateway does not carry, and one no API has:
    # (params beside the prompt, what /v1/messages says of them, under params)
    "container": (
        {"container": "container_011CZ"},
        "params.container: not supported by this gateway",
    ),
    "mcp": (
        {"mcp_servers": [{"type": "url", "url": "https://mcp.example/sse", "name": "x"}]},
        "params.mcp_servers: Extra inputs are not permitted",
    ),
    "unknown": ({"frobnicate": True}, "params.frobnicate: Extra inputs are not permitted"),
    "huge": ({"max_tokens": 10**7}, "params.max_tokens is above 1000000"),
    # /v1/messages streams it; a batch cannot (Anthropic types a batch request's params
    # MessageCreateParamsNonStreaming)
    "stream": (
        {"stream": True},
        "params.stream: a Message Batch request cannot stream; remove stream",
    ),
}
REFUSED_BODIES: dict[str, tuple[dict[str, Any], str | None]] = {
    # (body beside the prompt, the param /v1/chat/completions names)
    "unknown": ({"frobnicate": True}, None),
    "typed": ({"temperature": "hot"}, "temperature"),
    "bounds": ({"temperature": 3}, "temperature"),
    "huge": ({"max_tokens": 10**7}, "max_tokens"),
}
JOB_REFUSED: dict[str, dict[str, Any]] = {
    # Bodies /v1/chat/completions' schema takes and the job it would make refuses (beside
    # the prompt): the endpoint answers 400, naming the field
    "both-limits": {"max_tokens": 5, "max_completion_tokens": 5},
    "seed": {"seed": 2**63},  # one past the 64-bit integers PostgreSQL stores
}


def with_cases(
    lines: list[dict[str, Any]], cases: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """OpenAI batch ``lines``: the first as it is, each next one a case, named by its
    ``custom_id`` and given the case's fields beside its prompt."""
    plain, *others = lines
    for line, (custom_id, fields) in zip(others, cases.items(), strict=True):
        line["custom_id"] = custom_id
        line["body"] |= fields
    return [plain, *others]


@pytest.fixture
async def alpha(settings: Settings) -> AsyncIterator[TeamIdentity]:
    """A team added the default way: its own broker user."""
    async with team_identities(settings) as identities:
        yield identities["alpha"]


async def cli(team: TeamIdentity, *args: str) -> tuple[int, str, str]:
    process = start_cli(team.settings, "batch", *args, "--team", team.team)
    stdout, stderr = await asyncio.to_thread(process.communicate)
    # The summary as one line, whatever width the terminal wraps it at.
    return process.returncode, " ".join(stdout.decode().split()), stderr.decode()


async def submitted_and_collected(
    settings: Settings, team: TeamIdentity, source: Path, name: str
) -> tuple[tuple[int, str, str], tuple[int, str, str], list[Any]]:
    """The team's CLI's submit of ``source`` as batch ``name`` and its collect into
    ``<source dir>/out.jsonl`` and ``errors.jsonl`` (failures apart), as (code, stdout,
    stderr) each, and the requests the provider was sent meanwhile."""
    out, errors = source.parent / "out.jsonl", source.parent / "errors.jsonl"
    async with running_gateway(settings) as gateway:
        submitted = await cli(team, "submit", str(source), "--name", name)
        collected = await cli(team, "collect", name, "--out", str(out), "--errors", str(errors))
        return submitted, collected, list(gateway.mock.requests)


async def test_the_cli_errors_each_anthropic_request_messages_would_refuse_and_serves_the_rest(
    settings: Settings, tmp_path: Path, alpha: TeamIdentity
) -> None:
    # Given an Anthropic-format file whose requests set fields /v1/messages refuses, beside
    # one that sets none
    plain, *refused = message_requests(1 + len(REFUSED_PARAMS))
    for request, (custom_id, (fields, _)) in zip(refused, REFUSED_PARAMS.items(), strict=True):
        request["custom_id"] = custom_id
        request["params"] |= fields
    source = write_jsonl(tmp_path / "checked.jsonl", [plain, *refused])
    out = tmp_path / "out.jsonl"
    async with running_gateway(settings) as gateway:
        # When the team's CLI submits it and collects it
        submitted = await cli(alpha, "submit", str(source), "--name", "checked")
        collected = await cli(alpha, "collect", "checked", "--out", str(out))
        calls = [call.body for call in gateway.mock.requests]

    # Expect the submit to go on, naming each refused request by its line and field
    code, stdout, stderr = submitted
    assert code == 0, stderr
    for number, (_, said) in enumerate(REFUSED_PARAMS.values(), start=2):
        assert f"{source}:{number}: {said}" in stderr
    assert f"{len(REFUSED_PARAMS)} refused" in stdout
    assert collected[0] == 0, collected[2]
    assert f"{len(REFUSED_PARAMS)} refused at submit" in collected[1]
    # and each refused request errored once, in the words of /v1/messages, the other served
    results = {
        r.custom_id: r.result
        for r in map(MessageBatchIndividualResponse.model_validate, read_jsonl(out))
    }
    assert len(read_jsonl(out)) == len(results) == 1 + len(REFUSED_PARAMS)
    assert results[plain["custom_id"]].type == "succeeded"
    for custom_id, (_, said) in REFUSED_PARAMS.items():
        result = results[custom_id]
        assert result.type == "errored", custom_id
        assert result.error.error.type == "invalid_request_error"
        assert result.error.error.message == f"invalid_request: {said}"
    # and nothing refused reached a provider
    assert len(calls) == 1


async def test_the_cli_answers_each_openai_line_chat_completions_would_refuse_400(
    settings: Settings, tmp_path: Path, alpha: TeamIdentity
) -> None:
    # Given an OpenAI-format file whose lines' bodies /v1/chat/completions refuses, beside
    # one with none
    cases = {custom_id: fields for custom_id, (fields, _) in REFUSED_BODIES.items()}
    plain, *refused = with_cases([openai_line(i) for i in range(1 + len(cases))], cases)
    source = write_jsonl(tmp_path / "checked.jsonl", [plain, *refused])
    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    # When the team's CLI submits it and collects it, failures apart
    submitted, collected, calls = await submitted_and_collected(settings, alpha, source, "checked")

    # Expect each refused line named, and answered 400 in OpenAI's batch output format,
    # its param named as the endpoint names it; the other served
    assert submitted[0] == 0, submitted[2]
    assert "frobnicate" in submitted[2] and f"{source}:3: temperature:" in submitted[2]
    assert collected[0] == 0, collected[2]
    assert [line["custom_id"] for line in read_jsonl(out)] == [plain["custom_id"]]
    failed = {line["custom_id"]: line for line in read_jsonl(errors)}
    assert sorted(failed) == sorted(REFUSED_BODIES)
    for custom_id, (_, param) in REFUSED_BODIES.items():
        response = failed[custom_id]["response"]
        assert response["status_code"] == 400
        error = response["body"]["error"]
        assert error["type"] == "invalid_request_error"
        assert error["param"] == param, custom_id
    assert "frobnicate" in failed["unknown"]["response"]["body"]["error"]["message"]
    assert len(calls) == 1


async def test_a_killed_cli_collect_answers_each_refused_request_once_when_run_again(
    settings: Settings, tmp_path: Path, alpha: TeamIdentity
) -> None:
    # Given a batch with a request asking for a container, submitted while no worker serves
    # the team, and its collect killed once it wrote the refused request's line
    plain, refused = message_requests(2)
    refused["params"]["container"] = "container_011CZ"
    source = write_jsonl(tmp_path / "checked.jsonl", [plain, refused])
    out = tmp_path / "out.jsonl"
    async with running_gateway(settings, teams=("gamma",)):
        assert (await cli(alpha, "submit", str(source), "--name", "checked"))[0] == 0
        process = start_cli(
            alpha.settings, *("batch", "collect", "checked", "--team", "alpha"), "--out", str(out)
        )
        await wait_until(lambda: out.exists() and out.read_bytes().endswith(b"\n"))
        kill(process)
    # When it is collected again, once a worker serves the team
    async with running_gateway(settings):
        code, _, stderr = await cli(alpha, "collect", "checked", "--out", str(out))

    # Expect each request once: the refused one errored, the other served
    assert code == 0, stderr
    results = {line["custom_id"]: line["result"]["type"] for line in read_jsonl(out)}
    assert len(read_jsonl(out)) == 2
    assert results == {plain["custom_id"]: "succeeded", refused["custom_id"]: "errored"}


async def test_a_cli_batch_whose_every_request_is_refused_publishes_nothing(
    settings: Settings, tmp_path: Path, alpha: TeamIdentity
) -> None:
    # Given an Anthropic-format file each of whose requests asks for a container
    requests = message_requests(2)
    for request in requests:
        request["params"]["container"] = "container_011CZ"
    source = write_jsonl(tmp_path / "checked.jsonl", requests)
    async with running_gateway(settings) as gateway:
        # When the team's CLI submits it
        code, _, stderr = await cli(alpha, "submit", str(source), "--name", "checked")
        listed = await cli(alpha, "list")

    # Expect it refused, each request named, and no batch left behind
    assert code == 1
    assert f"{source}:1: params.container: not supported by this gateway" in stderr
    assert f"{source}:2: params.container" in stderr
    assert "has no batch" in listed[1]
    assert gateway.mock.requests == []


async def test_the_cli_answers_each_openai_line_its_job_would_refuse_400_not_the_batch(
    settings: Settings, tmp_path: Path, alpha: TeamIdentity
) -> None:
    # Given an OpenAI-format file whose lines' bodies make jobs the gateway refuses, beside
    # one that makes a valid job
    lines = with_cases([openai_line(i) for i in range(1 + len(JOB_REFUSED))], JOB_REFUSED)
    source = write_jsonl(tmp_path / "jobs.jsonl", lines)
    plain = lines[0]
    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    # When the team's CLI submits it and collects it, failures apart
    submitted, collected, calls = await submitted_and_collected(settings, alpha, source, "jobs")

    # Expect the batch to go on, each refused line named by its line and field
    assert submitted[0] == 0, submitted[2]
    assert f"{source}:2: max_tokens: set together with max_completion_tokens" in submitted[2]
    assert f"{source}:3: seed:" in submitted[2]
    assert f"{len(JOB_REFUSED)} refused" in submitted[1]
    # and each answered 400, its param named, the other served
    assert collected[0] == 0, collected[2]
    assert [line["custom_id"] for line in read_jsonl(out)] == [plain["custom_id"]]
    failed = {line["custom_id"]: line["response"] for line in read_jsonl(errors)}
    assert {c: (r["status_code"], r["body"]["error"]["param"]) for c, r in failed.items()} == {
        "both-limits": (400, "max_tokens"),
        "seed": (400, "seed"),
    }
    assert len(calls) == 1


async def test_the_cli_refuses_a_requests_document_with_keys_beside_requests(
    settings: Settings, tmp_path: Path, alpha: TeamIdentity
) -> None:
    # Given a {"requests": [...]} document with a key meant for the batch beside them
    source = tmp_path / "doc.json"
    source.write_bytes(orjson.dumps({"model": "claude-haiku", "requests": message_requests(1)}))
    async with running_gateway(settings) as gateway:
        # When the team's CLI submits it
        code, _, stderr = await cli(alpha, "submit", str(source), "--name", "doc")
        listed = await cli(alpha, "list")

    # Expect it refused in one line naming the key and what to do, nothing published
    assert code == 1
    [said] = [line for line in stderr.splitlines() if "doc.json" in line]
    assert "unknown top-level key 'model' beside \"requests\", nothing published" in said
    assert "remove the rest (options go on the command line)" in said
    assert "has no batch" in listed[1]
    assert gateway.mock.requests == []


@pytest.fixture
async def door(settings: Settings) -> AsyncIterator[Door]:
    async with open_door(settings) as d:
        yield d


async def test_an_openai_batch_create_refuses_fields_it_does_not_have_by_name(
    door: Door,
) -> None:
    async with door.client() as client:
        file_id = await upload(client, openai_lines(1))
        asked = {
            "input_file_id": file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        }
        # When a batch is created with fields OpenAI's batch create does not have
        with pytest.raises(openai.BadRequestError) as unknown:
            await client.batches.create(
                **asked,  # type: ignore[arg-type]
                extra_body={"frobnicate": True, "priority": "high"},
            )
        # or with one it has and the gateway does not carry
        with pytest.raises(openai.BadRequestError) as unsupported:
            await client.batches.create(
                **asked,  # type: ignore[arg-type]
                output_expires_after={"anchor": "created_at", "seconds": 3600},
            )
        # Expect each refused, named; every field the SDK sends otherwise is taken
        made = await client.batches.create(**asked, metadata={"run": "nightly"})  # type: ignore[arg-type]
        listed = await client.batches.list()

    message = str(unknown.value.body["message"])  # type: ignore[index]
    assert "unrecognized request arguments frobnicate, priority" in message
    assert unsupported.value.param == "output_expires_after"
    assert "output_expires_after: not supported by this gateway" in str(unsupported.value)
    assert made.metadata == {"run": "nightly"}
    assert [b.id for b in listed.data] == [made.id]


async def test_a_message_batch_create_refuses_keys_beside_requests_by_name(door: Door) -> None:
    async with anthropic.AsyncAnthropic(
        base_url=door.url, api_key=door.keys["alpha"], max_retries=0
    ) as client:
        # When a Message Batch is created with a key beside its requests
        with pytest.raises(anthropic.BadRequestError) as refused:
            await client.messages.batches.create(
                requests=message_requests(1),  # type: ignore[arg-type]
                extra_body={"frobnicate": True},
            )
        # Expect it refused, named; the SDK's own request is taken
        made = await client.messages.batches.create(requests=message_requests(1))  # type: ignore[arg-type]
        listed = [b.id async for b in client.messages.batches.list()]

    message = refused.value.body["error"]["message"]  # type: ignore[index]
    assert message == "invalid_request: frobnicate: Extra inputs are not permitted"
    assert listed == [made.id]


async def test_an_openai_batch_error_line_names_its_param_as_the_sync_error_does(
    door: Door,
) -> None:
    # Given an OpenAI batch line whose temperature is out of bounds, beside one served
    plain, hot = openai_lines(2)
    hot["body"]["temperature"] = 3
    async with door.client() as client:
        # When its batch ends
        file_id = await upload(client, [plain, hot])
        batch = await client.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        ended = await openai_ended(client, batch.id)
        assert ended.error_file_id
        errors = parse_jsonl(await (await client.files.content(ended.error_file_id)).aread())
        # and the same body is sent to /v1/chat/completions
        body = dict(hot["body"])
        with pytest.raises(openai.BadRequestError) as sync:
            await client.chat.completions.create(
                model=body.pop("model"), messages=body.pop("messages"), extra_body=body
            )

    # Expect its error line's param the one the synchronous error names
    assert sync.value.param == "temperature"
    [line] = errors
    assert line["custom_id"] == hot["custom_id"]
    error = line["response"]["body"]["error"]
    assert error["param"] == sync.value.param
    assert error["message"] == sync.value.body["message"]  # type: ignore[index]


async def batch_and_sync(
    door: Door, plain: dict[str, Any], refused: list[dict[str, Any]]
) -> tuple[Batch, list[dict[str, Any]], list[dict[str, Any]], dict[str, openai.APIStatusError]]:
    """The OpenAI batch of ``plain`` and ``refused`` lines once it ended, its output and
    error lines, and by custom_id the error /v1/chat/completions answers each refused
    line's body with."""
    async with door.client() as client:
        file_id = await upload(client, [plain, *refused])
        batch = await client.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        ended, output, errors = await openai_ended_files(client, batch.id)
        sync: dict[str, openai.APIStatusError] = {}
        for line in refused:
            body = dict(line["body"])
            with pytest.raises(openai.APIStatusError) as refusal:
                await client.chat.completions.create(
                    model=body.pop("model"), messages=body.pop("messages"), extra_body=body
                )
            sync[line["custom_id"]] = refusal.value
    return ended, output, errors, sync


async def test_an_openai_batch_answers_a_line_its_job_would_refuse_as_the_sync_endpoint_does(
    door: Door,
) -> None:
    # Given OpenAI batch lines whose bodies make jobs the gateway refuses, beside one served
    plain, *refused = with_cases(openai_lines(1 + len(JOB_REFUSED)), JOB_REFUSED)
    # When their batch ends, and the same bodies are sent to /v1/chat/completions
    ended, output, errors, sync = await batch_and_sync(door, plain, refused)

    # Expect the batch completed, the plain line served, and each refused line alone
    # answered 400 with the synchronous error's message and param
    assert ended.status == "completed", ended.errors
    assert [line["custom_id"] for line in output] == [plain["custom_id"]]
    assert sorted(line["custom_id"] for line in errors) == sorted(JOB_REFUSED)
    for line in errors:
        response = line["response"]
        assert response["status_code"] == 400
        error, said = response["body"]["error"], sync[line["custom_id"]]
        assert said.status_code == 400
        assert (error["message"], error["param"]) == (said.body["message"], said.param)  # type: ignore[index]
    assert door.gateway.mock.stats.calls == 1


async def message_batch_results(
    door: Door, requests: list[dict[str, Any]]
) -> dict[str, MessageBatchResult]:
    """The result of each of a Message Batch's ``requests``, by custom_id, once it ended."""
    async with anthropic.AsyncAnthropic(
        base_url=door.url, api_key=door.keys["alpha"], max_retries=0
    ) as client:
        batch = await client.messages.batches.create(requests=requests)  # type: ignore[arg-type]
        await anthropic_ended(client, batch.id)
        return {
            r.custom_id: r.result async for r in await client.messages.batches.results(batch.id)
        }


async def test_a_message_batch_errors_a_request_asking_to_stream(door: Door) -> None:
    # Given a Message Batch request asking to stream, beside one that does not
    plain, streamed = message_requests(2)
    streamed["params"]["stream"] = True
    # When its batch ends
    results = await message_batch_results(door, [plain, streamed])

    # Expect it errored by name, never sent; the other served
    assert results[plain["custom_id"]].type == "succeeded"
    result = results[streamed["custom_id"]]
    assert result.type == "errored"
    assert result.error.error.message == (
        "invalid_request: params.stream: a Message Batch request cannot stream; remove stream"
    )
    assert door.gateway.mock.stats.calls == 1
