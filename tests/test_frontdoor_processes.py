"""``queuegate api --processes N``: processes sharing one port share their metrics, so a scrape
that reaches any of them counts every process's requests; a stop takes the grace and a
bounded close, whatever the requests in progress wait for."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from accounting import migrate
from frontdoor.serve import CLOSING, GIVE_UP, bind
from mockprovider import Behavior, MockConfig
from queuegate.db import create_pool
from queuegate.metrics import MULTIPROCESS_DIR
from queuegate.settings import Settings
from tests.frontdoor_support import HELLO, keyed_gateway
from tests.support import LogLines, log_once_ended, wait_until

REQUESTS = 40
STARTED = re.compile(r"process (\d) started \(pid (\d+)\)")
SERVING = re.compile(r"front door on http://")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def count(metrics: str, route: str) -> float:
    """``queuegate_http_requests_total`` of ``route``, status 200, in a scrape."""
    pattern = rf'^queuegate_http_requests_total\{{route="{re.escape(route)}",status="200"\}} (\S+)$'
    found = re.search(pattern, metrics, re.MULTILINE)
    return float(found[1]) if found else 0.0


async def two_processes(
    settings: Settings, port: int, processes: int = 2, **env: str
) -> tuple[asyncio.subprocess.Process, LogLines]:
    """``queuegate api --processes 2`` (or ``processes``) on ``port``, of the test's namespace
    and schema (and ``env``), and its log lines."""
    env = {
        **os.environ,
        "QUEUEGATE_NAMESPACE": settings.namespace,
        "QUEUEGATE_DATABASE_SCHEMA": settings.database_schema,
        **env,
    }
    supervisor = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", "api", "--port", str(port),
        "--processes", str(processes),
        env=env, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert supervisor.stderr is not None
    return supervisor, LogLines(supervisor.stderr)


async def fetch(url: str, path: str) -> str:
    """One request over a connection of its own, so the kernel picks any process for it."""
    async with openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0) as client:
        response = await client.get(path, cast_to=httpx.Response)
        return response.text


async def test_metrics_count_the_requests_of_every_process(settings: Settings) -> None:
    # Given the front door served by two processes on one port
    async with await create_pool(settings) as pool:
        await migrate(pool, settings.database_schema)
    port = free_port()
    supervisor, log = await two_processes(settings, port, QUEUEGATE_SHUTDOWN_GRACE="5")
    url = f"http://127.0.0.1:{port}"
    try:
        started = await log.matches(STARTED, 2)
        await log.matches(SERVING, 2)
        shared = _environ(int(started[0][2]))[MULTIPROCESS_DIR]
        assert await asyncio.to_thread(os.path.isdir, shared)

        # When each of 40 requests comes over a connection of its own
        for _ in range(REQUESTS):
            await fetch(url, "/healthz")
        # Expect every scrape, whichever process answers it, to count all of them, and the
        # scrapes before it
        for scrape in range(6):
            metrics = await fetch(url, "/metrics")
            assert count(metrics, "/healthz") == REQUESTS
            assert count(metrics, "/metrics") == scrape

        # When a process is killed, and its slot started again
        os.kill(int(started[0][2]), signal.SIGKILL)
        await log.matches(STARTED, 3)
        await log.matches(SERVING, 3)
        # Expect the requests it answered still counted
        assert count(await fetch(url, "/metrics"), "/healthz") == REQUESTS
    finally:
        supervisor.send_signal(signal.SIGTERM)
        await asyncio.wait_for(supervisor.wait(), timeout=30)
        output = await log.closed()

    # Expect a clean stop, and the shared directory gone with the supervisor
    assert supervisor.returncode == 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert not await asyncio.to_thread(os.path.exists, shared)


async def test_a_port_another_front_door_listens_on_is_refused(settings: Settings) -> None:
    # Given a front door (of any namespace) listening on a port, as each of its processes
    # does, so that the kernel would share the port with anyone binding it so too
    other = bind("127.0.0.1", 0)
    port = other.getsockname()[1]
    env = {**os.environ, "QUEUEGATE_NAMESPACE": settings.namespace}
    try:
        for processes in ("1", "2"):
            # When another is started on that port, with one process or several
            command = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "cli", "api", "--port", str(port),
                "--processes", processes,
                env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await asyncio.wait_for(command.communicate(), timeout=30)
            # Expect it refused in one line saying what to do, serving nothing
            lines = err.decode().strip().splitlines()
            assert command.returncode == 1, err.decode()
            assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0], lines
            assert "set --port to a free port" in lines[0]
            assert b"front door on http" not in out + err
    finally:
        other.close()


def _environ(pid: int) -> dict[str, str]:
    """The environment a running process was started with."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (entry.split(b"=", 1) for entry in raw.split(b"\0") if b"=" in entry)
    return {key.decode(): value.decode() for key, value in pairs}


GRACE = 0.5
"""A grace of a fraction of a second, as an operator may set it."""
SLOW = "local-llama"
SLOW_MS = 12_000
SLOW_MOCK = MockConfig(models={"llama-3.1-8b": Behavior(latency_ms=SLOW_MS)})
STOPPED = re.compile(r"all 2 processes stopped")


@pytest.mark.parametrize("stream", [False, True], ids=["chat", "stream"])
async def test_a_stop_with_a_request_held_takes_the_grace_and_a_bounded_close(
    settings: Settings, stream: bool
) -> None:
    # Given the front door served by two processes giving requests in progress GRACE s at
    # a stop, and a chat (or a stream before its first chunk) held at a model answering in
    # SLOW_MS, its client retrying as the SDK does by default
    async with keyed_gateway(settings, mock_config=SLOW_MOCK) as (gateway, keys, _):
        port = free_port()
        supervisor, log = await two_processes(
            settings,
            port,
            QUEUEGATE_SHUTDOWN_GRACE=str(GRACE),
            QUEUEGATE_MOCK_URL=gateway.mock.url,
        )
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=keys["alpha"])
        try:
            await log.matches(SERVING, 2)
            held = asyncio.create_task(
                client.chat.completions.create(model=SLOW, messages=HELLO, stream=stream)
            )
            await wait_until(lambda: gateway.worker.in_flight == 1)

            # When the front door is stopped
            started = time.monotonic()
            supervisor.send_signal(signal.SIGTERM)
            await asyncio.wait_for(supervisor.wait(), timeout=30)
            took = time.monotonic() - started
        finally:
            output = await log_once_ended(supervisor, log)
            await client.close()
        # (the chat answered as the grace ends: 504 naming its job, which runs on, and not
        # retried; before, a bare 500 the SDK retried as a new job, called again)
        with pytest.raises(openai.APIStatusError) as caught:
            await held
        assert caught.value.status_code == 504
        assert caught.value.response.headers["x-should-retry"] == "false"
        job_id = caught.value.response.headers["x-queuegate-job-id"]
        assert f"stopped before job {job_id} was answered" in caught.value.message
        assert gateway.mock.arrived == 1

    # Expect it stopped cleanly within its grace and the bounded close the README states,
    # not the call's time
    assert supervisor.returncode == 0, output[-3000:]
    assert STOPPED.search(output), output[-3000:]
    assert GRACE - GIVE_UP <= took < GRACE + CLOSING, took


STOP_WITHIN = 3.0
"""Seconds a front door with nobody left to answer takes at most to exit once signalled:
0.13-0.2 s measured, idle or with requests whose client hung up; these waited for their jobs
before (SLOW_MS here, up to the whole grace)."""


@pytest.mark.parametrize("stream", [False, True], ids=["chat", "stream"])
async def test_a_stop_exits_at_once_when_nobody_waits_for_an_answer(
    settings: Settings, stream: bool
) -> None:
    # Given the front door, one process, giving requests in progress the default 30 s at a
    # stop, with a client's keep-alive connection open and idle, and a chat (or a stream,
    # before its first chunk) its client hung up on, held at a model answering in SLOW_MS
    worker = settings.model_copy(update={"shutdown_grace": 0.5})  # ends the call at the end
    async with keyed_gateway(worker, mock_config=SLOW_MOCK) as (gateway, keys, _):
        port = free_port()
        door, log = await two_processes(
            settings,
            port,
            processes=1,
            QUEUEGATE_SHUTDOWN_GRACE="30",
            QUEUEGATE_MOCK_URL=gateway.mock.url,
        )
        url = f"http://127.0.0.1:{port}/v1"
        try:
            await log.matches(SERVING, 1)
            async with openai.AsyncOpenAI(base_url=url, api_key=keys["alpha"]) as idle:
                await idle.models.list()
                async with openai.AsyncOpenAI(
                    base_url=url, api_key=keys["alpha"], max_retries=0
                ) as client:
                    asked = asyncio.create_task(
                        client.chat.completions.create(model=SLOW, messages=HELLO, stream=stream)
                    )
                    await wait_until(lambda: gateway.worker.in_flight == 1)
                    asked.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await asked

                # When it is stopped
                started = time.monotonic()
                door.send_signal(signal.SIGTERM)
                await asyncio.wait_for(door.wait(), timeout=30)
                took = time.monotonic() - started
        finally:
            output = await log_once_ended(door, log)

    # Expect it gone at once, as an operator's stop ends: status 0, nothing logged amiss
    assert took < STOP_WITHIN, took
    assert door.returncode == 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
