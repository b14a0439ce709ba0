"""SIGTERM with jobs in flight: the worker drains, exits 0, and no job is lost or doubled.
SIGTERM or Ctrl-C while a role starts (importing, or waiting for a service): it exits at
once, as a stop."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
import signal
import sys
from asyncio.subprocess import Process
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from mockprovider import Behavior, MockConfig, MockProvider
from producer import GatewayClient
from queuegate.settings import Settings
from tests.chaos.harness import declare_teams, worker_env
from tests.support import LogLines, running_gateway, wait_until

JOBS = 40
CLOSED_DATABASE = "postgresql://postgres@127.0.0.1:18711/test"
"""A PostgreSQL nobody listens for (a port of this file's own): a start waits for it forever."""


def role_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a role on the test's namespace and schema (any free metrics port:
    other test runs share the host); ``extra`` adds or overrides variables."""
    return {
        **os.environ,
        "QUEUEGATE_NAMESPACE": settings.namespace,
        "QUEUEGATE_DATABASE_SCHEMA": settings.database_schema,
        "QUEUEGATE_METRICS_PORT": "0",
        **extra,
    }


@asynccontextmanager
async def logging_process(
    *args: str, env: dict[str, str] | None = None
) -> AsyncIterator[tuple[Process, LogLines]]:
    """``python *args``, its stderr read as lines; killed after the body if still running."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, *args,
        env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stderr is not None
    try:
        yield process, LogLines(process.stderr)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_sigterm_drains_in_flight_jobs_and_requeues_the_rest(settings: Settings) -> None:
    # Given a worker process holding 8 jobs at a time against a provider taking 300 ms a call
    slow = MockConfig(default=Behavior(latency_ms=300))
    async with MockProvider(slow) as mock:
        await declare_teams(settings, ("alpha",))
        env = worker_env(settings, mock, QUEUEGATE_PREFETCH="8", QUEUEGATE_SHUTDOWN_GRACE="10")
        worker = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cli",
            "worker",
            "--teams",
            "alpha",
            env=env,
            stderr=asyncio.subprocess.PIPE,
        )
        async with GatewayClient(settings, team="alpha") as client:
            handles = [
                await client.submit(
                    client.job("gpt-4o-mini", [{"role": "user", "content": f"job {i}"}])
                )
                for i in range(JOBS)
            ]
            # When SIGTERM arrives while jobs are at the provider
            await wait_until(lambda: mock.stats.calls >= 4, timeout=20)
            worker.send_signal(signal.SIGTERM)
            _, stderr = await asyncio.wait_for(worker.communicate(), timeout=20)

            # Expect a clean exit, having finished what it held
            assert worker.returncode == 0, stderr.decode()[-2000:]
            assert b"Traceback" not in stderr, stderr.decode()[-2000:]
            answered_by_first = mock.stats.calls

            # ... and every job answered exactly once after a new worker takes over the rest
            async with running_gateway(settings, mock_config=MockConfig()) as gw:
                await gw.expect_each_answered_once(handles)
                assert 0 < answered_by_first < JOBS


@pytest.mark.parametrize(
    ("role", "sig"),
    [("worker", signal.SIGTERM), ("accounting", signal.SIGINT)],
    ids=["worker-SIGTERM", "accounting-SIGINT"],
)
async def test_a_stop_signal_while_waiting_for_a_service_at_start_stops_at_once(
    settings: Settings, role: str, sig: signal.Signals
) -> None:
    # Given a role waiting at start for a PostgreSQL that is not there (retrying for ever)
    env = role_env(settings, QUEUEGATE_DATABASE_URL=CLOSED_DATABASE)
    async with logging_process("-m", "cli", role, env=env) as (process, lines):
        await lines.matches(re.compile("PostgreSQL is not reachable .* waiting for it"), 1)
        # When the operator stops it (SIGTERM, or Ctrl-C)
        process.send_signal(sig)
        # Expect it gone within a couple of seconds (it waited until PostgreSQL answered),
        # as a normal stop exits, in one line and no traceback
        async with asyncio.timeout(5):
            code = await process.wait()
    said = await lines.closed()
    assert code == 0, said
    assert "Traceback" not in said, said
    assert said.splitlines()[-1].endswith(f"{sig.name} while starting: stopped before serving")


@pytest.mark.parametrize(
    ("role", "module", "sig", "form"),
    [
        ("worker", "typer", signal.SIGTERM, "text"),
        ("worker", "asyncio.base_events", signal.SIGINT, "text"),
        ("worker", "pydantic_core", signal.SIGTERM, "text"),
        ("worker", "aio_pika", signal.SIGINT, "text"),
        ("worker", "cli.main", signal.SIGTERM, "text"),
        ("worker", "workers", signal.SIGTERM, "json"),
        ("accounting", "asyncpg", signal.SIGINT, "json"),
        ("api", "uvicorn", signal.SIGTERM, "text"),
    ],
    ids=lambda value: getattr(value, "name", value),
)
async def test_a_stop_signal_while_a_role_imports_stops_it_as_at_start(
    settings: Settings, role: str, module: str, sig: signal.Signals, form: str
) -> None:
    # Given a role just started, whose Python says which modules it has imported (to signal
    # it at a known moment of the second or two before it runs: it died of the signal then)
    env = role_env(settings, PYTHONVERBOSE="1", QUEUEGATE_LOG_FORMAT=form)
    port = ["--port", "0"] if role == "api" else []
    # Its output goes through a pipe of one page, read only as far as the module's line: the
    # role may run at most a page of output past it before it waits for the reader, so the
    # signal finds it importing however slowly this test reads (the default 64 KiB pipe, and
    # asyncio's own buffer, let it run on to serving under load, where a signal drains).
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PAGE)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", role, *port,
        env=env, stdout=asyncio.subprocess.DEVNULL, stderr=write_end,
    )  # fmt: skip
    os.close(write_end)
    imported = re.compile(rf"import '{re.escape(module)}' #")
    try:
        async with asyncio.timeout(30):
            await asyncio.to_thread(_read_until, read_end, imported)
            # When the operator stops it while it is importing (or right after)
            process.send_signal(sig)
            said = (await asyncio.to_thread(_read_all, read_end)).decode()
            code = await process.wait()
    finally:
        os.close(read_end)
        if process.returncode is None:
            process.kill()
            await process.wait()
    # Expect it stopped as a stop while waiting at start ends: status 0, one line, no
    # traceback (the rest of its output is Python's own about its modules)
    logged = [line for line in said.splitlines() if not line.startswith(("# ", "import "))]
    assert code == 0, logged
    assert "Traceback" not in said, logged
    # Python writes a verbose line's text and its end apart: the stop may land in between, its
    # line then after a line of Python's cut short (ours is one write, theirs is not)
    stops = [stop_of(line, form) for line in said.splitlines() if "while starting" in line]
    assert len(stops) == 1, said[-1500:]
    message = json.loads(stops[0])["message"] if form == "json" else stops[0]
    assert message.endswith(f"{sig.name} while starting: stopped before serving")


LINE_START = {"json": re.compile(r'\{"time".*'), "text": re.compile(r"\d{4}-\d\d-\d\d \d\d:.*")}
"""Where a log line of each form starts."""


def stop_of(line: str, form: str) -> str:
    """The stop line in ``line``, which may follow the start of one of Python's own."""
    found = LINE_START[form].search(line)
    assert found, line
    return found.group()


PAGE = 4096
"""The smallest pipe Linux makes."""


def _read_until(fd: int, line: re.Pattern[str]) -> None:
    # A byte at a time: whatever this reads past the line would let the writer run on.
    seen = bytearray()  # the line so far
    while not line.match(seen.decode(errors="replace")):
        byte = os.read(fd, 1)
        if not byte:
            raise AssertionError(f"the role ended before {line.pattern!r}: {seen[-2000:]!r}")
        seen += byte
        if byte == b"\n":
            seen.clear()


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


class HungService:
    """A listener of this test's own that accepts connections and never answers (a frozen
    broker or Redis): a client connecting to it waits for its greeting until its timeout."""

    def __init__(self) -> None:
        self.accepted = asyncio.Event()
        self._held: list[asyncio.StreamWriter] = []

    async def _accept(self, _: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._held.append(writer)  # open, unanswered, until the test ends
        self.accepted.set()

    async def __aenter__(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def __aexit__(self, *_: object) -> None:
        for writer in self._held:
            writer.close()
        self._server.close()
        await self._server.wait_closed()


@pytest.mark.parametrize(
    ("role", "variable", "url"),
    [
        ("accounting", "QUEUEGATE_AMQP_URL", "amqp://guest:guest@127.0.0.1:{port}/"),
        ("worker", "QUEUEGATE_AMQP_URL", "amqp://guest:guest@127.0.0.1:{port}/"),
        ("worker", "QUEUEGATE_REDIS_URL", "redis://127.0.0.1:{port}/0"),
    ],
    ids=["accounting-broker", "worker-broker", "worker-redis"],
)
async def test_sigterm_while_a_hung_service_is_connecting_at_start_stops_at_once(
    settings: Settings, role: str, variable: str, url: str
) -> None:
    # Given a role connecting at start to a service that accepted and never answers
    service = HungService()
    async with service as port:
        env = role_env(settings, **{variable: url.format(port=port)})
        async with logging_process("-m", "cli", role, env=env) as (process, lines):
            async with asyncio.timeout(30):
                await service.accepted.wait()
            # When the operator stops it while it waits for the service's greeting
            process.send_signal(signal.SIGTERM)
            # Expect it gone at once (aio-pika went on reconnecting for ever, one SIGTERM
            # after another), as a normal stop exits, in one line and no traceback
            try:
                async with asyncio.timeout(5):
                    code = await process.wait()
            except TimeoutError:
                pytest.fail(f"still running 5 s after SIGTERM, having said: {lines.lines}")
    said = await lines.closed()
    assert code == 0, said
    assert "Traceback" not in said, said
    stops = [line for line in said.splitlines() if "while starting" in line]
    assert len(stops) == 1, said
    assert said.splitlines()[-1].endswith("SIGTERM while starting: stopped before serving"), said


DEAF_START = """
import asyncio, logging
from queuegate.runtime import run, stop_on_signals

async def main() -> None:
    stop_on_signals()
    logging.warning("starting")
    # A start-up wait that a cancel does not end (as aio-pika's reconnecting did)
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            pass

logging.basicConfig(level="INFO")
run(main)
"""


async def test_a_second_signal_ends_a_start_up_that_did_not_stop_at_the_first() -> None:
    # Given a process whose start-up swallows the cancel a stop signal makes
    async with logging_process("-c", DEAF_START) as (process, lines):
        await lines.matches(re.compile("starting"), 1)
        process.send_signal(signal.SIGTERM)
        await lines.matches(re.compile("SIGTERM while starting: stopped before serving"), 1)
        # When the operator asks again
        process.send_signal(signal.SIGTERM)
        # Expect the process gone at once, killed by that signal, saying so
        async with asyncio.timeout(5):
            code = await process.wait()
    said = await lines.closed()
    assert code == -signal.SIGTERM, said
    assert said.splitlines()[-1].endswith(
        "SIGTERM again while stopping before serving: exiting at once"
    )
