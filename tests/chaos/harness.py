"""What every chaos scenario does: publish many jobs, collect what comes back, count it all."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import asyncpg

from accounting import migrate
from mockprovider import MockProvider
from producer import GatewayClient, JobHandle
from queuegate.broker import connect
from queuegate.db import create_pool
from queuegate.messages import ChatJob, ChatResult
from queuegate.registry import add_team
from queuegate.settings import Settings
from queuegate.topology import Topology

TEAMS = ("alpha", "beta", "gamma")
CONCURRENT_SUBMITS = 200
"""Jobs awaiting their confirm at once: about what a pipeline keeps outstanding."""

FIGURES: list[Figures] = []
"""The figures of the scenario running, moved onto its report (tests/chaos/conftest.py)."""
FIGURES_PROPERTY = "chaos figures"
"""The name of a report's user property holding a line of figures, printed at the end of the
run (tests/conftest.py)."""


@dataclass
class Figures:
    scenario: str
    sent: int = 0
    answered: int = 0
    lost: int = 0
    """Jobs the broker confirmed that were never answered."""
    duplicates: int = 0
    """Results the producer dropped because the job had already been answered."""
    usage_rows: int = 0
    double_counted: int = 0
    """Usage rows beyond one per job."""
    provider_calls: int = 0
    dead_lettered: int = 0
    seconds: float = 0.0
    started: float = field(default_factory=time.monotonic, repr=False)

    def done(self) -> None:
        self.seconds = round(time.monotonic() - self.started, 1)
        FIGURES.append(self)
        print(f"\n[chaos] {self.line()}")

    def line(self) -> str:
        return " ".join(f"{k}={v}" for k, v in asdict(self).items() if k != "started")


async def declare_teams(settings: Settings, teams: Sequence[str] = TEAMS) -> None:
    """``teams`` registered (``queuegate worker --teams`` serves no other) and their queues
    declared."""
    pool = await create_pool(settings)
    try:
        await migrate(pool, settings.database_schema)
        for team in teams:
            await add_team(pool, team)
    finally:
        await pool.close()
    connection = await connect(settings.amqp_url, name="chaos-declare")
    async with connection:
        channel = await connection.channel()
        for team in teams:
            await Topology.of(settings).declare_team_queue(channel, team)


def worker_env(settings: Settings, mock: MockProvider, **extra: str) -> dict[str, str]:
    """The environment of a worker process on ``settings``'s namespace and schema calling
    ``mock``; ``extra`` adds or overrides variables."""
    return {
        **os.environ,
        "QUEUEGATE_NAMESPACE": settings.namespace,
        "QUEUEGATE_METRICS_PORT": "0",  # any free port: several workers share the host
        "QUEUEGATE_DATABASE_SCHEMA": settings.database_schema,
        "QUEUEGATE_MOCK_URL": mock.url,
        "QUEUEGATE_MOCK_KEY": "sk-test",
        **extra,
    }


async def start_worker(
    env: Mapping[str, str], teams: Sequence[str], *, log: Path | None = None
) -> asyncio.subprocess.Process:
    """A worker process serving ``teams``; its log, at info, goes to ``log`` when given (to
    say why a scenario failed), else is discarded (it is killed mid-run)."""
    with contextlib.ExitStack() as files:
        stderr = asyncio.subprocess.DEVNULL if log is None else files.enter_context(log.open("a"))
        return await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "cli", "worker", "--teams", ",".join(teams)),
            *("--log-level", "warning" if log is None else "info"),
            env=env,
            stderr=stderr,
        )


async def stop_workers(workers: Sequence[asyncio.subprocess.Process]) -> None:
    """SIGTERM the worker processes still running (not those killed), and wait for all."""
    for worker in workers:
        if worker.returncode is None:
            worker.send_signal(signal.SIGTERM)
    await asyncio.wait_for(asyncio.gather(*(w.wait() for w in workers)), timeout=30)


@contextlib.asynccontextmanager
async def workers_running(
    env: Mapping[str, str], teams: Sequence[str], count: int = 1
) -> AsyncIterator[list[asyncio.subprocess.Process]]:
    """``count`` worker processes serving ``teams`` while the body runs, stopped after it."""
    workers = [await start_worker(env, teams) for _ in range(count)]
    try:
        yield workers
    finally:
        await stop_workers(workers)


@contextlib.asynccontextmanager
async def team_clients(
    open_client: Callable[[str], GatewayClient],
) -> AsyncIterator[list[GatewayClient]]:
    """A client of each of ``TEAMS``, as ``open_client(team)`` makes it, open while the body
    runs."""
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(open_client(team)) for team in TEAMS]


async def jobs_flowing(
    clients: Sequence[GatewayClient], mock: MockProvider, jobs: int, calls: int, within: float
) -> asyncio.Task[list[JobHandle]]:
    """The task submitting ``jobs`` jobs round-robin over ``clients``, once ``mock`` has been
    called ``calls`` times (within ``within`` seconds): a fault that strikes now comes mid-run."""
    submitting = asyncio.create_task(submit_all(clients, jobs))
    async with asyncio.timeout(within):
        await mock.wait_for_calls(calls)
    return submitting


async def submit_all(clients: Sequence[GatewayClient], count: int) -> list[JobHandle]:
    """Submit ``count`` jobs round-robin over the clients' teams, a few hundred at a time."""
    chosen = [clients[i % len(clients)] for i in range(count)]
    jobs = [chat_job(client, f"job {i}") for i, client in enumerate(chosen)]
    return await _submitted(list(zip(chosen, jobs, strict=True)))


def chat_job(client: GatewayClient, text: str) -> ChatJob:
    """A small chat job of the client's team."""
    return client.job("gpt-4o-mini", [{"role": "user", "content": text}])


async def submit_jobs(client: GatewayClient, jobs: Sequence[ChatJob]) -> list[JobHandle]:
    """Submit ``jobs`` (made before, to be submitted again), a few hundred at a time."""
    return await _submitted([(client, job) for job in jobs])


async def _submitted(jobs: Sequence[tuple[GatewayClient, ChatJob]]) -> list[JobHandle]:
    gate = asyncio.Semaphore(CONCURRENT_SUBMITS)

    async def one(client: GatewayClient, job: ChatJob) -> JobHandle:
        async with gate:
            return await client.submit(job)

    return list(await asyncio.gather(*(one(client, job) for client, job in jobs)))


async def collect(handles: Sequence[JobHandle], timeout: float) -> list[ChatResult]:
    """The results that arrive within ``timeout`` seconds; the others are lost."""
    waits = [asyncio.ensure_future(h.result(timeout=None)) for h in handles]
    done, pending = await asyncio.wait(waits, timeout=timeout)
    for waiting in pending:
        waiting.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return [waiting.result() for waiting in waits if waiting in done]


async def usage_rows(pool: asyncpg.Pool, expected: int, timeout: float) -> tuple[int, int]:
    """``(rows, distinct job ids)`` of usage_log once it holds ``expected`` rows."""
    deadline = time.monotonic() + timeout
    while True:
        row = await pool.fetchrow(
            "SELECT count(*) AS n, count(DISTINCT job_id) AS d FROM usage_log"
        )
        if row["n"] >= expected or time.monotonic() > deadline:
            return int(row["n"]), int(row["d"])
        await asyncio.sleep(0.1)


async def dead_lettered(settings: Settings, expected: int = 0, timeout: float = 0) -> int:
    """Messages in the dead-letter queues (accounting's and each of TEAMS'), once there are
    ``expected`` (or ``timeout`` is up). Counted by passive declares: private brokers have no
    management API to list them."""
    deadline = time.monotonic() + timeout
    topology = Topology.of(settings)
    queues = [topology.dead_queue, *(topology.team_dead_queue(team) for team in TEAMS)]
    connection = await connect(settings.amqp_url, name="chaos-dead-letters")
    async with connection:
        channel = await connection.channel()
        # Declared as every component does, so that each exists to be counted.
        for team in TEAMS:
            await topology.declare_team_dead(channel, team)
        # The underlying channel: a robust one answers a passive declare from its own memory.
        underlay = await channel.get_underlay_channel()
        while True:
            count = 0
            for queue in queues:
                declared = await underlay.queue_declare(queue, passive=True)
                count += int(declared.message_count or 0)
            if count >= expected or time.monotonic() > deadline:
                return count
            await asyncio.sleep(0.1)


async def expect_each_job_once(
    submitting: asyncio.Task[list[JobHandle]],
    *,
    clients: Sequence[GatewayClient],
    pool: asyncpg.Pool,
    mock: MockProvider,
    dead: Settings,
    figures: Figures,
    timeout: float = 60,
    worker_logs: Sequence[Path] = (),
) -> None:
    """Every confirmed job answered exactly once at the producer, called once and accounted
    once (``mock`` called once a job), nothing dead-lettered; the figures are recorded and
    printed. ``timeout``: seconds
    the results may take to arrive, after the last job is confirmed. ``worker_logs``: the
    workers' logs, quoted when a job was called more than once."""
    handles = await submitting
    figures.sent = len(handles)
    results = await collect(handles, timeout=timeout)
    figures.answered = len({r.job_id for r in results})
    figures.lost = figures.sent - figures.answered
    figures.duplicates = sum(c.duplicates for c in clients)
    rows, distinct = await usage_rows(pool, len(handles), timeout=timeout / 2)
    figures.usage_rows = rows
    figures.double_counted = rows - distinct
    figures.provider_calls = mock.stats.calls
    figures.dead_lettered = await dead_lettered(dead)
    figures.done()
    assert all(r.status == "ok" for r in results)
    assert figures.answered == len(handles)
    assert rows == distinct == len(handles)
    assert figures.provider_calls == len(handles), await _called_again(pool, worker_logs)
    assert figures.dead_lettered == 0


async def _called_again(pool: asyncpg.Pool, worker_logs: Sequence[Path]) -> str:
    """Why jobs were called more than once, as far as their usage rows and the workers' logs
    tell: the rows with more than one attempt, and what the workers said of those jobs."""
    rows = await pool.fetch(
        "SELECT job_id, attempt_log::text AS attempts FROM usage_log"
        " WHERE jsonb_array_length(attempt_log) > 1 ORDER BY job_id"
    )
    jobs = {row["job_id"] for row in rows}
    said = [
        line
        for path in worker_logs
        for line in path.read_text(errors="replace").splitlines()
        if any(job in line for job in jobs) or " WARNING " in line or " ERROR " in line
    ]
    return "\n".join(
        [
            f"{len(rows)} usage row(s) with more than one attempt:",
            *(f"  {row['job_id']}: {row['attempts']}" for row in rows),
            f"the workers' log lines on them, and their warnings ({len(said)}):",
            *said[-60:],
        ]
    )
