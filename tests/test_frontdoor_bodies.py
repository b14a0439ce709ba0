"""Request bodies at the front door: a key is proven from the headers before any byte of the
body is read, and a process reads only so many bodies at once, per key, keyless and in bytes
(per team and in all), so slow bodies cannot hold its memory, nor one key's uploads its
connections, nor one team's keys every other team's share. Raw sockets send
the slow bodies, as only a hostile client would; the openai SDK sends the requests that must
be served or refused."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httpx
import openai
import orjson
import pytest

from queuegate.db import create_pool
from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from tests.dashboard_browser import form_token, signed_in
from tests.frontdoor_support import HELLO, Door, issue_key, open_door

TEAMS = {"alpha": TeamConfig(), "beta": TeamConfig(), "gamma": TeamConfig()}
BODIES_PER_KEY = 2
JOB_BYTES = 2048
BODY_BYTES = 2 * JOB_BYTES
"""The largest body the door reads (``Settings.max_body_bytes``), a team's least share."""
BYTES_IN_FLIGHT = 10_000
SLOW = 2000
"""The Content-Length of a slow body: a key's two of them fit in its team's share of the
process's bytes (``BODY_BYTES``, the least it may be)."""
MAX_CONNECTIONS = BODIES_PER_KEY + 2
UPLOADS = {
    "/v1/files": "multipart/form-data; boundary=b",
    "/v1/messages/batches": "application/json",
}
"""The routes that read a body for minutes (``QUEUEGATE_BATCH_UPLOAD_TIMEOUT``), and theirs."""

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def _limited(settings: Settings, **more: int) -> Settings:
    """The test's body limits on ``settings``, and ``more``."""
    limits = {
        "max_job_bytes": JOB_BYTES,
        "http_bodies_per_key": BODIES_PER_KEY,
        # as many requests in progress as bodies, so that the bodies' limit is the one met
        "http_requests_per_team": BODIES_PER_KEY,
        "http_body_bytes_in_flight": BYTES_IN_FLIGHT,
    }
    return settings.model_copy(update={**limits, **more})


@pytest.fixture
async def door(settings: Settings) -> AsyncIterator[Door]:
    async with open_door(_limited(settings), TEAMS) as opened:
        yield opened


@pytest.fixture
async def small_door(settings: Settings) -> AsyncIterator[Door]:
    """A process that holds only a few connections more than one key's bodies."""
    async with open_door(_limited(settings, http_max_connections=MAX_CONNECTIONS), TEAMS) as opened:
        yield opened


def head(
    length: int,
    key: str | None = None,
    *extra: str,
    path: str = "/v1/chat/completions",
    content_type: str = "application/json",
) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        "Host: gateway",
        f"Content-Type: {content_type}",
        f"Content-Length: {length}",
        *extra,
    ]
    if key is not None:
        lines.append(f"Authorization: Bearer {key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def connect(door: Door, source: str | None = None) -> Connection:
    """A connection to the front door, from the loopback address ``source`` when given
    (all of 127.0.0.0/8 is this host's: one attacker, many client addresses)."""
    url = urlsplit(door.url)
    local = None if source is None else (source, 0)
    return await asyncio.open_connection(url.hostname, url.port, local_addr=local)


async def status_of(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """The status and head of the answer, read as soon as it starts."""
    async with asyncio.timeout(10):
        answer_head = await reader.readuntil(b"\r\n\r\n")
    return int(answer_head.split()[1]), answer_head.lower()


@contextlib.asynccontextmanager
async def slow_bodies(door: Door, teams: list[str]) -> AsyncIterator[None]:
    """A body of ``SLOW`` bytes being read, one byte of it sent, for each of ``teams``."""
    connections = [await connect(door) for _ in teams]
    try:
        for (reader, writer), team in zip(connections, teams, strict=True):
            writer.write(head(SLOW, door.keys[team], "Expect: 100-continue"))
            # The server says to go on once it reads the body: it holds its place by then.
            async with asyncio.timeout(10):
                assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(b"{")
            await writer.drain()
        yield
    finally:
        for _, writer in connections:
            writer.close()


async def test_a_refused_key_costs_no_body_read(door: Door) -> None:
    # Given requests declaring a megabyte of body and sending none of it
    for key in (None, "qg_000000000000_" + "x" * 43):
        reader, writer = await connect(door)
        writer.write(head(1_048_000, key))
        asked = time.monotonic()

        # Expect 401 at once: nothing waited for the body
        status, _ = await status_of(reader)
        assert status == 401
        assert time.monotonic() - asked < door.gateway.settings.http_body_timeout / 10
        writer.close()


async def test_a_connection_answered_before_its_body_ended_serves_its_next_request(
    door: Door,
) -> None:
    # Given a request without a key, answered 401 before its body is sent
    reader, writer = await connect(door)
    writer.write(head(20))
    status, answer_head = await status_of(reader)
    assert status == 401
    await reader.readexactly(int(answer_head.split(b"content-length: ")[1].split(b"\r")[0]))

    # When the rest of the body comes, then another request on the same connection
    writer.write(b"x" * 20 + b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")

    # Expect it answered
    status, _ = await status_of(reader)
    assert status == 200
    writer.close()


async def test_a_key_sending_too_many_bodies_at_once_is_429_and_others_are_served(
    door: Door,
) -> None:
    # Given alpha sending as many slow bodies as a key may
    async with slow_bodies(door, ["alpha"] * BODIES_PER_KEY):
        # Expect one more of alpha's refused before it is read, with Retry-After
        async with door.client("alpha") as alpha:
            with pytest.raises(openai.RateLimitError) as refused:
                await alpha.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
        assert refused.value.code == "too_many_requests"
        assert refused.value.response.headers["retry-after"] == "1"
        # ... and beta served meanwhile
        async with door.client("beta") as beta:
            assert await beta.chat.completions.create(model="gpt-4o-mini", messages=HELLO)

    # Once alpha's bodies have gone, alpha is served again
    async with door.client("alpha", max_retries=3) as alpha:
        assert await alpha.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert len(await door.gateway.usage_rows(2)) == 2
    assert door.gateway.mock.stats.calls == 2


async def test_a_process_reading_its_bytes_worth_of_bodies_answers_503(door: Door) -> None:
    # Given slow bodies of two teams, within their shares, nearly as many bytes as the process
    # reads at once
    async with slow_bodies(door, ["alpha", "alpha", "beta"]):
        # Expect a third team's body that does not fit refused before it is read, with
        # Retry-After
        reader, writer = await connect(door)
        writer.write(head(BODY_BYTES, door.keys["gamma"]))
        status, answer_head = await status_of(reader)
        assert status == 503
        assert b"retry-after: 1" in answer_head
        writer.close()

    # Once those bodies have gone, gamma is served
    async with door.client("gamma", max_retries=3) as gamma:
        assert await gamma.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert len(await door.gateway.usage_rows(1)) == 1


async def test_a_team_with_several_keys_takes_no_more_than_its_share_of_the_bytes(
    settings: Settings,
) -> None:
    # Given a process whose teams may each have more requests in progress than the test sends,
    # so that the bytes are the bound met, and alpha holding four keys
    async with open_door(_limited(settings, http_requests_per_team=8), TEAMS) as door:
        keys = [door.keys["alpha"], *[(await issue_key(settings, "alpha"))[1] for _ in range(3)]]
        connections: list[asyncio.StreamWriter] = []
        try:
            # When alpha sends a slow body of a quarter of the process's bytes with each key:
            # together, all of them
            answers = []
            for key in keys:
                reader, writer = await connect(door)
                connections.append(writer)
                writer.write(head(BYTES_IN_FLIGHT // 4, key, "Expect: 100-continue"))
                answers.append((await status_of(reader))[0])

            # Expect beta served meanwhile, by the official SDK without retries
            async with door.client("beta") as beta:
                assert await beta.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
            # ... as alpha's bodies were read only up to its share (``BODY_BYTES``: one of
            # them), the others refused before they were read
            assert answers == [100, 429, 429, 429]
            # ... and alpha's next body that does not fit its share, by any of its keys,
            # refused 429 in a line that says what to do, with Retry-After
            long = [{"role": "user", "content": "a" * (BODY_BYTES - BYTES_IN_FLIGHT // 4)}]
            async with openai.AsyncOpenAI(
                base_url=door.v1, api_key=keys[-1], max_retries=0
            ) as alpha:
                with pytest.raises(openai.RateLimitError) as refused:
                    await alpha.chat.completions.create(model="gpt-4o-mini", messages=long)
            assert refused.value.code == "too_many_requests"
            assert refused.value.response.headers["retry-after"] == "1"
            error = refused.value.body
            assert isinstance(error, dict)
            message = error["message"]
            assert message.startswith("team alpha's request bodies") and "\n" not in message
            assert "all its API keys together: send the next once one has arrived" in message
        finally:
            for writer in connections:
                writer.close()
    assert door.gateway.mock.stats.calls == 1


@pytest.mark.parametrize("path", UPLOADS)
async def test_a_keys_slow_uploads_are_held_to_its_bodies_and_others_are_served(
    small_door: Door, path: str
) -> None:
    door = small_door
    connections: list[asyncio.StreamWriter] = []
    try:
        # Given alpha opening more slow uploads than the process holds connections, one by one
        answers = []
        for _ in range(MAX_CONNECTIONS + 2):
            reader, writer = await connect(door)
            connections.append(writer)
            upload = head(
                SLOW,
                door.keys["alpha"],
                "Expect: 100-continue",
                path=path,
                content_type=UPLOADS[path],
            )
            writer.write(upload)
            answers.append((await status_of(reader))[0])

        # Expect as many read as a key may send bodies at once, the rest refused unread
        assert answers == [100] * BODIES_PER_KEY + [429] * (MAX_CONNECTIONS + 2 - BODIES_PER_KEY)
        # ... and beta served meanwhile, at once: a refused upload holds no one's place
        async with door.client("beta") as beta:
            assert await beta.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    finally:
        for writer in connections:
            writer.close()


@pytest.mark.parametrize("path", [*UPLOADS, "/v1/chat/completions"])
async def test_a_body_dropped_midway_logs_nothing_and_stores_nothing(
    settings: Settings, caplog: pytest.LogCaptureFixture, path: str
) -> None:
    caplog.set_level(logging.INFO)
    async with open_door(settings, TEAMS) as door:
        # Given a request whose body is being read
        reader, writer = await connect(door)
        content_type = UPLOADS.get(path, "application/json")
        writer.write(
            head(
                SLOW,
                door.keys["alpha"],
                "Expect: 100-continue",
                path=path,
                content_type=content_type,
            )
        )
        assert (await status_of(reader))[0] == 100
        writer.write(b'--b\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n{')
        await writer.drain()

        # When its caller hangs up before the rest
        writer.close()
        # (the front door stops once its requests are done: this one too)

    # Expect not a line in the log
    assert [r.getMessage() for r in caplog.records if r.name.startswith("uvicorn")] == []
    # ... and nothing of it kept
    pool = await create_pool(settings)
    try:
        assert await pool.fetchval("SELECT count(*) FROM api_files") == 0
    finally:
        await pool.close()


async def test_slow_sign_in_forms_are_held_to_a_clients_bodies_and_to_the_body_timeout(
    settings: Settings,
) -> None:
    timeout = 0.5
    settings = settings.model_copy(
        update={"http_bodies_per_key": BODIES_PER_KEY, "http_body_timeout": timeout}
    )
    async with open_door(settings, TEAMS) as door:
        connections: list[asyncio.StreamWriter] = []
        try:
            # Given one address sending sign-in forms (before any key is known) byte by byte
            answers = []
            for _ in range(BODIES_PER_KEY + 1):
                reader, writer = await connect(door)
                connections.append(writer)
                form = "application/x-www-form-urlencoded"
                writer.write(
                    head(
                        SLOW,
                        None,
                        "Expect: 100-continue",
                        path="/dashboard/sign-in",
                        content_type=form,
                    )
                )
                answers.append((reader, (await status_of(reader))[0]))

            # Expect as many read as a key's bodies, the next refused unread
            assert [status for _, status in answers] == [100] * BODIES_PER_KEY + [429]
            # ... and those read given up on once the body timeout has passed
            for reader, _ in answers[:BODIES_PER_KEY]:
                assert (await status_of(reader))[0] == 408
        finally:
            for writer in connections:
                writer.close()


async def test_slow_sign_ins_from_many_addresses_leave_the_apis_served(settings: Settings) -> None:
    # Given a process of 12 connections that reads 4 sign-in forms at once (2 per address)
    keyless, addresses = 4, 8
    limited = _limited(
        settings,
        http_max_connections=12,
        http_keyless_bodies=keyless,
        http_keyless_requests=keyless,
    )
    async with open_door(limited, TEAMS) as door, httpx.AsyncClient(base_url=door.url) as person:
        # ... and a person signed in to the dashboard
        await signed_in(person, door.keys["beta"])
        csrf = await form_token(person, "/dashboard/teams/beta")
        connections: list[asyncio.StreamWriter] = []
        try:
            # When 8 addresses each start as many slow sign-ins as an address may: more than
            # the process holds connections
            answers = []
            for n in range(addresses * BODIES_PER_KEY):
                reader, writer = await connect(door, f"127.0.0.{2 + n % addresses}")
                connections.append(writer)
                form = "application/x-www-form-urlencoded"
                writer.write(
                    head(
                        200,
                        None,
                        "Expect: 100-continue",
                        path="/dashboard/sign-in",
                        content_type=form,
                    )
                )
                status, answer_head = await status_of(reader)
                answers.append(status)
                if status == 100:
                    writer.write(b"k")
                else:
                    refused_head = answer_head

            # Expect a team's API call served meanwhile, at once
            async with door.client("alpha") as alpha:
                assert await alpha.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
            # ... as the process reads only its keyless bodies' worth of the sign-ins, and
            # refuses the rest before reading them, with Retry-After
            assert answers == [100] * keyless + [429] * (addresses * BODIES_PER_KEY - keyless)
            assert b"retry-after: 1" in refused_head
            # ... and the person's own forms read as their key's bodies, not refused with them
            signed_out = await person.post("/dashboard/sign-out", data={"csrf": csrf})
            assert signed_out.status_code == 303
            assert signed_out.headers["location"] == "/dashboard/sign-in"
        finally:
            for writer in connections:
                writer.close()


async def test_a_malformed_upload_is_400_and_logs_nothing(
    door: Door, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    # Given uploads whose multipart bodies are broken, as any client may send them
    for body in (b"garbage", b"--bb\r\n"):
        reader, writer = await connect(door)
        multipart = "multipart/form-data; boundary=b"
        writer.write(
            head(len(body), door.keys["alpha"], path="/v1/files", content_type=multipart) + body
        )

        # Expect each answered 400 in a line that says what to send
        status, answer_head = await status_of(reader)
        length = int(answer_head.split(b"content-length: ")[1].split(b"\r")[0])
        error = orjson.loads(await reader.readexactly(length))["error"]
        assert status == 400
        assert "send one file as the multipart field `file`" in error["message"]
        writer.close()

    # ... and nothing in the log: a client sending them by the thousand floods nothing. (A
    # loaded machine may make the wrong-key counter's Redis wait time out, which is logged
    # as Redis's outage whatever the request, so that logger's lines are not the upload's.)
    assert [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name != "frontdoor.failed_keys"
    ] == []
