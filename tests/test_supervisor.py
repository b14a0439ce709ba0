"""``queuegate worker --processes N``: a supervisor restarts a dead worker and stops them all,
then ends at once; one that cannot start as configured stops them all."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from mockprovider import Behavior, MockConfig, MockProvider
from producer import GatewayClient
from queuegate.db import create_pool
from queuegate.settings import Settings
from tests.chaos.harness import declare_teams, worker_env
from tests.support import LogLines, log_once_ended, running_gateway, wait_until

JOBS = 60
STARTED = re.compile(r"process (\d) started \(pid (\d+)\)")
SERVING = re.compile(r"worker \S+:(\d+) serving alpha")
SERVING_ALPHA_ALONE = re.compile(r"worker \S+:(\d+) serving alpha$", re.MULTILINE)
RESTART_REFUSED = re.compile(r"process 0 \(pid \d+\) exited with status 78; restarting")
SERVING_BETA = re.compile(r"now serving team beta with")
STOPPED_BETA = re.compile(r"stopped serving team beta \(not in the registry\)")
ALL_STOPPED = re.compile(r"all 2 processes stopped")
MOCK_CATALOG = Path(__file__).resolve().parent.parent / "router" / "catalogs" / "mock.yaml"
ENDS_WITHIN = 0.05
"""Seconds from the supervisor's last line to its exit: 4-9 ms measured; Python's finalisation
of its modules, which it skips, took 0.11-0.27 s more (the more, the busier the machine)."""


async def test_supervisor_restarts_a_killed_worker_and_stops_all_without_losing_a_job(
    settings: Settings,
) -> None:
    # Given a supervisor running two worker processes against a provider taking 500 ms a call
    slow = MockConfig(default=Behavior(latency_ms=500))
    async with MockProvider(slow) as mock:
        await declare_teams(settings, ("alpha",))
        # The killed process's claims lapse in 1 s, not 10: the other process, handed those
        # jobs again, waits out their leases, and its drain at SIGTERM with them
        env = worker_env(settings, mock, QUEUEGATE_SHUTDOWN_GRACE="10", QUEUEGATE_CLAIM_LEASE="1")
        supervisor = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli", "worker",
            "--processes", "2", "--concurrency", "4", "--teams", "alpha",
            env=env, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert supervisor.stderr is not None
        log = LogLines(supervisor.stderr)
        try:
            first, _ = await log.matches(STARTED, 2)

            async with GatewayClient(settings, team="alpha") as client:
                handles = [
                    await client.submit(
                        client.job("gpt-4o-mini", [{"role": "user", "content": f"job {i}"}])
                    )
                    for i in range(JOBS)
                ]
                # When one worker process is killed while jobs are at the provider
                await wait_until(lambda: mock.stats.calls >= 4, timeout=20)
                os.kill(int(first[2]), signal.SIGKILL)

                # Expect it started again, in the same slot, as a new process that serves
                restarted = (await log.matches(STARTED, 3))[2]
                assert restarted[1] == first[1] and restarted[2] != first[2]
                serving = await log.matches(SERVING, 3)
                assert serving[2][1] == restarted[2]

                # When SIGTERM reaches the supervisor while jobs are still in flight
                supervisor.send_signal(signal.SIGTERM)
                await asyncio.wait_for(supervisor.wait(), timeout=30)
                output = await log.closed()

                # Expect all of them stopped cleanly and the supervisor exited 0
                assert supervisor.returncode == 0, output[-3000:]
                assert "Traceback" not in output, output[-3000:]
                assert len(re.findall(r"process \d \(pid \d+\) stopped: status 0", output)) == 2
                assert mock.stats.calls < JOBS + 8

                # ... and every job answered and accounted exactly once, the rest by a new worker
                async with running_gateway(settings) as gw:
                    await gw.expect_each_answered_once(handles)

        finally:
            # A failed test stops its supervisor (and so its workers), not leaves them serving
            if supervisor.returncode is None:
                supervisor.send_signal(signal.SIGTERM)
                await asyncio.wait_for(supervisor.wait(), timeout=30)


async def test_a_supervisor_ends_once_its_worker_processes_stopped(settings: Settings) -> None:
    # Given a supervisor running two idle worker processes
    async with MockProvider(MockConfig()) as mock:
        await declare_teams(settings, ("alpha",))
        supervisor = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli", "worker", "--processes", "2", "--teams", "alpha",
            env=worker_env(settings, mock), stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert supervisor.stderr is not None
        log = LogLines(supervisor.stderr)
        try:
            await log.matches(SERVING, 2)

            # When SIGTERM reaches it
            supervisor.send_signal(signal.SIGTERM)
            await log.matches(ALL_STOPPED, 1)
            stopped = time.monotonic()
            await asyncio.wait_for(supervisor.wait(), timeout=30)
            took = time.monotonic() - stopped
        finally:
            output = await log_once_ended(supervisor, log)

    # Expect it to exit cleanly right after saying its processes stopped, not after Python's
    # finalisation of the modules it imported
    assert supervisor.returncode == 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert took < ENDS_WITHIN, took


async def test_a_worker_process_that_cannot_start_stops_them_all_in_one_line(
    settings: Settings,
) -> None:
    # Given the metrics port of a supervisor's first worker process taken, its second's free
    async with MockProvider(MockConfig()) as mock:
        await declare_teams(settings, ("alpha",))
        with _taken_then_free() as port:
            env = worker_env(
                settings,
                mock,
                QUEUEGATE_METRICS_HOST="127.0.0.1",
                QUEUEGATE_METRICS_PORT=str(port),
            )
            # When the supervisor starts them
            supervisor = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "cli", "worker", "--processes", "2", "--teams", "alpha",
                env=env, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            assert supervisor.stderr is not None
            log = LogLines(supervisor.stderr)
            try:
                await asyncio.wait_for(supervisor.wait(), timeout=30)
            finally:
                output = await _ended(supervisor, log)

    # Expect it to stop, status 1, having said once what to do, the other process stopped
    # cleanly (before: the first was started again and again, its line said at each start)
    assert supervisor.returncode == 1, output[-3000:]
    said = [line for line in output.splitlines() if "error:" in line]
    assert said == [
        f"error: cannot serve metrics on 127.0.0.1:{port}: another process listens there; "
        "set QUEUEGATE_METRICS_PORT to a free port"
    ], output[-3000:]
    assert "restarting" not in output and "Traceback" not in output, output[-3000:]
    assert re.search(r"process 1 \(pid \d+\) stopped: status 0", output), output[-3000:]


@contextmanager
def _taken_then_free() -> Iterator[int]:
    """A port held by a listener while the context lasts, whose next port is free."""
    while True:
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        port: int = taken.getsockname()[1]
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                taken.close()
                continue
        break
    with taken:
        taken.listen()
        yield port


async def test_a_restarted_worker_process_finding_its_metrics_port_taken_is_restarted_again(
    settings: Settings,
) -> None:
    # Given a supervisor serving alpha with two worker processes, on metrics ports of their own
    async with MockProvider(MockConfig()) as mock:
        await declare_teams(settings, ("alpha",))
        with _taken_then_free() as port:
            pass  # free once left, as is the next
        env = worker_env(
            settings, mock, QUEUEGATE_METRICS_HOST="127.0.0.1", QUEUEGATE_METRICS_PORT=str(port)
        )
        supervisor = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli", "worker", "--processes", "2", "--teams", "alpha",
            env=env, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert supervisor.stderr is not None
        log = LogLines(supervisor.stderr)
        grab = socket.socket()
        try:
            started = await log.matches(STARTED, 2)
            await log.matches(SERVING, 2)
            # When the process of slot 0 is killed, and its metrics port taken at once by
            # another, before the supervisor starts it again
            os.kill(next(int(m[2]) for m in started if m[1] == "0"), signal.SIGKILL)
            await wait_until(lambda: _bound(grab, port))
            grab.listen()

            # Expect the new process's refusal restarted with backoff, as a crash is
            # (before: the supervisor stopped the serving pool and exited 1)
            await log.matches(RESTART_REFUSED, 1)
            # ... and once the port is free again, a process of slot 0 serving again
            grab.close()
            await log.matches(SERVING, 3)
        finally:
            grab.close()
            output = await _ended(supervisor, log)
    assert supervisor.returncode == 0, output[-3000:]
    assert "stopping all" not in output and "Traceback" not in output, output[-3000:]


def _bound(listener: socket.socket, port: int) -> bool:
    """Whether ``listener`` could be bound to ``port`` now (free once its holder died)."""
    try:
        listener.bind(("127.0.0.1", port))
    except OSError:
        return False
    return True


async def test_a_pool_named_a_team_stops_serving_it_once_its_rows_are_deleted_until_it_is_added(
    settings: Settings,
) -> None:
    # Given a supervisor running two worker processes for alpha and beta, checked at its start
    async with MockProvider(MockConfig()) as mock:
        await declare_teams(settings, ("alpha", "beta"))
        supervisor = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli", "worker", "--processes", "2", "--teams", "alpha,beta",
            env=_refreshing(settings, mock), stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert supervisor.stderr is not None
        log = LogLines(supervisor.stderr)
        try:
            first, _ = await log.matches(SERVING, 2)
            # When beta's rows are deleted by hand
            await _delete_rows(settings, "beta")

            # Expect each process to stop serving it, as if disabled (before: served on with
            # no config, its budget gone)
            await log.matches(STOPPED_BETA, 2)

            # When one process is killed, and started again by the supervisor
            os.kill(int(first[1]), signal.SIGKILL)
            # Expect it to serve alpha alone, not refusing to start for beta either
            await log.matches(SERVING_ALPHA_ALONE, 1)

            # When beta is added again, expect both processes to serve it again
            await declare_teams(settings, ("beta",))
            await log.matches(SERVING_BETA, 4)
        finally:
            output = await _ended(supervisor, log)
    assert supervisor.returncode == 0, output[-3000:]
    assert "no team named" not in output, output[-3000:]
    assert len(STOPPED_BETA.findall(output)) == 2, output[-3000:]


async def test_a_pool_named_a_team_disabled_and_then_deleted_never_serves_it_again(
    settings: Settings,
) -> None:
    # Given a supervisor running two worker processes for alpha and beta
    async with MockProvider(MockConfig()) as mock:
        await declare_teams(settings, ("alpha", "beta"))
        env = _refreshing(settings, mock)
        supervisor = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli", "worker", "--processes", "2", "--teams", "alpha,beta",
            env=env, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert supervisor.stderr is not None
        log = LogLines(supervisor.stderr)
        try:
            await log.matches(SERVING, 2)
            # When beta is disabled (said once no process serves it), then its rows deleted,
            # and then alpha's config changed, said once every process serves under it: each
            # has read the registry since beta's rows went
            await _cli(env, "teams", "disable", "beta")
            await _delete_rows(settings, "beta")
            await _cli(env, "teams", "set", "alpha", "--rpm", "6000")
        finally:
            output = await _ended(supervisor, log)

    # Expect beta served by neither since (before: both served it again, with no budget)
    assert supervisor.returncode == 0, output[-3000:]
    assert len(SERVING_BETA.findall(output)) == 2, output[-3000:]


def _refreshing(settings: Settings, mock: MockProvider) -> dict[str, str]:
    """A worker's environment reading the registry every 0.2 s: a row deleted by hand, told
    to no process, is seen at the next read."""
    return worker_env(settings, mock, QUEUEGATE_TEAMS_REFRESH="0.2")


async def _delete_rows(settings: Settings, team: str) -> None:
    pool = await create_pool(settings)
    try:
        await pool.execute("DELETE FROM team_security WHERE team = $1", team)
        await pool.execute("DELETE FROM teams WHERE name = $1", team)
    finally:
        await pool.close()


async def _cli(env: dict[str, str], *args: str) -> None:
    """``queuegate args`` run to its end, succeeding."""
    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    said, _ = await asyncio.wait_for(cli.communicate(), timeout=30)
    assert cli.returncode == 0, said.decode()


async def _ended(supervisor: asyncio.subprocess.Process, log: LogLines) -> str:
    """The supervisor's whole log once it has exited, stopped by SIGTERM if it still runs
    (a test that failed before it ended): killed, it would leave its processes serving."""
    if supervisor.returncode is None:
        supervisor.send_signal(signal.SIGTERM)
        await asyncio.wait_for(supervisor.wait(), timeout=30)
    return await log_once_ended(supervisor, log)


@pytest.mark.parametrize("catalog", ["missing", "infinite timeout"])
async def test_a_worker_pool_with_a_bad_catalog_says_so_once_and_starts_no_process(
    settings: Settings, tmp_path: Path, catalog: str
) -> None:
    # Given a catalog that cannot be read, or one whose timeout is infinite
    path = tmp_path / "catalog.yaml"
    if catalog == "infinite timeout":
        path.write_text(MOCK_CATALOG.read_text().replace("timeout: 30", "timeout: .inf", 1))
    async with MockProvider(MockConfig()) as mock:
        env = worker_env(settings, mock, QUEUEGATE_CATALOG=str(path))
        # When a pool of two worker processes is started with it
        supervisor = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli", "worker", "--processes", "2",
            env=env, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert supervisor.stderr is not None
        log = LogLines(supervisor.stderr)
        try:
            await asyncio.wait_for(supervisor.wait(), timeout=30)
        finally:
            output = await _ended(supervisor, log)

    # Expect it to exit 1 having said why once, no process started (before: each said it)
    assert supervisor.returncode == 1, output[-3000:]
    said = [line for line in output.splitlines() if "error:" in line]
    assert len(said) == 1 and f"{path}:" in said[0], output[-3000:]
    assert not STARTED.search(output), output[-3000:]
