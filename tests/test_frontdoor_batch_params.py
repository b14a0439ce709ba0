"""A batch's requests are checked as the synchronous endpoint of their API checks a body: a
Message Batch's ``params`` as ``/v1/messages``, an OpenAI batch line's ``body`` as
``/v1/chat/completions``. What the endpoint refuses (a field it does not carry, an unknown
one, a value out of its bounds) fails that request alone, named in the endpoint's own words,
never sent on without it; the other requests are served, with every field the endpoint
carries. The official SDKs against a real front door, gateway and mock provider."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anthropic
import openai
import pytest

from queuegate.settings import Settings
from tests.frontdoor_support import Door, open_door
from tests.test_frontdoor_batches import (
    anthropic_ended,
    message_requests,
    openai_ended,
    openai_ended_files,
    openai_lines,
    parse_jsonl,
    upload,
)

REFUSED_PARAMS: dict[str, dict[str, Any]] = {
    # Fields of Anthropic's Messages API the gateway does not carry
    "container": {"container": "container_011CZ"},
    "mcp": {"mcp_servers": [{"type": "url", "url": "https://mcp.example/sse", "name": "x"}]},
    "context": {"context_management": {"edits": [{"type": "clear_tool_uses_20250919"}]}},
    # a field no API has, and values the endpoint refuses
    "unknown": {"frobnicate": True},
    "tier": {"service_tier": "priority"},
    "hot": {"temperature": 1.5},
    "huge": {"max_tokens": 10**7},
}
"""Message Batch requests' params the endpoint refuses, by custom_id, beside their prompt."""
REFUSED_BODIES: dict[str, dict[str, Any]] = {
    "unknown": {"frobnicate": True},
    "typed": {"temperature": "hot"},
    "job-field": {"team": "beta"},
    "huge": {"max_tokens": 10**7},
    "long": {"max_completion_tokens": 10**7},
}
"""OpenAI batch lines' bodies the endpoint refuses, by custom_id, beside their prompt."""


@pytest.fixture
async def door(settings: Settings) -> AsyncIterator[Door]:
    async with open_door(settings) as d:
        yield d


def anthropic_client(door: Door) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=door.url, api_key=door.keys["alpha"], max_retries=0)


async def test_a_message_batch_errors_each_request_messages_would_refuse_and_serves_the_rest(
    door: Door,
) -> None:
    # Given a Message Batch whose requests set fields /v1/messages refuses, beside one that
    # sets none and one with a service tier it takes
    plain, tiered, *refused = message_requests(2 + len(REFUSED_PARAMS))
    tiered["params"]["service_tier"] = "standard_only"
    for request, (custom_id, fields) in zip(refused, REFUSED_PARAMS.items(), strict=True):
        request["custom_id"] = custom_id
        request["params"] |= fields
    async with anthropic_client(door) as client:
        # When it ends
        batch = await client.messages.batches.create(
            requests=[plain, tiered, *refused]  # type: ignore[list-item]
        )
        ended = await anthropic_ended(client, batch.id)
        results = {
            r.custom_id: r.result async for r in await client.messages.batches.results(batch.id)
        }
        # and the same params are sent to /v1/messages
        said: dict[str, str] = {}
        for request in refused:
            params = dict(request["params"])
            with pytest.raises(anthropic.BadRequestError) as sync:
                await client.messages.create(
                    model=params.pop("model"),
                    max_tokens=params.pop("max_tokens"),
                    messages=params.pop("messages"),
                    extra_body=params,
                    timeout=60,  # else the SDK refuses a huge max_tokens unstreamed itself
                )
            said[request["custom_id"]] = sync.value.body["error"]["message"]  # type: ignore[index]

    # Expect each refused request errored, named as /v1/messages names it, under params
    assert (ended.request_counts.succeeded, ended.request_counts.errored) == (2, 7)
    code = "invalid_request: "
    assert said["container"] == code + "container: not supported by this gateway"
    assert said["mcp"].startswith(code + "mcp_servers: Extra inputs are not permitted")
    assert said["context"].startswith(code + "context_management: Extra inputs are not")
    assert said["unknown"].startswith(code + "frobnicate: Extra inputs are not permitted")
    assert said["tier"].startswith(code + "service_tier: Input should be 'auto' or")
    assert said["hot"].startswith(code + "temperature: Input should be less than or equal")
    assert said["huge"] == code + "max_tokens is above 1000000"
    for custom_id in REFUSED_PARAMS:
        result = results[custom_id]
        assert result.type == "errored", custom_id
        assert result.error.error.type == "invalid_request_error"
        assert result.error.error.message == said[custom_id].replace(code, code + "params.")
    # and the others served, the tier they asked for sent on; nothing refused was sent
    assert results[plain["custom_id"]].type == "succeeded"
    assert results[tiered["custom_id"]].type == "succeeded"
    calls = door.gateway.mock.requests
    assert len(calls) == 2
    assert sorted(str(c.body.get("service_tier")) for c in calls if c.body) == [
        "None",
        "standard_only",
    ]


async def test_an_openai_batch_answers_each_line_chat_completions_would_refuse_400(
    door: Door,
) -> None:
    # Given an OpenAI batch file whose lines' bodies /v1/chat/completions refuses, beside
    # one with none and one with a seed it takes
    plain, seeded, *refused = openai_lines(2 + len(REFUSED_BODIES))
    seeded["body"]["seed"] = 7
    for line, (custom_id, fields) in zip(refused, REFUSED_BODIES.items(), strict=True):
        line["custom_id"] = custom_id
        line["body"] |= fields
    async with door.client() as client:
        # When its batch ends
        file_id = await upload(client, [plain, seeded, *refused])
        batch = await client.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        ended, output, errors = await openai_ended_files(client, batch.id)
        # and the same bodies are sent to /v1/chat/completions
        said: dict[str, str] = {}
        for line in refused:
            body = dict(line["body"])
            with pytest.raises(openai.BadRequestError) as sync:
                await client.chat.completions.create(
                    model=body.pop("model"), messages=body.pop("messages"), extra_body=body
                )
            said[line["custom_id"]] = sync.value.body["message"]  # type: ignore[index]

    # Expect the batch completed, each refused line in its error file, answered 400 in
    # OpenAI's batch output format with the endpoint's own message
    assert ended.status == "completed"
    assert ended.request_counts is not None
    counts = ended.request_counts
    assert (counts.total, counts.completed, counts.failed) == (7, 2, 5)
    assert "frobnicate" in said["unknown"] and said["typed"].startswith("temperature:")
    assert "team" in said["job-field"]
    assert said["huge"] == "max_tokens is above 1000000"
    assert said["long"] == "max_completion_tokens is above 1000000"
    params = {e["custom_id"]: e["response"]["body"]["error"]["param"] for e in errors}
    assert (params["huge"], params["long"]) == ("max_tokens", "max_completion_tokens")
    assert sorted(e["custom_id"] for e in errors) == sorted(REFUSED_BODIES)
    for error in errors:
        assert error["id"].startswith("batch_req_") and error["error"] is None
        response = error["response"]
        assert response["status_code"] == 400 and response["request_id"].startswith("req_")
        assert response["body"]["error"]["type"] == "invalid_request_error"
        assert response["body"]["error"]["message"] == said[error["custom_id"]]
    # and the others served, the seed sent on; nothing refused was sent
    assert sorted(o["custom_id"] for o in output) == ["req-0", "req-1"]
    calls = door.gateway.mock.requests
    assert len(calls) == 2
    assert sorted(str(c.body.get("seed")) for c in calls if c.body) == ["7", "None"]


async def test_an_openai_batch_whose_every_line_is_refused_completes_with_its_error_file(
    door: Door,
) -> None:
    # Given an OpenAI batch file each of whose lines sets a temperature that is no number
    lines = openai_lines(2)
    for line in lines:
        line["body"]["temperature"] = "hot"
    async with door.client() as client:
        # When its batch ends
        file_id = await upload(client, lines)
        batch = await client.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        ended = await openai_ended(client, batch.id)
        assert ended.error_file_id
        errors = parse_jsonl(await (await client.files.content(ended.error_file_id)).aread())

    # Expect it completed with no output file, each line answered 400 naming the field:
    # the file was a valid batch (it does not fail whole), its requests what the endpoint
    # refuses
    assert ended.status == "completed" and ended.output_file_id is None
    assert ended.request_counts is not None
    assert (ended.request_counts.total, ended.request_counts.failed) == (2, 2)
    assert sorted(e["custom_id"] for e in errors) == ["req-0", "req-1"]
    for error in errors:
        assert error["response"]["status_code"] == 400
        message = error["response"]["body"]["error"]["message"]
        assert message.startswith("temperature: Input should be a valid number")
    assert door.gateway.mock.requests == []
