"""Text PostgreSQL cannot hold (a NUL byte) in what a request names of the front door's stored
files and batches: an id in the path, a list's cursor or filter, a batch's metadata, a file's
name. Each is answered in the API's error shape (404 for an id nothing can have, 400 naming
the field for the rest), never a bare 500 with a traceback that the SDKs retry."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import anthropic
import httpx
import openai
import pytest

from queuegate.settings import Settings
from tests.dashboard_browser import form_token, signed_in
from tests.frontdoor_support import Door, open_door
from tests.test_frontdoor_batches import jsonl, openai_lines

PATHS_NOT_FOUND = [
    ("GET", "/v1/files/file-%00"),
    ("GET", "/v1/files/file-%00/content"),
    ("DELETE", "/v1/files/file-%00"),
    ("GET", "/v1/batches/batch_%00"),
    ("POST", "/v1/batches/batch_%00/cancel"),
]
"""OpenAI's routes naming a file or batch by id."""
MESSAGE_BATCH_PATHS = [
    ("GET", "/v1/messages/batches/msgbatch_%00"),
    ("GET", "/v1/messages/batches/msgbatch_%00/results"),
    ("POST", "/v1/messages/batches/msgbatch_%00/cancel"),
    ("DELETE", "/v1/messages/batches/msgbatch_%00"),
]
CURSORS = [
    ("/v1/files?after=file-%00", "after"),
    ("/v1/files?purpose=batch%00", "purpose"),
    ("/v1/batches?after=batch_%00", "after"),
]
MESSAGE_BATCH_CURSORS = [
    ("/v1/messages/batches?after_id=msgbatch_%00", "after_id"),
    ("/v1/messages/batches?before_id=%00", "before_id"),
]


@pytest.fixture
async def door(settings: Settings) -> AsyncIterator[Door]:
    async with open_door(settings) as opened:
        yield opened


@pytest.fixture
def tracebacks(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """The front door's log (it serves in the test's process): no request may leave an
    error there."""
    caplog.set_level(logging.ERROR)
    return caplog


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_nul_in_an_id_is_not_found_and_in_a_cursor_a_bad_request_naming_it(
    door: Door, tracebacks: pytest.LogCaptureFixture
) -> None:
    headers = {"Authorization": f"Bearer {door.keys['alpha']}"}
    async with httpx.AsyncClient(base_url=door.url, headers=headers) as client:
        # When each route is called with a NUL in the id it names, or in a cursor or filter
        found = {p: await client.request(m, p) for m, p in PATHS_NOT_FOUND + MESSAGE_BATCH_PATHS}
        cursors = {p: await client.get(p) for p, _ in CURSORS + MESSAGE_BATCH_CURSORS}

    # Expect 404 for an id, in the API's own error shape: OpenAI's
    for _, path in PATHS_NOT_FOUND:
        answer = found[path]
        assert answer.status_code == 404, (path, answer.text)
        assert answer.json()["error"]["code"] == "not_found"
        assert "NUL" in answer.json()["error"]["message"]
    # and Anthropic's under /v1/messages
    for _, path in MESSAGE_BATCH_PATHS:
        answer = found[path]
        assert answer.status_code == 404, (path, answer.text)
        assert answer.json()["type"] == "error"
        assert answer.json()["error"]["type"] == "not_found_error"
    # and 400 naming the query parameter for a cursor or filter
    for path, name in CURSORS:
        answer = cursors[path]
        assert answer.status_code == 400, (path, answer.text)
        error = answer.json()["error"]
        assert error["code"] == "invalid_request" and error["param"] == name
        assert error["message"] == f"{name}: a NUL byte is not allowed"
    for path, name in MESSAGE_BATCH_CURSORS:
        answer = cursors[path]
        assert answer.status_code == 400, (path, answer.text)
        assert answer.json()["error"]["type"] == "invalid_request_error"
        assert answer.json()["error"]["message"].startswith(f"invalid_request: {name}: ")
    # and nothing in the log: none of these is the front door's fault
    assert _errors(tracebacks) == []


async def test_the_sdks_are_told_not_found_at_once_for_an_id_with_a_nul(
    door: Door, tracebacks: pytest.LogCaptureFixture
) -> None:
    seen: list[httpx.Request] = []

    async def count(request: httpx.Request) -> None:
        seen.append(request)

    # Given both SDKs with their default retries
    openai_client = openai.AsyncOpenAI(
        base_url=door.v1,
        api_key=door.keys["alpha"],
        http_client=httpx.AsyncClient(event_hooks={"request": [count]}),
    )
    async with (
        openai_client,
        anthropic.AsyncAnthropic(base_url=door.url, api_key=door.keys["alpha"]) as anthropic_client,
    ):
        # When each reads a file, a batch, a Message Batch named with a NUL
        with pytest.raises(openai.NotFoundError):
            await openai_client.files.retrieve("file-\x00")
        with pytest.raises(openai.NotFoundError):
            await openai_client.batches.retrieve("batch_\x00")
        with pytest.raises(anthropic.NotFoundError):
            await anthropic_client.messages.batches.retrieve("msgbatch_\x00")

    # Expect each told so at once: a 404 the openai SDK does not retry
    assert len(seen) == 2
    assert _errors(tracebacks) == []


async def test_a_nul_in_a_batchs_metadata_input_file_or_file_name_is_a_bad_request(
    door: Door, tracebacks: pytest.LogCaptureFixture
) -> None:
    async with door.client() as client:
        # Given a batch file uploaded
        uploaded = await client.files.create(
            file=("in.jsonl", jsonl(openai_lines(1))), purpose="batch"
        )

        # When a batch of it is created with a NUL in a metadata value, or in a key
        async def create(**fields: object) -> openai.BadRequestError:
            asked = {
                "input_file_id": uploaded.id,
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
                **fields,
            }
            with pytest.raises(openai.BadRequestError) as refused:
                await client.batches.create(**asked)  # type: ignore[arg-type]
            return refused.value

        in_value = await create(metadata={"job": "night\x00ly"})
        in_key = await create(metadata={"jo\x00b": "nightly"})
        in_file_id = await create(input_file_id="file-\x00")
        # and a file is uploaded under a name with a NUL (raw: the SDK's httpx escapes it)
        named = await _upload_named(door, b"in\x00.jsonl")
        listed = [b.id async for b in client.batches.list()]
        files = [f.id async for f in client.files.list()]

    # Expect each a 400 naming the field, and nothing made
    assert in_value.code == "invalid_request" and in_value.param == "metadata.job"
    assert "NUL" in in_value.message
    assert in_key.param is not None and in_key.param.startswith("metadata")
    assert "NUL" in in_key.message
    assert in_file_id.param == "input_file_id" and "NUL" in in_file_id.message
    assert named.status_code == 400, named.text
    assert named.json()["error"]["param"] == "file" and "NUL" in named.json()["error"]["message"]
    assert listed == [] and files == [uploaded.id]
    assert _errors(tracebacks) == []


async def _upload_named(door: Door, filename: bytes) -> httpx.Response:
    boundary = b"qgboundary"
    body = b"".join(
        [
            b"--" + boundary + b'\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n',
            b"batch\r\n--" + boundary + b"\r\n",
            b'Content-Disposition: form-data; name="file"; filename="' + filename + b'"\r\n',
            b"Content-Type: application/jsonl\r\n\r\n" + jsonl(openai_lines(1)) + b"\r\n",
            b"--" + boundary + b"--\r\n",
        ]
    )
    headers = {
        "Authorization": f"Bearer {door.keys['alpha']}",
        "Content-Type": f"multipart/form-data; boundary={boundary.decode()}",
    }
    async with httpx.AsyncClient(base_url=door.url, headers=headers) as client:
        return await client.post("/v1/files", content=body)


async def test_the_dashboard_answers_a_nul_in_a_batch_id_or_filter_with_a_page(
    door: Door, tracebacks: pytest.LogCaptureFixture
) -> None:
    async with httpx.AsyncClient(base_url=door.url) as browser:
        # Given alpha signed in, with the CSRF token of its Batches page
        await signed_in(browser, door.keys["alpha"])
        token = await form_token(browser, "/dashboard/batches")

        # When it posts a cancel of a batch named with a NUL, and asks for the audit log
        # after a cursor with one
        cancel = await browser.post("/dashboard/batches/batch_%00/cancel", data={"csrf": token})
        audit = await browser.get("/dashboard/audit?cursor=%00")

    # Expect a page saying there is no such batch, and one naming the cursor
    assert cancel.status_code == 404 and "text/html" in cancel.headers["content-type"]
    assert "NUL" in cancel.text
    assert audit.status_code == 400 and "cursor" in audit.text
    assert _errors(tracebacks) == []
