"""Goodput under a provider limit: many jobs through one deployment held to the provider's rate.

The mock enforces 3,000 requests a minute the way providers do, over short periods (OpenAI:
60,000 RPM "may be enforced as 1,000 requests per second"): a bucket refilled at 50 calls a
second that holds one second of them, answering 429 past it. The deployment's catalog entry
says ``rpm: 3000`` and nothing more, as an operator would write it, so the workers must pace
the jobs themselves: ideally the last is answered jobs / 50 seconds after the first is
published (40 s for 2,000), with no 429 met and no error returned.
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

from bench.gateway import WARM_UP, cpu_with_producer, publish
from bench.measure import Figure, cpu_per_thousand
from bench.stack import TEAM, running_stack
from mockprovider import Behavior, MockConfig
from producer import GatewayClient

RPM = 3000
PER_SECOND = RPM // 60
UPSTREAM = "gpt-limited"
DEADLINE = timedelta(minutes=5)
"""Each job's own deadline: a caller that waits minutes for a batch, not a day."""

CATALOG = f"""
models:
  limited:                  # the provider account's limit, as its operator would write it
    deployments:
      - {{name: limited-main, provider: openai, model: {UPSTREAM},
         api_base: "${{QUEUEGATE_MOCK_URL}}", api_key_env: QUEUEGATE_MOCK_KEY,
         input_per_mtok: 0.15, output_per_mtok: 0.60, rpm: {RPM}}}
  warm:                     # the same mock, unlimited: warms connections without using the limit
    deployments:
      - {{name: warm-main, provider: openai, model: gpt-4o-mini,
         api_base: "${{QUEUEGATE_MOCK_URL}}", api_key_env: QUEUEGATE_MOCK_KEY,
         input_per_mtok: 0.15, output_per_mtok: 0.60}}
"""
PROVIDER = MockConfig(models={UPSTREAM: Behavior(rate_limit_rpm=RPM, rate_limit_burst=PER_SECOND)})


async def goodput(*, jobs: int, workers: int) -> Figure:
    """Time for ``jobs`` to be answered against the ideal, 429s met, errors returned."""
    with tempfile.TemporaryDirectory() as directory:
        catalog = Path(directory) / "catalog.yaml"
        catalog.write_text(CATALOG)
        async with (
            running_stack(workers=workers, catalog=catalog) as stack,
            GatewayClient(stack.settings, team=TEAM) as client,
        ):
            for handle in await publish(client, WARM_UP, model="warm"):
                await handle.result(60)
            await stack.wait_rows(WARM_UP)
            await stack.configure_mock(PROVIDER)  # counters from zero, the limit's bucket full
            before, started = cpu_with_producer(stack), time.perf_counter()
            handles = await publish(client, jobs, model="limited", deadline=DEADLINE)
            results = [await h.result(DEADLINE.total_seconds() + 60) for h in handles]
            answered = time.perf_counter() - started
            await stack.wait_rows(jobs + WARM_UP)
            after = cpu_with_producer(stack)
            stats = await stack.mock_stats()
    ideal = jobs / PER_SECOND
    errors = Counter(r.error.code for r in results if r.error is not None)
    return Figure(
        "goodput",
        f"{workers} worker{'s' if workers > 1 else ''}, {RPM:,} RPM",
        {
            "jobs": jobs,
            "ideal_s": round(ideal, 2),
            "answered_s": round(answered, 2),
            "vs_ideal_%": round((answered / ideal - 1) * 100, 1),
            "mock_429s": int(stats["by_status"].get("429", 0)),
            "errors": sum(errors.values()),
            "error_codes": ", ".join(f"{code} {n}" for code, n in errors.items()),
            **cpu_per_thousand(before, after, jobs),
        },
    )
