"""``queuegate demo``: the whole job path once, on the local services, in one process; then
the dashboard, served by the demo's gateway until Ctrl-C (unless ``once``).

It uses a namespace and schema of its own (``<namespace>-demo``, ``<schema>_demo``) and
resets the schema at start, so the usage table shows exactly this run.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

import asyncpg
from rich.console import Console
from rich.table import Table

from queuegate.db import create_pool
from queuegate.errors import GatewayError
from queuegate.messages import ChatResult
from queuegate.namespace import drop_namespace
from queuegate.numbers import usd_places, usd_text
from queuegate.registry import add_team
from queuegate.runtime import stop_on_signals
from queuegate.services import check_services
from queuegate.settings import Settings
from queuegate.tables import spend_table


@dataclass(frozen=True)
class DemoJob:
    team: str
    model: str
    prompt: str


JOBS = (
    DemoJob("research", "gpt-4o-mini", "Summarise why a queue absorbs bursts."),
    DemoJob("research", "claude-haiku", "Name three uses of a dead-letter queue."),
    DemoJob("support", "flaky-gpt", "Draft a reply to a customer asking for a refund."),
    DemoJob("support", "local-llama", "Classify this ticket: my invoice is wrong."),
)
"""OpenAI-, Anthropic- and OpenAI-compatible-shaped deployments; flaky-gpt always fails
in the demo, so its job shows the fallback to claude-haiku."""

ROWS_TIMEOUT = 30.0


async def run_demo(base: Settings, console: Console, *, once: bool = False) -> None:
    from accounting import Accountant, monthly_spend
    from frontdoor.demo import demo_http_call, show_dashboard
    from frontdoor.serve import serving
    from mockprovider import Behavior, MockConfig, MockProvider
    from router import load_catalog, open_router
    from workers import Worker

    settings = base.model_copy(
        update={
            "namespace": f"{base.namespace}-demo",
            "database_schema": f"{base.database_schema}_demo",
        }
    )
    await check_services(settings)
    await drop_namespace(settings, sorted({job.team for job in JOBS}))
    faults = MockConfig(models={"flaky-gpt": Behavior(error_rate=1.0, error_status=503)})
    teams = sorted({job.team for job in JOBS})
    stop = asyncio.Event()
    async with MockProvider(faults) as mock:
        # The mock takes any key; real deployments read theirs from the environment.
        env = {"QUEUEGATE_MOCK_KEY": "demo-key", **os.environ, "QUEUEGATE_MOCK_URL": mock.url}
        console.print(f"mock provider at {mock.url}; serving teams {', '.join(teams)}")
        async with open_router(load_catalog(settings.catalog, env), env, settings) as router:
            worker = Worker(settings, router, teams=teams, name="demo-worker")
            async with Accountant(settings) as accountant:
                tasks = [
                    asyncio.create_task(worker.run(stop)),
                    asyncio.create_task(accountant.run(stop)),
                ]
                pool = await create_pool(settings)
                try:
                    await _unless_failed(worker.ready.wait(), tasks)
                    for team in teams:  # registered: the dashboard has a page for each
                        await add_team(pool, team)
                    results = await _submit_all(settings, console)
                    async with serving(settings, router.catalog) as url:
                        await demo_http_call(pool, url, "research", console)
                        await _unless_failed(_await_rows(pool, len(results) + 1), tasks)
                        rows = await monthly_spend(pool, datetime.now(UTC).date())
                        console.print(spend_table(rows, title="usage this month, from PostgreSQL"))
                        failures = sum(result.status != "ok" for result in results)
                        if failures:
                            raise GatewayError(
                                f"{failures} demo jobs failed; run with --log-level info to see why"
                            )
                        if not once:
                            await show_dashboard(pool, url, console)
                            await _unless_failed(stop_on_signals().wait(), tasks)
                finally:
                    await pool.close()
                    stop.set()
                    await asyncio.gather(*tasks)


async def _submit_all(settings: Settings, console: Console) -> list[ChatResult]:
    from producer import GatewayClient

    table = Table(title="replies, through the queue")
    for column in ("team", "requested", "served by", "fallback", "ms", "USD"):
        table.add_column(
            column, no_wrap=True, justify="right" if column in ("ms", "USD") else "left"
        )
    results: list[ChatResult] = []
    replies: list[str] = []
    rows: list[tuple[str, str, str, str, str, Decimal]] = []
    for team in sorted({job.team for job in JOBS}):
        async with GatewayClient(settings, team=team) as client:
            for job in (j for j in JOBS if j.team == team):
                started = time.perf_counter()
                result = await client.chat(
                    job.model, [{"role": "user", "content": job.prompt}], max_tokens=64, timeout=30
                )
                elapsed_ms = (time.perf_counter() - started) * 1000
                results.append(result)
                g = result.gateway
                rows.append(
                    (
                        team,
                        job.model,
                        g.model_used or "-",
                        "yes" if g.fallback_used else "no",
                        f"{elapsed_ms:.1f}",
                        g.cost_usd,
                    )
                )
                replies.append(
                    f"[bold]{job.model}[/] → {g.model_used} on {g.provider}: {result.content}"
                    if result.status == "ok"
                    else f"[red]{job.model} → {result.error.code if result.error else '?'}:[/] "
                    f"{result.error.message if result.error else ''}"
                )
    places = usd_places(cost for *_, cost in rows)  # one format for the column
    for *cells, cost in rows:
        table.add_row(*cells, usd_text(cost, places))
    console.print(table)
    for line in replies:
        console.print(f"  {line}", highlight=False)
    return results


async def _await_rows(pool: asyncpg.Pool, count: int) -> None:
    """Accounting writes in batches a few ms apart; wait until this run's rows are all in."""
    deadline = time.monotonic() + ROWS_TIMEOUT
    while await pool.fetchval("SELECT count(*) FROM usage_log") < count:
        if time.monotonic() > deadline:
            raise GatewayError("usage rows did not reach PostgreSQL in time: is accounting stuck?")
        await asyncio.sleep(0.05)


async def _unless_failed(awaitable: Awaitable[object], tasks: list[asyncio.Task[None]]) -> None:
    """Await something, but surface at once the error of a component that died meanwhile."""
    waiter = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
    for task in done:
        if task is not waiter:
            waiter.cancel()
            task.result()
            raise GatewayError("a demo component stopped early")
    waiter.result()
