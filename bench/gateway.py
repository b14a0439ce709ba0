"""Scenarios through the whole gateway: producer → broker → worker → mock → result + usage row."""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

from bench.measure import (
    Figure,
    cpu_bound,
    cpu_per_thousand,
    latency_figures,
    own_cpu,
    percentile,
    post_load,
    run_lanes,
)
from bench.otlp_sink import OtlpSink
from bench.stack import TEAM, Stack, peak_rss_mb, running_stack
from producer import GatewayClient, JobHandle
from queuegate.registry import TeamConfig

MESSAGES = [{"role": "user", "content": "Summarise the benefits of a message queue in one line."}]
WARM_UP = 200

GOVERNED = TeamConfig(rpm=10**7, tpm=10**10, budget_usd=Decimal(10**6))
"""A team as operators run them, rate limits and a monthly budget, none of them reached: every
job reserves and settles its budget and takes from and settles the team's buckets."""
GOVERNED_CATALOG = """
models:
  gpt-4o-mini:              # the provider account's own limits, not reached either
    deployments:
      - {name: openai-main, provider: openai, model: gpt-4o-mini,
         api_base: "${QUEUEGATE_MOCK_URL}", api_key_env: QUEUEGATE_MOCK_KEY,
         input_per_mtok: 0.15, output_per_mtok: 0.60, rpm: 10000000, tpm: 10000000000}
"""


def timed_chat(
    client: GatewayClient, messages: list[dict[str, str]] = MESSAGES
) -> Callable[[], Awaitable[float]]:
    """One chat job of ``messages`` through ``client``, answered ``ok``: its milliseconds."""

    async def one() -> float:
        started = time.perf_counter()
        result = await client.chat("gpt-4o-mini", messages, max_tokens=16, timeout=60)
        if result.status != "ok":
            raise RuntimeError(f"bench job failed: {result.error}")
        return (time.perf_counter() - started) * 1000

    return one


def cpu_with_producer(stack: Stack) -> dict[str, float]:
    return {**stack.cpu(), "producer": own_cpu()}


async def overhead(*, jobs: int) -> list[Figure]:
    """End-to-end time per job with the mock at 0 ms, at concurrency 1, 16 and 64. One at a
    time, also the gateway's share: the same percentile less that of a call straight to the
    mock (its own time, measured first; under load that is the gateway's queueing instead)."""
    async with (
        running_stack(workers=1) as stack,
        GatewayClient(stack.settings, team=TEAM) as client,
    ):
        stages: list[tuple[float, float, float]] = []

        async def one() -> float:
            started = time.perf_counter()
            result = await client.chat("gpt-4o-mini", MESSAGES, max_tokens=16, timeout=60)
            if result.status != "ok" or result.gateway is None:
                raise RuntimeError(f"bench job failed: {result.error}")
            ms = (time.perf_counter() - started) * 1000
            queued, called = result.gateway.queued_ms, result.gateway.latency_ms
            stages.append((queued, called, ms - queued - called))
            return ms

        await run_lanes(one, WARM_UP, 16)  # connections, pools and caches warm
        direct = await post_load(f"{stack.mock_url}/v1/chat/completions", jobs, 1)
        mock = latency_figures(direct[0])
        figures = [Figure("overhead", "mock alone, c=1", mock)]
        for concurrency in (1, 16, 64):
            stages.clear()
            before, started = cpu_with_producer(stack), time.perf_counter()
            ms = latency_figures(await run_lanes(one, jobs, concurrency))
            elapsed = time.perf_counter() - started
            own = (
                {
                    "overhead_p50_ms": ms["p50_ms"] - mock["p50_ms"],
                    "overhead_p99_ms": ms["p99_ms"] - mock["p99_ms"],
                    **_stages(stages),
                }
                if concurrency == 1
                else {}
            )
            values = {
                **ms,
                **own,
                "per_s": round(jobs / elapsed),
                **cpu_per_thousand(before, cpu_with_producer(stack), jobs),
            }
            figures.append(Figure("overhead", f"c={concurrency}", values))
    return figures


def _stages(stages: list[tuple[float, float, float]]) -> dict[str, float]:
    """Where one job's time goes, each stage's p50: from the producer's publish to the worker
    (queued), the provider call as the worker timed it (provider), and everything else: the
    worker's own work before and after the call, the result's way back, the producer's own."""
    queued, called, rest = zip(*stages, strict=True)
    return {
        "queued_p50_ms": percentile(list(queued), 50),
        "provider_p50_ms": percentile(list(called), 50),
        "rest_p50_ms": percentile(list(rest), 50),
    }


async def throughput(
    *,
    jobs: int,
    workers: int,
    latency_ms: float = 0,
    prefetch: int = 256,
    governed: bool = False,
    extra_env: dict[str, str] | None = None,
) -> Figure:
    """Jobs/s from the first publish to the last result and the last usage row in PostgreSQL;
    ``governed``: for a team with limits and a budget (``GOVERNED``); ``extra_env``: more
    variables for the stack's processes."""
    with tempfile.TemporaryDirectory() as directory:
        catalog = None
        if governed:
            catalog = Path(directory) / "catalog.yaml"
            catalog.write_text(GOVERNED_CATALOG)
        async with (
            running_stack(
                workers=workers,
                prefetch=prefetch,
                latency_ms=latency_ms,
                catalog=catalog,
                team=GOVERNED if governed else None,
                extra_env=extra_env,
            ) as stack,
            GatewayClient(stack.settings, team=TEAM) as client,
        ):
            for handle in await publish(client, WARM_UP):
                await handle.result(60)
            await stack.wait_rows(WARM_UP)
            batches = await _usage_batches(stack)
            before, started = cpu_with_producer(stack), time.perf_counter()
            sampled = asyncio.Event()
            held = asyncio.create_task(stack.max_held(sampled))
            handles = await publish(client, jobs)
            published = time.perf_counter() - started
            failed = sum([(await h.result(600)).status != "ok" for h in handles])
            answered = time.perf_counter() - started
            sampled.set()
            max_held = await held
            await stack.wait_rows(jobs + WARM_UP)
            accounted = time.perf_counter() - started
            after = cpu_with_producer(stack)
            messages, events = [
                b - a for a, b in zip(batches, await _usage_batches(stack), strict=True)
            ]
            rss = {
                f"peak_rss_mb {name}": round(peak_rss_mb(process.pid))
                for name, process in stack.processes.items()
                if name.startswith("worker")
            }
            in_flight = await stack.max_concurrent_calls(latency_ms) if latency_ms else None
    cpu = cpu_per_thousand(before, after, jobs)
    name = "latency hiding" if latency_ms else "throughput"
    case = f"{workers} worker{'s' if workers > 1 else ''}"
    if latency_ms:
        case += f", mock {latency_ms:.0f} ms"
    if governed:
        case += ", limits + budget"
    return Figure(
        name,
        case,
        {
            "jobs": jobs,
            "per_s": round(jobs / accounted),
            "publish_per_s": round(jobs / published),
            "answered_s": round(answered, 2),
            "accounted_s": round(accounted, 2),
            "errors": failed,
            "max_held": max_held,
            "usage_events_per_msg": round(events / messages, 1) if messages else 0,
            **({"max_calls_at_mock": in_flight} if in_flight is not None else {}),
            **rss,
            **cpu,
            **cpu_bound(cpu),
        },
    )


async def tracing_cost(*, jobs: int, rounds: int = 2) -> list[Figure]:
    """``throughput`` for one worker with tracing off, on with every job sampled, and on with
    one job in ten sampled, ``rounds`` times in turn; the worker and accounting export over
    OTLP/HTTP to a receiver in this process. Beside each run's jobs/s and CPU, the spans
    received per job: 7 when sampled (the worker's job, queued, admission, provider call,
    result and usage publishes, and accounting's write); those a full export queue drops are
    missing."""
    figures = []
    async with OtlpSink(keep=False) as sink:
        exported = {"OTEL_EXPORTER_OTLP_ENDPOINT": sink.url}
        cases: list[tuple[str, dict[str, str] | None]] = [
            ("off", None),
            ("on, all sampled", {**exported, "OTEL_TRACES_SAMPLER": "always_on"}),
            (
                "on, 10 % sampled",
                {
                    **exported,
                    "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                    "OTEL_TRACES_SAMPLER_ARG": "0.1",
                },
            ),
        ]
        for round_ in range(1, rounds + 1):
            for label, env in cases:
                received = sink.received
                figure = await throughput(jobs=jobs, workers=1, extra_env=env)
                values = figure.values
                if env is not None:
                    values["spans_per_job"] = round(
                        (sink.received - received) / (jobs + WARM_UP), 2
                    )
                figures.append(Figure("tracing", f"tracing {label}, round {round_}", values))
    return figures


async def _usage_batches(stack: Stack) -> tuple[float, float]:
    """Usage messages the workers sent so far, and the events they carried."""
    return (
        await stack.metrics("worker", "queuegate_usage_batch_size_count"),
        await stack.metrics("worker", "queuegate_usage_batch_size_sum"),
    )


async def publish(
    client: GatewayClient,
    jobs: int,
    window: int = 256,
    model: str = "gpt-4o-mini",
    deadline: timedelta | None = None,
) -> list[JobHandle]:
    """Publish with up to ``window`` confirms outstanding, as a pipeline would."""
    gate = asyncio.Semaphore(window)

    async def one() -> JobHandle:
        async with gate:
            job = client.job(model, MESSAGES, max_tokens=16, deadline=deadline)
            return await client.submit(job)

    return list(await asyncio.gather(*(one() for _ in range(jobs))))
