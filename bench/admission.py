"""Admission control, measured on the local services: precision, fairness, cost.

    .venv/bin/python -m bench.admission                  # all three, full size (about 3 min)
    .venv/bin/python -m bench.admission precision --seconds 20
    .venv/bin/python -m bench.admission fairness --a-jobs 5000 --b-seconds 10
    .venv/bin/python -m bench.admission cost --jobs 2000

- precision: a 600 RPM team bucket shared by 2 worker processes, each with 50 jobs always
  waiting on it, for ``--seconds``; the bucket starts full (its burst: five seconds of the
  rate, 50), so a precise bucket admits 50 + 10/s·T. Reports the rate after that initial
  burst against 600/min.
- fairness: team A offers ``--a-jobs`` at once while team B offers 5 jobs/s for
  ``--b-seconds``; B's time-to-result (p50, p99) with A flooding versus with A idle. A worker
  process serves both teams against a mock provider answering in ``--latency-ms`` (500: an
  LLM call's order of magnitude; at 20 ms the worker is CPU-bound and B shares its CPU).
- cost: what admission adds per job (the budget's reservation with the team's buckets, the
  deployment's bucket, then every settle: three round trips), job after job, p50 and p99.

Every process runs on uvloop, as ``queuegate worker`` does. Each run uses a namespace and
schema of its own and removes them. Prints tables and one JSON
line. Figures are noisy on a shared machine: say so when quoting them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import time
import uuid
from contextlib import AsyncExitStack
from decimal import Decimal
from typing import Any, NamedTuple

import aio_pika
from rich.console import Console
from rich.table import Table

from accounting import migrate
from queuegate.db import create_pool
from queuegate.messages import ChatJob, ChatMessage
from queuegate.namespace import drop_namespace
from queuegate.redis_client import redis_for
from queuegate.registry import TeamConfig, add_team, default_burst, set_team_config
from queuegate.runtime import run
from queuegate.settings import Settings
from queuegate.topology import Topology
from router import Catalog, Routed, load_catalog
from workers.admission import Admission

console = Console()
B_RATE = 5.0
"""Team B's jobs per second in the fairness run."""


def _settings() -> Settings:
    tag = uuid.uuid4().hex[:8]
    return Settings().model_copy(
        update={"namespace": f"qgbench-{tag}", "database_schema": f"qgbench_{tag}"}
    )


def _job(team: str) -> ChatJob:
    return ChatJob(
        job_id=uuid.uuid4().hex,
        team=team,
        model="gpt-4o-mini",
        messages=[ChatMessage(role="user", content="How precise is a token bucket?")],
    )


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _register(settings: Settings, teams: dict[str, TeamConfig]) -> None:
    pool = await create_pool(settings)
    try:
        await migrate(pool, settings.database_schema)
        for name, config in teams.items():
            await add_team(pool, name)
            await set_team_config(pool, name, config)
    finally:
        await pool.close()


# precision ---------------------------------------------------------------------------------


def _precision_process(settings: Settings, seconds: float, waiters: int, out: Any) -> None:
    async def main() -> list[float]:
        client = redis_for(settings)
        pool = await create_pool(settings)
        admission = Admission(settings, client, pool, load_catalog(None, {}))
        admission.update({"bench": TeamConfig(rpm=600)})
        admitted: list[float] = []
        end = time.time() + seconds

        async def waiter() -> None:
            while time.time() < end:
                ticket = await admission.admit(_job("bench"), deadline=None)
                admitted.append(time.time())
                await ticket.settle(None)

        try:
            tasks = [asyncio.create_task(waiter()) for _ in range(waiters)]
            await asyncio.sleep(seconds)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await client.aclose()
            await pool.close()
        return [t for t in admitted if t < end]

    out.put(run(main))


async def precision(seconds: float) -> dict[str, float]:
    settings = _settings()
    await _register(settings, {})
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_precision_process, args=(settings, seconds, 50, queue))
        for _ in range(2)
    ]
    for proc in procs:
        proc.start()
    per_process = [await asyncio.to_thread(queue.get) for _ in procs]
    for proc in procs:
        proc.join()
    await drop_namespace(settings, [])
    times = sorted(t for ts in per_process for t in ts)
    total = len(times)
    run = times[-1] - times[0] if total > 1 else seconds
    burst = default_burst(600)
    steady = (total - burst) / seconds * 60
    result = {
        "seconds": seconds,
        "admitted": total,
        "admitted_per_process": [len(ts) for ts in per_process],
        "expected": burst + 10 * seconds,
        "steady_rate_per_min": round(steady, 1),
        "error_pct": round((steady - 600) / 600 * 100, 2),
        "span_s": round(run, 2),
    }
    table = Table(title=f"precision: 600 RPM bucket, 2 processes x 50 waiters, {seconds:.0f} s")
    for column in ("admitted", f"expected ({burst} + 10/s)", "rate after burst /min", "error"):
        table.add_column(column, justify="right")
    table.add_row(
        f"{total:,}",
        f"{burst + 10 * seconds:,.0f}",
        f"{steady:.1f}",
        f"{result['error_pct']:+.2f} %",
    )
    console.print(table)
    return result  # type: ignore[return-value]


# fairness ----------------------------------------------------------------------------------


def _gateway_process(settings: Settings, latency_ms: float, ready: Any, stop: Any) -> None:
    from accounting import Accountant
    from mockprovider import Behavior, MockConfig, MockProvider
    from router import open_router
    from workers import Worker

    async def main() -> None:
        halt = asyncio.Event()
        mock_config = MockConfig(default=Behavior(latency_ms=latency_ms))
        async with MockProvider(mock_config) as mock:
            env = {"QUEUEGATE_MOCK_URL": mock.url, "QUEUEGATE_MOCK_KEY": "sk-bench"}
            async with open_router(load_catalog(None, env), env, settings) as router:
                worker = Worker(settings, router, teams=["a", "b"], name="bench-worker")
                async with Accountant(settings) as accountant:
                    tasks = [
                        asyncio.create_task(worker.run(halt)),
                        asyncio.create_task(accountant.run(halt)),
                    ]
                    await worker.ready.wait()
                    ready.set()
                    await asyncio.to_thread(stop.wait)
                    halt.set()
                    await asyncio.gather(*tasks)

    run(main)


class _Split(NamedTuple):
    """One B job's time to result, and the parts of it spent queued and at the provider."""

    total: float
    queued: float
    provider: float


async def _b_latencies(settings: Settings, seconds: float) -> list[_Split]:
    from producer import GatewayClient

    async with GatewayClient(settings, team="b") as client:
        latencies: list[_Split] = []

        async def one() -> None:
            started = time.monotonic()
            result = await client.chat("gpt-4o-mini", [{"role": "user", "content": "hi"}])
            assert result.status == "ok", result.error
            total = (time.monotonic() - started) * 1000
            gateway = result.gateway
            latencies.append(_Split(total, gateway.queued_ms, gateway.latency_ms))

        tasks = []
        for _ in range(int(seconds * B_RATE)):
            tasks.append(asyncio.create_task(one()))
            await asyncio.sleep(1 / B_RATE)
        await asyncio.gather(*tasks)
        return latencies


async def _flood(client: Any, jobs: int) -> None:
    """Publish A's jobs with about 100 confirms outstanding (a fast producer's pace)."""
    limit = asyncio.Semaphore(100)
    flood = [{"role": "user", "content": "flood"}]

    async def submit() -> None:
        async with limit:
            await client.submit(client.job("gpt-4o-mini", flood))

    await asyncio.gather(*(submit() for _ in range(jobs)))


async def fairness(
    a_jobs: int, b_seconds: float, latency_ms: float, limits: bool
) -> dict[str, float]:
    settings = _settings()
    generous = (
        TeamConfig(rpm=1_000_000, tpm=1_000_000_000, budget_usd=Decimal(1_000_000))
        if limits
        else TeamConfig()
    )
    await _register(settings, {"a": generous, "b": generous})
    ctx = multiprocessing.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_gateway_process, args=(settings, latency_ms, ready, stop))
    proc.start()
    try:
        await asyncio.to_thread(ready.wait, 60)
        idle = await _b_latencies(settings, b_seconds)
        async with AsyncExitStack() as stack:
            from producer import GatewayClient

            a_client = await stack.enter_async_context(GatewayClient(settings, team="a"))
            started = time.monotonic()
            flood = asyncio.create_task(_flood(a_client, a_jobs))
            loaded = await _b_latencies(settings, b_seconds)
            await flood
            a_left = await _queue_depth(settings, "a")
            flood_s = time.monotonic() - started
    finally:
        stop.set()
        await asyncio.to_thread(proc.join, 120)
        await drop_namespace(settings, ["a", "b"])
    total_idle, total_loaded = [b.total for b in idle], [b.total for b in loaded]
    p99_idle, p99_loaded = _pct(total_idle, 0.99), _pct(total_loaded, 0.99)
    result: dict[str, Any] = {
        "a_jobs": a_jobs,
        "latency_ms": latency_ms,
        "limits": limits,
        "prefetch": settings.prefetch,
        "b_jobs": len(loaded),
        "b_p50_idle_ms": round(statistics.median(total_idle), 1),
        "b_p99_idle_ms": round(p99_idle, 1),
        "b_p50_flood_ms": round(statistics.median(total_loaded), 1),
        "b_p99_flood_ms": round(p99_loaded, 1),
        "p99_ratio": round(p99_loaded / p99_idle, 2),
        "a_still_queued_at_end": a_left,
        "elapsed_s": round(flood_s, 1),
    }
    table = Table(
        title=f"fairness: B at {B_RATE:.0f} jobs/s while A offers {a_jobs:,} at once "
        f"(provider {latency_ms:.0f} ms, prefetch {settings.prefetch})"
    )
    columns = ("", "B p50 ms", "B p99 ms", "p99 queued", "p99 provider", "p99 rest")
    for column in columns:
        table.add_column(column, justify="right")
    for label, splits in (("A idle", idle), ("A flooding", loaded)):
        parts = _parts(splits)
        result[f"b_p99_parts_{label.split()[1]}_ms"] = parts
        table.add_row(label, *(f"{value:.1f}" for value in parts.values()))
    table.caption = (
        f"p99 ratio {result['p99_ratio']}x; A jobs still queued when B finished: {a_left:,}. "
        "queued: publish to the worker's pickup; rest: the worker's own work and the reply"
    )
    console.print(table)
    return result


def _parts(splits: list[_Split]) -> dict[str, float]:
    totals = [b.total for b in splits]
    return {
        "p50": round(statistics.median(totals), 1),
        "p99": round(_pct(totals, 0.99), 1),
        "queued": round(_pct([b.queued for b in splits], 0.99), 1),
        "provider": round(_pct([b.provider for b in splits], 0.99), 1),
        "rest": round(_pct([b.total - b.queued - b.provider for b in splits], 0.99), 1),
    }


async def _queue_depth(settings: Settings, team: str) -> int:
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(Topology.of(settings).team_queue(team), passive=True)
        return queue.declaration_result.message_count or 0


# cost --------------------------------------------------------------------------------------


async def cost(jobs: int) -> dict[str, float]:
    settings = _settings()
    await _register(settings, {})
    client = redis_for(settings)
    pool = await create_pool(settings)
    catalog: Catalog = load_catalog(None, {})
    deployment = (
        catalog.resolve("gpt-4o-mini")
        .deployments[0]
        .model_copy(update={"rpm": 10_000_000, "tpm": 10_000_000_000})
    )
    admission = Admission(settings, client, pool, catalog)
    admission.update(
        {"bench": TeamConfig(rpm=10_000_000, tpm=10_000_000_000, budget_usd=Decimal(1_000_000))}
    )
    routed = Routed(
        response={},
        model_used="gpt-4o-mini",
        deployment=deployment.name,
        provider="openai",
        fallback_used=False,
        attempts=[],
        input_tokens=10,
        output_tokens=20,
        cached_tokens=0,
        cost_usd=Decimal("0.00001"),
        latency_ms=0.0,
    )
    samples: list[float] = []
    try:
        for _ in range(jobs):
            job = _job("bench")
            started = time.perf_counter()
            ticket = await admission.admit(job, deadline=None)
            await ticket.enter(deployment)
            await ticket.settle(routed)
            samples.append((time.perf_counter() - started) * 1000)
    finally:
        await client.aclose()
        await pool.close()
        await drop_namespace(settings, [])
    result = {
        "jobs": jobs,
        "p50_ms": round(statistics.median(samples), 3),
        "p99_ms": round(_pct(samples, 0.99), 3),
        "mean_ms": round(statistics.fmean(samples), 3),
    }
    table = Table(title=f"cost of admission per job ({jobs:,} jobs, 3 round trips each)")
    for column in ("p50 ms", "p99 ms", "mean ms"):
        table.add_column(column, justify="right")
    table.add_row(f"{result['p50_ms']:.3f}", f"{result['p99_ms']:.3f}", f"{result['mean_ms']:.3f}")
    console.print(table)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "which", nargs="?", choices=["precision", "fairness", "cost", "all"], default="all"
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="precision run length")
    parser.add_argument("--a-jobs", type=int, default=20_000, help="team A's flood")
    parser.add_argument("--b-seconds", type=float, default=20.0, help="team B's trickle length")
    parser.add_argument("--latency-ms", type=float, default=500.0, help="mock provider latency")
    parser.add_argument(
        "--no-limits", action="store_true", help="fairness without admission work, to compare"
    )
    parser.add_argument("--jobs", type=int, default=2000, help="jobs timed for the cost")
    args = parser.parse_args()
    figures: dict[str, object] = {"cpus": os.cpu_count()}
    if args.which in ("precision", "all"):
        figures["precision"] = run(lambda: precision(args.seconds))
    if args.which in ("cost", "all"):
        figures["cost"] = run(lambda: cost(args.jobs))
    if args.which in ("fairness", "all"):
        figures["fairness"] = run(
            lambda: fairness(args.a_jobs, args.b_seconds, args.latency_ms, not args.no_limits)
        )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
