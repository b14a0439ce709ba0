"""Benchmark: a batch file end to end through real processes, and the memory submit and collect
need.

    .venv/bin/python -m bench.batch                      # 20,000 lines, mock at 0 and 500 ms
    .venv/bin/python -m bench.batch --lines 5000 --latency-ms 0

Every part runs as its own process, as deployed: the mock provider, ``--workers`` workers,
accounting, then ``queuegate batch submit`` and ``queuegate batch collect`` started together,
as a team added the default way runs them (its own broker user, no Redis). Peak memory is
each process's max RSS (``wait4``). Beside the batch's end-to-end rate stands the workers'
own throughput in the same run (jobs finished per second, first to last, from usage_log):
the batch's overhead is the gap between them. Loopback only, one namespace of its own,
removed afterwards. Figures on a shared machine are noisy: compare runs made side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import aio_pika
import aiormq
import asyncpg
import orjson
from rich.console import Console
from rich.table import Table

from admin.teams import Credentials, add
from queuegate.control import batch_reply_name
from queuegate.db import quote_ident
from queuegate.keys import Keys
from queuegate.management import BrokerAdmin
from queuegate.namespace import drop_namespace
from queuegate.redis_client import redis_for
from queuegate.settings import Settings
from queuegate.topology import Topology

TEAM = "bench"
NAME = "bench"


HEADERS = (
    "lines|latency ms|workers|submit s|e2e s|jobs/s|worker jobs/s|e2e/worker"
    "|submit MiB|collect MiB|file MiB"
)


@dataclass(frozen=True)
class Figures:
    lines: int
    latency_ms: float
    workers: int
    submit_s: float
    end_to_end_s: float
    jobs_per_s: float
    worker_jobs_per_s: float
    ratio: float
    submit_peak_mib: float
    collect_peak_mib: float
    file_mib: float


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(settings: Settings, mock_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "QUEUEGATE_AMQP_URL": settings.amqp_url,
        "QUEUEGATE_REDIS_URL": settings.redis_url,
        "QUEUEGATE_DATABASE_URL": settings.database_url,
        "QUEUEGATE_NAMESPACE": settings.namespace,
        "QUEUEGATE_DATABASE_SCHEMA": settings.database_schema,
        "QUEUEGATE_MOCK_URL": mock_url,
        "QUEUEGATE_MOCK_KEY": "sk-bench",
        # Any free port: several workers (and other processes) run on this machine.
        "QUEUEGATE_METRICS_PORT": "0",
    }


def _start(env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "cli", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _wait(process: subprocess.Popen[bytes], what: str, timeout: float) -> tuple[float, float]:
    """Wait for a process; (seconds it ran after this call, its peak RSS in MiB)."""
    start = time.monotonic()
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() - start > timeout:
            process.kill()
            raise TimeoutError(f"{what} ran over {timeout} s")
        time.sleep(0.05)
    stderr = process.stderr.read().decode() if process.stderr else ""
    if process.returncode != 0:
        raise RuntimeError(f"{what} failed: {stderr[-2000:]}")
    return time.monotonic() - start, usage.ru_maxrss / 1024


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def _workers_ready(settings: Settings, timeout: float = 30) -> None:
    """Until a worker consumes the team's control queue: submit asks it first."""
    deadline = time.monotonic() + timeout
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        while True:
            channel = await connection.channel()
            try:
                queue = await channel.declare_queue(
                    Topology.of(settings).control_queue(TEAM), passive=True
                )
                if queue.declaration_result.consumer_count:
                    return
            except (aio_pika.exceptions.ChannelClosed, aiormq.exceptions.ChannelNotFoundEntity):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"no worker serves team {TEAM} after {timeout:.0f} s")
            await asyncio.sleep(0.2)


async def _add_team(settings: Settings) -> Credentials:
    """The team as ``queuegate teams add`` makes it: its own broker user."""
    return await add(settings, TEAM)


async def _worker_rate(settings: Settings, lines: int, timeout: float = 120) -> float:
    """Jobs the workers finished per second, first to last, once accounting has them all."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        table = f"{quote_ident(settings.database_schema)}.usage_log"
        deadline = time.monotonic() + timeout
        while True:
            row = await conn.fetchrow(
                f"SELECT count(*) AS n, extract(epoch FROM max(ts) - min(ts)) AS s FROM {table}"
            )
            if row["n"] >= lines or time.monotonic() > deadline:
                return float((row["n"] - 1) / row["s"]) if row["s"] else 0.0
            await asyncio.sleep(0.5)
    finally:
        await conn.close()


async def _batch_created(settings: Settings, submit: subprocess.Popen[bytes]) -> None:
    """Collect starts once submit has validated the file and recorded the batch."""
    client = redis_for(settings)
    try:
        while not await client.exists(Keys(settings.redis_prefix).batch(TEAM, NAME)):
            if submit.poll() is not None:
                return
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()


async def _cleanup(settings: Settings, user: str | None) -> None:
    queue = Topology.of(settings).results_queue(TEAM, batch_reply_name(NAME))
    await drop_namespace(settings, [TEAM], queues=[queue])
    if user is not None:
        async with BrokerAdmin.of(settings) as admin:
            await admin.delete_user(user)


def run_once(lines: int, latency_ms: float, workers: int, timeout: float) -> Figures:
    tag = uuid.uuid4().hex[:8]
    settings = Settings(namespace=f"bench-{tag}", database_schema=f"bench_{tag}")
    port = _free_port()
    env = _env(settings, f"http://127.0.0.1:{port}")
    prefetch = str(max(32, int(latency_ms * 2)))  # enough calls in flight to hide the latency
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "batch.jsonl"
        with source.open("wb") as f:
            for i in range(lines):
                body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"Q{i}"}]}
                line = {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions"}
                f.write(orjson.dumps({**line, "body": body}) + b"\n")
        file_mib = source.stat().st_size / 2**20
        services: list[subprocess.Popen[bytes]] = []
        user: str | None = None
        try:
            services.append(
                _start(env, "mock-provider", "--port", str(port), "--latency-ms", str(latency_ms))
            )
            subprocess.run([sys.executable, "-m", "cli", "migrate"], env=env, check=True, stdout=-3)
            team = asyncio.run(_add_team(settings))
            user = team.user
            assert team.amqp_url is not None
            # The batch runs with the team's own credentials and nothing else.
            team_env = {**env, "QUEUEGATE_AMQP_URL": team.amqp_url}
            team_env.pop("QUEUEGATE_REDIS_URL", None)
            team_env.pop("QUEUEGATE_DATABASE_URL", None)
            services.append(_start(env, "accounting", "--log-level", "warning"))
            for _ in range(workers):
                services.append(
                    _start(
                        env,
                        "worker",
                        "--teams",
                        TEAM,
                        "--prefetch",
                        prefetch,
                        "--log-level",
                        "warning",
                    )
                )
            asyncio.run(_workers_ready(settings))
            start = time.monotonic()
            submit = _start(
                team_env, "batch", "submit", str(source), "--team", TEAM, "--name", NAME
            )
            out = Path(tmp) / "out.jsonl"
            asyncio.run(_batch_created(settings, submit))
            collect = _start(team_env, "batch", "collect", NAME, "--team", TEAM, "--out", str(out))
            _, submit_peak = _wait(submit, "batch submit", timeout)
            submit_s = time.monotonic() - start
            _, collect_peak = _wait(collect, "batch collect", timeout)
            end_to_end = time.monotonic() - start
            written = sum(1 for _ in out.open("rb"))
            if written != lines:
                raise RuntimeError(f"{written} result lines for {lines} requests")
            worker_rate = asyncio.run(_worker_rate(settings, lines))
        finally:
            for process in reversed(services):
                _stop(process)
            asyncio.run(_cleanup(settings, user))
        return Figures(
            lines=lines,
            latency_ms=latency_ms,
            workers=workers,
            submit_s=round(submit_s, 2),
            end_to_end_s=round(end_to_end, 2),
            jobs_per_s=round(lines / end_to_end, 1),
            worker_jobs_per_s=round(worker_rate, 1),
            ratio=round(lines / end_to_end / worker_rate, 2) if worker_rate else 0.0,
            submit_peak_mib=round(submit_peak, 1),
            collect_peak_mib=round(collect_peak, 1),
            file_mib=round(file_mib, 2),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=20_000)
    parser.add_argument("--latency-ms", type=float, action="append")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900, help="per run, seconds")
    args = parser.parse_args()
    runs = [
        run_once(args.lines, latency, args.workers, args.timeout)
        for latency in args.latency_ms or [0.0, 500.0]
    ]
    table = Table(title="batch end to end (noisy: shared machine)")
    for column in HEADERS.split("|"):
        table.add_column(column, justify="right")
    for figures in runs:
        table.add_row(*(f"{v:,}" for v in asdict(figures).values()))
    Console(width=120).print(table)
    print(json.dumps([asdict(r) for r in runs]))


if __name__ == "__main__":
    main()
