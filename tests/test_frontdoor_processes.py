"""``queuegate api --processes N``: processes sharing one port share their metrics, so a scrape
that reaches any of them counts every process's requests."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from pathlib import Path

import httpx
import openai

from accounting import migrate
from frontdoor.serve import bind
from queuegate.db import create_pool
from queuegate.metrics import MULTIPROCESS_DIR
from queuegate.settings import Settings
from tests.support import LogLines

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
    env = {
        **os.environ,
        "QUEUEGATE_NAMESPACE": settings.namespace,
        "QUEUEGATE_DATABASE_SCHEMA": settings.database_schema,
        "QUEUEGATE_SHUTDOWN_GRACE": "5",
    }
    supervisor = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", "api", "--port", str(port), "--processes", "2",
        env=env, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert supervisor.stderr is not None
    log = LogLines(supervisor.stderr)
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
