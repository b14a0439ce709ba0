"""The delivery guarantees under faults, counted from outside: ``python -m bench.chaos``.

Each fault runs on its own stack (namespace, schema; the mock provider at 20 ms, worker and
accounting processes; loopback only) and is bounded in jobs:

- ``duplicate publish``: every job published twice at once (a producer's resend);
- ``worker SIGKILL``: one of two workers killed mid-run, then started again;
- ``Redis restart``: a private Redis (no persistence) killed mid-run and started again empty,
  then every job published again (a pipeline run again after the loss).

Columns: jobs submitted; answered (job ids with a result); lost (submitted, never answered);
dup results (results beyond the first per job at the producer) and how many of those carried
a different answer; extra calls (provider calls beyond one per job); usage rows (one per job
expected) and double-counted (rows beyond one per job id); lost calls (calls of killed owners
on the usage rows); Redis - PG (the team's spend counter in Redis minus its spend in
PostgreSQL, USD, once accounting has written every row).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis
from rich.console import Console
from rich.table import Table

from bench.stack import TEAM, Stack, free_port, running_stack
from producer import GatewayClient, JobHandle
from queuegate.db import create_pool
from queuegate.keys import Keys
from queuegate.messages import ChatJob, ChatResult
from queuegate.redis_client import redis_for
from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from queuegate.spend import Scope, reconcile, reconciler_token, spend_drift

JOBS = 300
LATENCY_MS = 20
LEASE = "2"
"""Seconds of a claim's lease here: a killed worker's jobs are taken over this soon."""
BUDGET = TeamConfig(budget_usd=Decimal(1000))
"""A budget far from reach: jobs reserve and settle spend in Redis as operators run them."""
AT_ONCE = 100


@dataclass
class Row:
    fault: str
    submitted: int = 0
    answered: int = 0
    lost: int = 0
    dup_results: int = 0
    differing: int = 0
    extra_calls: int = 0
    usage_rows: int = 0
    double_counted: int = 0
    lost_calls: int = 0
    redis_minus_pg: str = ""


class _Answers:
    """Every result the clients received, by job id."""

    def __init__(self) -> None:
        self.by_job: dict[str, list[ChatResult]] = {}

    async def collect(self, handles: list[JobHandle], timeout: float = 60) -> None:
        async def one(handle: JobHandle) -> None:
            with contextlib.suppress(Exception):
                result = await handle.result(timeout=timeout)
                self.by_job.setdefault(result.job_id, []).append(result)

        await asyncio.gather(*(one(h) for h in handles))


async def _submit(client: GatewayClient, jobs: list[ChatJob], copies: int = 1) -> list[JobHandle]:
    gate = asyncio.Semaphore(AT_ONCE)

    async def one(job: ChatJob) -> JobHandle:
        async with gate:
            return await client.submit(job)

    return list(await asyncio.gather(*(one(job) for job in jobs * copies)))


def _jobs(client: GatewayClient, tag: str) -> list[ChatJob]:
    return [
        client.job("gpt-4o-mini", [{"role": "user", "content": f"{tag} {i}"}], max_tokens=20)
        for i in range(JOBS)
    ]


async def _calls(stack: Stack) -> int:
    return int((await stack.mock_stats())["calls"])


async def _wait_calls(stack: Stack, count: int) -> None:
    deadline = time.monotonic() + 60
    while await _calls(stack) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the mock did not reach {count} calls")
        await asyncio.sleep(0.05)


async def _account(stack: Stack, row: Row, clients: list[GatewayClient], answers: _Answers) -> Row:
    row.answered = len(answers.by_job)
    row.lost = row.submitted - row.answered
    row.dup_results = sum(c.duplicates for c in clients)
    row.differing = sum(
        len({r.response["choices"][0]["message"]["content"] for r in rs if r.response}) > 1
        for rs in answers.by_job.values()
    )
    row.extra_calls = await _calls(stack) - row.submitted
    s = stack.settings
    conn = await asyncpg.connect(s.database_url, server_settings={"search_path": s.database_schema})
    try:
        deadline = time.monotonic() + 60
        query = "SELECT count(*) FROM usage_log WHERE job_id NOT LIKE '%/refused/%'"
        while (n := int(await conn.fetchval(query))) < row.submitted:
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        row.usage_rows = n
        distinct = "SELECT count(DISTINCT (team, job_id)) FROM usage_log"
        row.double_counted = n - int(
            await conn.fetchval(distinct + " WHERE job_id NOT LIKE '%/refused/%'")
        )
        row.lost_calls = int(
            await conn.fetchval(
                "SELECT count(*) FROM usage_log, jsonb_array_elements(attempt_log) AS a"
                " WHERE a->>'error' = 'lost'"
            )
        )
    finally:
        await conn.close()
    row.redis_minus_pg = await _drift(s)
    return row


async def _drift(s: Settings) -> str:
    """The spend counter minus PostgreSQL's spend at the end, then after one reconciliation
    (which the accountant runs every QUEUEGATE_SPEND_RECONCILE_INTERVAL seconds)."""
    month = datetime.now(UTC).strftime("%Y-%m")
    keys = Keys(s.redis_prefix)
    redis = redis_for(s)
    pool = await create_pool(s)
    try:
        before = await spend_drift(redis, pool, keys, TEAM, month)
        await reconcile(redis, pool, keys, [Scope(TEAM)], month, token=reconciler_token())
        after = await spend_drift(redis, pool, keys, TEAM, month)
    finally:
        await pool.close()
        await redis.aclose()
    return f"{before:+.6f} -> {after:+.6f}"


async def duplicate_publish() -> Row:
    row = Row("duplicate publish")
    async with (
        running_stack(latency_ms=LATENCY_MS, team=BUDGET) as stack,
        GatewayClient(stack.settings, team=TEAM) as client,
    ):
        jobs = _jobs(client, "dup")
        handles = await _submit(client, jobs, copies=2)
        row.submitted = len(jobs)
        answers = _Answers()
        await answers.collect(handles[: len(jobs)])
        # The second copies' results arrive too; the client drops them as duplicates.
        await _settle(lambda: client.duplicates)
        return await _account(stack, row, [client], answers)


async def worker_sigkill() -> Row:
    row = Row("worker SIGKILL")
    async with (
        running_stack(
            workers=2,
            latency_ms=LATENCY_MS,
            team=BUDGET,
            extra_env={"QUEUEGATE_CLAIM_LEASE": LEASE},
        ) as stack,
        GatewayClient(stack.settings, team=TEAM) as client,
    ):
        jobs = _jobs(client, "kill")
        submitting = asyncio.create_task(_submit(client, jobs))
        await _wait_calls(stack, JOBS // 3)
        victim = stack.processes["worker1"]
        victim.send_signal(signal.SIGKILL)
        await victim.wait()
        await stack.spawn("worker1", "worker", "--teams", TEAM, "--log-level", "warning")
        handles = await submitting
        row.submitted = len(jobs)
        answers = _Answers()
        await answers.collect(handles)
        return await _account(stack, row, [client], answers)


class PrivateRedis:
    """A Redis of its own on a free port, without persistence: a restart loses its data.

    ``options`` are more of redis-server's (``--replicaof``, ``--dir``); ``config`` is a
    config file to start from (a Sentinel's, with ``--sentinel`` among the options).
    """

    def __init__(self, *options: str, config: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._options = options
        self._config = config
        self._process: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> PrivateRedis:
        await self.start()
        return self

    @property
    def pid(self) -> int:
        """The running server's process id."""
        if self._process is None:
            raise RuntimeError("this Redis is not running")
        return self._process.pid

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def restart(self) -> None:
        """Kill it and start it again, empty."""
        await self.kill()
        await self.start()

    async def kill(self) -> None:
        """SIGKILL: what it has not written anywhere is gone."""
        await self._stop(signal.SIGKILL)

    async def stop(self) -> None:
        self.resume()  # a paused process cannot act on SIGTERM
        await self._stop(signal.SIGTERM)

    def pause(self) -> None:
        """SIGSTOP: it answers nobody, and reads nothing (a replica falls behind)."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    async def start(self) -> None:
        """Start it (again, after ``stop`` or ``kill``: with what it kept, if persistent)."""
        config = () if self._config is None else (str(self._config),)
        args = ("--port", str(self.port), "--save", "", "--appendonly", "no", *self._options)
        self._process = await asyncio.create_subprocess_exec(
            "redis-server", *config, *args, stdout=asyncio.subprocess.DEVNULL
        )
        client = aioredis.from_url(self.url)
        try:
            async with asyncio.timeout(10):
                while True:
                    with contextlib.suppress(OSError, aioredis.ConnectionError):
                        await client.ping()
                        return
                    await asyncio.sleep(0.05)
        finally:
            await client.aclose()

    def _signal(self, sig: signal.Signals) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.send_signal(sig)

    async def _stop(self, sig: signal.Signals) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.send_signal(sig)
            await self._process.wait()


async def redis_restart() -> Row:
    row = Row("Redis restart, data lost")
    async with (
        PrivateRedis() as redis,
        running_stack(latency_ms=LATENCY_MS, team=BUDGET, redis_url=redis.url) as stack,
        GatewayClient(stack.settings, team=TEAM) as client,
        GatewayClient(stack.settings, team=TEAM) as again,
    ):
        jobs = _jobs(client, "redis")
        submitting = asyncio.create_task(_submit(client, jobs))
        await _wait_calls(stack, JOBS // 2)
        await redis.restart()
        handles = await submitting
        row.submitted = len(jobs)
        answers = _Answers()
        await answers.collect(handles)
        await stack.wait_rows(len(jobs), timeout=60)
        # The pipeline runs again: the same jobs, from a new client.
        rerun = _Answers()
        await rerun.collect(await _submit(again, jobs))
        for job_id, results in rerun.by_job.items():
            answers.by_job.setdefault(job_id, []).extend(results)
        return await _account(stack, row, [client, again], answers)


async def _settle(read: Callable[[], int], still: float = 1.0) -> None:
    """Wait until ``read`` stops changing for ``still`` seconds (at most 30 s)."""
    last, since, deadline = read(), time.monotonic(), time.monotonic() + 30
    while time.monotonic() - since < still and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        now = read()
        if now != last:
            last, since = now, time.monotonic()


FAULTS: dict[str, Callable[[], Awaitable[Row]]] = {
    "duplicate": duplicate_publish,
    "sigkill": worker_sigkill,
    "redis": redis_restart,
}


async def main() -> None:
    rows = []
    for run in FAULTS.values():
        rows.append(await run())
    table = Table(
        title=f"delivery guarantees under faults: {JOBS} jobs each, mock at {LATENCY_MS} ms"
    )
    headers = [
        "fault",
        "submitted",
        "answered",
        "lost",
        "dup results",
        "differing",
        "extra calls",
        "usage rows",
        "double-counted",
        "lost calls",
        "Redis - PG $ (reconciled)",
    ]
    for header in headers:
        table.add_column(header, justify="left" if header == "fault" else "right")
    for row in rows:
        table.add_row(*(str(v) for v in vars(row).values()))
    Console(width=150).print(table)


if __name__ == "__main__":
    from queuegate.runtime import run

    run(main)
