"""Hostile input at the front door: a clear 4xx in OpenAI's shape, nothing published, the
service unharmed; and no key, prompt or provider secret in any log line."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest

from queuegate.settings import Settings
from tests.frontdoor_support import HELLO, Door, open_door

SECRET_PROMPT = "my-secret-prompt-7f3a9c"


@pytest.fixture
async def door(settings: Settings) -> AsyncIterator[Door]:
    settings = settings.model_copy(
        update={"max_job_bytes": 4096, "max_job_messages": 8, "http_body_timeout": 0.5}
    )
    async with open_door(settings) as opened:
        yield opened


def auth(door: Door) -> dict[str, str]:
    return {"Authorization": f"Bearer {door.keys['alpha']}"}


def chat(**fields: object) -> bytes:
    """A chat request's body with ``fields`` changed."""
    return orjson.dumps({"model": "gpt-4o-mini", "messages": [USER], **fields})


USER = {"role": "user", "content": "x"}
PAST_LIMIT = "the request is larger than 4096 bytes: send less"
"""A request past the door's ``max_job_bytes``, its body read."""
PAST_BODY_BOUND = (
    "the request is larger than the 4096-byte limit (its body is over 8192 bytes, which no "
    "request within the limit reaches): send less"
)
"""A body past twice ``max_job_bytes``, refused unread: the limit named is the same."""


def _nested(levels: int) -> list[object]:
    nested: list[object] = []
    for _ in range(levels):
        nested = [nested]
    return nested


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"x": _nested(390)}}}
DEEP = json.dumps({"model": "gpt-4o-mini", "messages": [USER], "tools": [TOOL]}).encode()
"""Past what orjson writes (254 levels), as a client's own encoder may send it."""


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (b"{not json", 400, "not valid JSON"),
        (chat()[:-3] + b'\xff\xfe"}]}', 400, "UTF-8"),
        # Said to be "not UTF-8", which it is
        (b"\xef\xbb\xbf" + chat(), 400, "starts with a byte-order mark (EF BB BF): send"),
        (b"[1, 2]", 400, "must be a JSON object"),
        (chat(model=42), 400, "model must be a non-empty string"),
        (chat(messages="hi"), 400, "messages must be a non-empty array"),
        (chat(messages=[{"role": "wizard", "content": "x"}]), 400, "role"),
        (chat(max_tokens="lots"), 400, "max_tokens"),
        (chat(max_tokens=10**11), 400, "max_tokens is above"),
        (chat(stream="yes"), 400, "stream: Input should be a valid boolean"),
        (chat(messages=[USER] * 9), 400, "9 messages"),
        (chat(messages=[{"role": "user", "content": "x" * 5000}]), 413, PAST_LIMIT),
        # A tool schema nested 390 levels was a 500: too deep for the job's JSON encoder
        (DEEP, 400, "nests deeper than 100 levels"),
    ],
)
async def test_a_bad_body_is_a_clear_4xx_and_nothing_is_published(
    door: Door, body: bytes, status: int, says: str
) -> None:
    async with httpx.AsyncClient(base_url=door.url) as http:
        response = await http.post(
            "/v1/chat/completions",
            content=body,
            headers={**auth(door), "content-type": "application/json"},
        )
        assert response.status_code == status, response.text
        assert says in response.json()["error"]["message"]
        # ... and the service is unharmed
        fine = await http.post(
            "/v1/chat/completions",
            json={"model": "gpt-4o-mini", "messages": HELLO},
            headers=auth(door),
        )
    assert fine.status_code == 200
    assert door.gateway.mock.stats.calls == 1
    assert len(await door.gateway.usage_rows(1)) == 1


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "streamed"])
async def test_a_body_past_twice_the_limit_is_refused_naming_the_limit(
    door: Door, path: str, declared: bool
) -> None:
    # Given a body of 9,000 bytes, past twice the door's 4,096-byte request limit, its
    # Content-Length sent or streamed without one
    body = orjson.dumps({"model": "gpt-4o-mini", "max_tokens": 8, "messages": [USER]})
    body = body[:-1] + b"," + b" " * (9000 - len(body)) + b"}"

    async def streamed() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 1000):
            yield body[start : start + 1000]

    # When it is sent
    async with httpx.AsyncClient(base_url=door.url) as http:
        response = await http.post(
            path,
            content=body if declared else streamed(),
            headers={**auth(door), "content-type": "application/json"},
        )

    # Expect it refused 413 with the limit a request within it is held to, as a request
    # past that limit is (not the body's bound, which read as a second limit), unpublished
    assert response.status_code == 413, response.text
    assert PAST_BODY_BOUND in response.text
    assert door.gateway.mock.stats.calls == 0


async def test_a_slow_body_is_408_and_holds_only_its_own_connection(door: Door) -> None:
    async def trickle() -> AsyncIterator[bytes]:
        yield b'{"model": "gpt-4o-mini", '
        await asyncio.sleep(2)  # longer than the body timeout: the server gives up first
        yield b'"messages": []}'

    async with httpx.AsyncClient(base_url=door.url, timeout=10) as http:
        slow = asyncio.create_task(
            http.post("/v1/chat/completions", content=trickle(), headers=auth(door))
        )
        # Meanwhile another request is served at once
        fine = await http.post(
            "/v1/chat/completions",
            json={"model": "gpt-4o-mini", "messages": HELLO},
            headers=auth(door),
        )
        assert fine.status_code == 200
        response = await slow
    assert response.status_code == 408
    assert response.json()["error"]["code"] == "request_timeout"
    assert door.gateway.mock.stats.calls == 1


async def test_unknown_routes_and_methods_answer_in_the_same_shape(door: Door) -> None:
    async with httpx.AsyncClient(base_url=door.url) as http:
        missing = await http.get("/v1/nothing", headers=auth(door))
        wrong = await http.get("/v1/chat/completions", headers=auth(door))
        wrong_claude = await http.get("/v1/messages", headers=auth(door))
        bad_wait = await http.get("/v1/jobs/x", params={"wait": "forever"}, headers=auth(door))
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    # A method a route does not serve is the caller's mistake in either API's types, as a 4xx
    assert wrong.status_code == wrong_claude.status_code == 405
    assert wrong.json()["error"]["type"] == "invalid_request_error"
    assert wrong_claude.json()["error"]["type"] == "invalid_request_error"
    assert bad_wait.status_code == 400
    assert bad_wait.json()["error"]["code"] == "invalid_request"


async def test_no_key_prompt_or_provider_secret_in_any_log_line(
    door: Door, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    # The broker client dumps whole frames at DEBUG; a service logs it at WARNING at most
    # (queuegate.runtime.configure_logging).
    for name in ("aiormq", "aio_pika"):
        caplog.set_level(logging.WARNING, logger=name)
    key = door.keys["alpha"]
    async with httpx.AsyncClient(base_url=door.url) as http:
        for headers in (auth(door), {"x-api-key": key + "x"}, {"X-Gateway-Key": key}):
            await http.post(
                "/v1/chat/completions",
                json={
                    "model": "gpt-4o-mini",
                    "messages": [{"role": "user", "content": SECRET_PROMPT}],
                },
                headers=headers,
            )
        await http.post(
            "/v1/chat/completions",
            json={"model": "no-such", "messages": [{"role": "user", "content": SECRET_PROMPT}]},
            headers=auth(door),
        )
    await door.gateway.usage_rows(2)
    logged = caplog.text
    for secret in (key, key.split("_", 2)[2], SECRET_PROMPT, "sk-test-mock"):
        assert secret not in logged
