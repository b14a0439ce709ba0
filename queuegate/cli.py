"""The ``queuegate`` command: every role of the gateway, and the tools operators use."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from queuegate.cli_batch import batch_app
from queuegate.errors import GatewayError
from queuegate.runtime import configure_logging, run, stop_on_signals
from queuegate.settings import Settings

app = typer.Typer(
    help="queuegate: a queue-based LLM gateway.", no_args_is_help=True, add_completion=False
)
teams_app = typer.Typer(help="Register, list and disable teams.", no_args_is_help=True)
app.add_typer(teams_app, name="teams")
app.add_typer(batch_app, name="batch")

out = Console()
err = Console(stderr=True)

LogLevel = Annotated[str, typer.Option("--log-level", help="debug, info, warning or error.")]


def main() -> None:
    try:
        app()
    except GatewayError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False)
        sys.exit(1)


def _settings(**overrides: Any) -> Settings:
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def _split(teams: str | None) -> list[str] | None:
    return [t.strip() for t in teams.split(",") if t.strip()] if teams else None


@app.command()
def worker(
    teams: Annotated[
        str | None, typer.Option(help="Comma-separated teams to serve; all registered if unset.")
    ] = None,
    prefetch: Annotated[int | None, typer.Option(help="Jobs held per team queue.")] = None,
    catalog: Annotated[Path | None, typer.Option(help="Model catalog YAML.")] = None,
    log_level: LogLevel = "info",
) -> None:
    """Consume team queues and serve their jobs until SIGTERM or Ctrl-C."""
    from router import Router, load_catalog
    from workers import Worker

    configure_logging(log_level)
    settings = _settings(prefetch=prefetch, catalog=catalog)
    cat = load_catalog(settings.catalog, os.environ)

    async def serve() -> None:
        stop = stop_on_signals()
        async with Router(cat, os.environ) as router:
            await Worker(settings, router, teams=_split(teams)).run(stop)

    run(serve)


@app.command()
def accounting(log_level: LogLevel = "info") -> None:
    """Write usage events to PostgreSQL in batches until SIGTERM or Ctrl-C."""
    from accounting import Accountant

    configure_logging(log_level)
    settings = _settings()

    async def serve() -> None:
        stop = stop_on_signals()
        async with Accountant(settings) as accountant:
            await accountant.run(stop)

    run(serve)


@app.command()
def migrate() -> None:
    """Apply the database migrations that are not applied yet."""
    from accounting import migrate as apply_migrations
    from queuegate.db import create_pool

    settings = _settings()

    async def go() -> list[str]:
        pool = await create_pool(settings)
        try:
            return await apply_migrations(pool, settings.database_schema)
        finally:
            await pool.close()

    applied = run(go)
    out.print(f"applied {', '.join(applied)}" if applied else "schema is up to date")


@app.command("mock-provider")
def mock_provider(
    host: str = "127.0.0.1",
    port: int = 8089,
    latency_ms: Annotated[float, typer.Option(help="Added to every call.")] = 0.0,
    error_rate: Annotated[float, typer.Option(help="Fraction of calls that fail.")] = 0.0,
    error_status: Annotated[int, typer.Option(help="HTTP status of injected failures.")] = 500,
    timeout_rate: Annotated[float, typer.Option(help="Fraction of calls that hang.")] = 0.0,
    rate_limit_rpm: Annotated[
        int | None, typer.Option(help="Requests/min before answering 429.")
    ] = None,
    retry_after: Annotated[float, typer.Option(help="Retry-After of those 429s, s.")] = 1.0,
) -> None:
    """Serve the OpenAI and Anthropic wire formats with deterministic replies and faults."""
    from mockprovider import Behavior, MockConfig, serve

    behavior = Behavior(
        latency_ms=latency_ms,
        error_rate=error_rate,
        error_status=error_status,
        timeout_rate=timeout_rate,
        rate_limit_rpm=rate_limit_rpm,
        retry_after=retry_after,
    )
    out.print(f"mock provider on http://{host}:{port} (Ctrl-C stops it)")
    run(lambda: serve(MockConfig(default=behavior), host, port))


@app.command()
def submit(
    prompt: Annotated[str, typer.Argument(help="The user message.")],
    team: Annotated[str, typer.Option(help="The team the job is for.")],
    model: Annotated[str, typer.Option(help="A model alias from the catalog.")] = "gpt-4o-mini",
    max_tokens: Annotated[int | None, typer.Option()] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the result.")] = 60.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole result.")] = False,
) -> None:
    """Publish one job and print its reply (a worker must be running)."""
    from producer import GatewayClient

    settings = _settings()

    async def go() -> Any:
        async with GatewayClient(settings, team=team) as client:
            params = {"max_tokens": max_tokens} if max_tokens else {}
            return await client.chat(
                model, [{"role": "user", "content": prompt}], timeout=timeout, **params
            )

    result = run(go)
    if as_json:
        out.print_json(result.model_dump_json())
    elif result.status == "ok":
        out.print(result.content or "", highlight=False)
        g = result.gateway
        err.print(
            f"[dim]{g.model_used} via {g.provider}/{g.deployment}"
            f"{' (fallback)' if g.fallback_used else ''}, {g.latency_ms:.0f} ms, "
            f"${g.cost_usd:.6f}[/]"
        )
    else:
        assert result.error is not None
        err.print(f"[red]{result.error.code}:[/] {result.error.message}", highlight=False)
        raise typer.Exit(1)


@app.command()
def usage(
    month: Annotated[str | None, typer.Option(help="YYYY-MM; this month when unset.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of a table.")] = False,
) -> None:
    """Spend per team for a month, from PostgreSQL."""
    from accounting import monthly_spend
    from queuegate.db import create_pool
    from queuegate.tables import spend_table

    day = _month(month)
    settings = _settings()

    async def go() -> Any:
        pool = await create_pool(settings)
        try:
            return await monthly_spend(pool, day)
        finally:
            await pool.close()

    rows = run(go)
    if as_json:
        sys.stdout.write(json.dumps([dataclasses.asdict(row) for row in rows], default=str) + "\n")
    else:
        out.print(spend_table(rows, title=f"spend in {day:%Y-%m}"))


def _month(text: str | None) -> date:
    if text is None:
        return datetime.now(UTC).date().replace(day=1)
    try:
        return datetime.strptime(text, "%Y-%m").date()
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a month: use YYYY-MM") from None


@teams_app.command("add")
def teams_add(name: str) -> None:
    """Register a team (or enable it again) and create its queue."""
    from queuegate.teams_admin import add

    run(lambda: add(_settings(), name))
    out.print(f"team {name} is registered; workers serve it within seconds")


@teams_app.command("list")
def teams_list() -> None:
    """The registered teams."""
    from queuegate.teams_admin import listing

    for team in run(lambda: listing(_settings())):
        out.print(f"{team.name}\t{'enabled' if team.enabled else 'disabled'}")


@teams_app.command("disable")
def teams_disable(name: str) -> None:
    """Stop serving a team; its queued jobs stay in its queue."""
    from queuegate.teams_admin import disable

    if not run(lambda: disable(_settings(), name)):
        err.print(f"no team named {name}: list them with queuegate teams list")
        raise typer.Exit(1)
    out.print(f"team {name} is disabled")


@app.command()
def demo(log_level: LogLevel = "warning") -> None:
    """Run the whole path once: mock provider, worker, accounting, two teams, usage table."""
    from queuegate.demo import run_demo

    configure_logging(log_level)
    run(lambda: run_demo(_settings(), out))
