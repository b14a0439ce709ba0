"""The ``queuegate`` command: every role of the gateway, and the tools operators use."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import os
import socket
import sys
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console, RenderableType
from rich.markup import escape
from rich.measure import Measurement

from queuegate.cli_batch import batch_app
from queuegate.dlq_cli import dlq_app
from queuegate.errors import GatewayError, ServiceUnavailable
from queuegate.messages import UnsupportedParams
from queuegate.runtime import configure_logging, run, stop_on_signals, tune_gc
from queuegate.settings import Settings
from queuegate.tables import visible

app = typer.Typer(
    help="queuegate: a queue-based LLM gateway.", no_args_is_help=True, add_completion=False
)
teams_app = typer.Typer(
    help="Register, list, show, configure and disable teams.", no_args_is_help=True
)
app.add_typer(teams_app, name="teams")
audit_app = typer.Typer(help="Captured prompts and responses: retention.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")
app.add_typer(dlq_app, name="dlq")
app.add_typer(batch_app, name="batch")

out = Console(soft_wrap=True)  # lines stay whole (for grep and logs); tables still fit
err = Console(stderr=True, soft_wrap=True)

LogLevel = Annotated[str, typer.Option("--log-level", help="debug, info, warning or error.")]


def main() -> None:
    # One-shot commands say what went wrong in one line of their own; long-running ones
    # (worker, accounting) configure logging again at the level they are given.
    configure_logging("warning", libraries=logging.CRITICAL)
    try:
        app()
    except GatewayError as exc:
        _fail(str(exc))
    except Exception as exc:
        message = _one_line(exc)
        if message is None:
            raise
        _fail(message)


def _fail(message: str) -> None:
    err.print(f"[red]error:[/] {escape(visible(message))}", highlight=False)
    sys.exit(1)


def _one_line(exc: Exception) -> str | None:
    """What an error of a library says, with what to do, or None for a bug (its traceback
    is then the useful output). The messages name no URL: those may carry passwords."""
    import aio_pika.exceptions
    import aiormq.exceptions
    import asyncpg
    import httpx
    import pydantic
    import redis.exceptions

    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, pydantic.ValidationError):
        problem = exc.errors()[0]
        field = ".".join(str(part) for part in problem["loc"]) or "input"
        return f"invalid {field}: {problem['msg']}: correct it and run the command again"
    if isinstance(exc, aiormq.exceptions.AMQPError | aio_pika.exceptions.AMQPException):
        return (
            f"RabbitMQ refused the request ({type(exc).__name__}: {first}): fix what it names "
            "(queuegate status and the management UI show the broker's state)"
        )
    if isinstance(exc, httpx.HTTPError):
        return (
            f"the RabbitMQ management API failed ({type(exc).__name__}: {first}): check that "
            "it answers at QUEUEGATE_MANAGEMENT_URL"
        )
    if isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError):
        return (
            f"PostgreSQL refused the request ({type(exc).__name__}: {first}): run queuegate "
            "migrate if the schema is missing, or check QUEUEGATE_DATABASE_URL"
        )
    if isinstance(exc, redis.exceptions.RedisError):
        return f"Redis failed ({type(exc).__name__}: {first}): check QUEUEGATE_REDIS_URL"
    if isinstance(exc, ConnectionError | TimeoutError | socket.gaierror):
        return f"a service is not reachable ({first}): start it (make services)"
    if isinstance(exc, OSError):
        return f"{first}: check the file or permission it names"
    return None


def _print_table(renderable: RenderableType, *, wide: bool) -> None:
    """Tables fit 80 columns; a --wide one is printed as wide as it needs, so a narrower
    terminal wraps its lines rather than cutting them (and a pipe gets them whole)."""
    if wide:
        needed = Measurement.get(out, out.options.update_width(10_000), renderable).maximum
        # print(width=) never exceeds the console's own width: a console as wide as needed.
        Console(width=max(out.width, needed), soft_wrap=True).print(renderable)
    else:
        out.print(renderable)


def _settings(**overrides: Any) -> Settings:
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def _split(teams: str | None) -> list[str] | None:
    return [t.strip() for t in teams.split(",") if t.strip()] if teams else None


@app.command()
def worker(
    teams: Annotated[
        str | None,
        typer.Option(help="Comma-separated teams to serve (a dedicated pool); all if unset."),
    ] = None,
    concurrency: Annotated[
        int | None,
        typer.Option("--concurrency", "--prefetch", help="Jobs held per team queue, per process."),
    ] = None,
    processes: Annotated[
        int, typer.Option(min=1, help="Worker processes under one supervisor.")
    ] = 1,
    catalog: Annotated[Path | None, typer.Option(help="Model catalog YAML.")] = None,
    log_level: LogLevel = "info",
) -> None:
    """Consume team queues and serve their jobs until SIGTERM or Ctrl-C.

    With --processes N, a supervisor runs N worker processes, restarts one that dies, and
    stops them all gracefully; process i serves metrics on QUEUEGATE_METRICS_PORT + i.
    """
    configure_logging(log_level)
    settings = _settings(prefetch=concurrency, catalog=catalog)
    if processes > 1:
        _supervise(settings, processes, teams, catalog, log_level)
        return

    from queuegate.metrics_server import MetricsServer
    from router import load_catalog, open_router
    from workers import Worker

    cat = load_catalog(settings.catalog, os.environ)
    tune_gc()

    async def serve() -> None:
        stop = stop_on_signals()
        async with open_router(cat, os.environ, settings) as router:
            serving = Worker(settings, router, teams=_split(teams))
            async with MetricsServer(
                settings.metrics_host, settings.metrics_port, serving.is_ready
            ):
                await serving.run(stop)

    run(serve)


def _supervise(
    settings: Settings, processes: int, teams: str | None, catalog: Path | None, log_level: str
) -> None:
    from queuegate.supervisor import Supervisor

    argv = [sys.executable, "-m", "queuegate", "worker", "--log-level", log_level]
    argv += ["--concurrency", str(settings.prefetch)]
    if teams:
        argv += ["--teams", teams]
    if catalog:
        argv += ["--catalog", str(catalog)]

    def command(slot: int) -> tuple[list[str], dict[str, str]]:
        port = settings.metrics_port + slot if settings.metrics_port else 0
        return argv, {**os.environ, "QUEUEGATE_METRICS_PORT": str(port)}

    async def supervise() -> None:
        stop = stop_on_signals()
        await Supervisor(command, processes=processes, grace=settings.shutdown_grace).run(stop)

    run(supervise)


@app.command()
def api(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    processes: Annotated[int, typer.Option(min=1, help="Processes under one supervisor.")] = 1,
    log_level: LogLevel = "info",
) -> None:
    """Serve the HTTP front door (OpenAI's and Anthropic's APIs; docs at /docs) until SIGTERM
    or Ctrl-C."""
    from frontdoor.serve import serve

    configure_logging(log_level)
    serve(_settings(), host=host, port=port, processes=processes, log_level=log_level)


@app.command()
def accounting(log_level: LogLevel = "info") -> None:
    """Write usage events to PostgreSQL in batches until SIGTERM or Ctrl-C."""
    from accounting import Accountant
    from queuegate.metrics_server import MetricsServer

    configure_logging(log_level)
    settings = _settings()
    tune_gc()

    async def serve() -> None:
        stop = stop_on_signals()
        async with (
            Accountant(settings) as accountant,
            MetricsServer(settings.metrics_host, settings.metrics_port, accountant.is_ready),
        ):
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
    rate_limit_burst: Annotated[
        int | None, typer.Option(help="Requests the limit admits at once (default: a minute's).")
    ] = None,
    retry_after: Annotated[
        float | None,
        typer.Option(help="Retry-After of those 429s, s (default: until the limit admits one)."),
    ] = None,
    fail_model: Annotated[
        list[str] | None,
        typer.Option(
            help="An upstream model whose every call fails with --error-status (repeatable), "
            "as the bundled catalog's flaky-gpt expects.",
        ),
    ] = None,
) -> None:
    """Serve the OpenAI and Anthropic wire formats with deterministic replies and faults."""
    from mockprovider import Behavior, MockConfig, serve

    behavior = Behavior(
        latency_ms=latency_ms,
        error_rate=error_rate,
        error_status=error_status,
        timeout_rate=timeout_rate,
        rate_limit_rpm=rate_limit_rpm,
        rate_limit_burst=rate_limit_burst,
        retry_after=retry_after,
    )
    failing = Behavior(error_rate=1.0, error_status=error_status)
    config = MockConfig(default=behavior, models=dict.fromkeys(fail_model or [], failing))
    out.print(f"mock provider on http://{host}:{port} (Ctrl-C stops it)")
    run(lambda: serve(config, host, port))


@app.command()
def submit(
    prompt: Annotated[str, typer.Argument(help="The user message.")],
    team: Annotated[str, typer.Option(help="The team the job is for.")],
    model: Annotated[str, typer.Option(help="A model alias from the catalog.")] = "gpt-4o-mini",
    max_tokens: Annotated[int | None, typer.Option()] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the result.")] = 60.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole result.")] = False,
    user: Annotated[
        str | None,
        typer.Option(help="Broker user to publish as (default: the team's, <namespace>.<team>)."),
    ] = None,
    password_stdin: Annotated[
        bool,
        typer.Option(
            "--password-stdin",
            help="Read that user's password from stdin (or set QUEUEGATE_TEAM_PASSWORD).",
        ),
    ] = False,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="QUEUEGATE_TEAM_API_KEY",
            show_default=False,
            show_envvar=True,
            help="The key of an api_key team (safer in the environment variable).",
        ),
    ] = None,
) -> None:
    """Publish one job and print its reply (a worker must be running).

    A team added with teams add (broker identity) publishes as its own broker user: give its
    password in QUEUEGATE_TEAM_PASSWORD or with --password-stdin. An api_key team passes its
    key. Otherwise the job goes out as the user of QUEUEGATE_AMQP_URL.
    """
    from producer import GatewayClient
    from queuegate.errors import ControlRefused
    from queuegate.teams_admin import with_user
    from queuegate.tenancy import broker_user

    settings = _settings()
    password = _read_password() if password_stdin else os.environ.get("QUEUEGATE_TEAM_PASSWORD")
    if password:
        publisher = user or broker_user(settings.namespace, team)
        settings = settings.model_copy(
            update={"amqp_url": with_user(settings.amqp_url, publisher, password)}
        )
    elif user is not None:
        raise typer.BadParameter("--user needs a password: QUEUEGATE_TEAM_PASSWORD or stdin")

    client = GatewayClient(settings, team=team, api_key=api_key)
    params: dict[str, Any] = {"max_tokens": max_tokens} if max_tokens else {}
    # Built first: a job the gateway would refuse is told before anything connects.
    job = client.job(model, [{"role": "user", "content": prompt}], **params)

    async def go() -> Any:
        async with client:
            return await (await client.submit(job)).result(timeout)

    as_team = (
        ": to publish as the team, set QUEUEGATE_TEAM_PASSWORD (or pipe the password "
        "to --password-stdin), or QUEUEGATE_TEAM_API_KEY for an api_key team"
    )
    try:
        result = run(go)
    except ControlRefused as exc:  # the gateway would not open a reply queue for this user
        hint = "" if password or api_key else as_team
        err.print(f"[red]unauthorized:[/] {escape(visible(str(exc)))}{hint}", highlight=False)
        raise typer.Exit(1) from exc
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
        unauthorized = result.error.code == "unauthorized"
        hint = as_team if unauthorized and not (password or api_key) else ""
        message = escape(visible(result.error.message))
        err.print(f"[red]{result.error.code}:[/] {message}{hint}", highlight=False)
        raise typer.Exit(1)


@app.command()
def usage(
    month: Annotated[str | None, typer.Option(help="YYYY-MM; this month when unset.")] = None,
    by: Annotated[str, typer.Option(help="Group by team, or by team and model.")] = "team",
    daily: Annotated[
        bool, typer.Option("--daily", help="A day-by-day trend instead of the month.")
    ] = False,
    days: Annotated[int, typer.Option(min=1, max=366, help="Days in the --daily trend.")] = 30,
    team: Annotated[str | None, typer.Option(help="Only this team.")] = None,
    top: Annotated[int | None, typer.Option(min=1, help="Only the N most expensive.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of a table.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="CSV instead of a table.")] = False,
    wide: Annotated[
        bool, typer.Option("--wide", help="Every column (errors, tokens in and out, budget).")
    ] = False,
) -> None:
    """Requests, tokens, cost and budget remaining per team and month, from PostgreSQL."""
    from accounting.reports import daily_spend, model_spend, monthly_spend
    from queuegate.db import create_pool
    from queuegate.reporting import records, table, to_csv, to_json

    if as_json and as_csv:
        raise typer.BadParameter("choose one of --json and --csv")
    if by not in ("team", "model"):
        raise typer.BadParameter(f"--by {by!r}: use team or model")
    day = _month(month)
    settings = _settings()

    async def go() -> list[Any]:
        pool = await create_pool(settings)
        try:
            if daily:
                last = datetime.now(UTC).date() if month is None else _month_end(day)
                return await daily_spend(pool, last, days=days, team=team)
            if by == "model":
                return await model_spend(pool, day, top=top, team=team)
            return await monthly_spend(pool, day, top=top, team=team)
        finally:
            await pool.close()

    rows = records(run(go))
    if as_json:
        sys.stdout.write(to_json(rows))
    elif as_csv:
        sys.stdout.write(to_csv(rows))
    elif not rows:
        when = f"{day:%Y-%m}"
        if daily:
            when = f"the {days} days to {'today' if month is None else _month_end(day)}"
        out.print(f"no usage in {when}{f' for team {team}' if team else ''}", highlight=False)
    else:
        what = f"daily usage, {days} days" if daily else f"usage by {by} in {day:%Y-%m}"
        what += f", team {team}" if team else ""
        _print_table(table(rows, title=what, wide=wide), wide=wide)


@app.command()
def status(
    teams: Annotated[
        str | None, typer.Option(help="Comma-separated teams; those live workers serve if unset.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of tables.")] = False,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh in place until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option(min=0.2, help="Seconds between refreshes.")] = 2.0,
    wide: Annotated[
        bool, typer.Option("--wide", help="Also errors per second and the p50 wait.")
    ] = False,
) -> None:
    """Queue depth, in-flight jobs, rates, waits and spend per team; breakers per deployment.

    Reads the broker and Redis only (budgets too when PostgreSQL answers).
    """
    from rich.live import Live

    from queuegate.reporting import status_view, to_json
    from queuegate.status import StatusReader

    settings = _settings()
    wanted = _split(teams)

    async def once() -> Any:
        budgets = await _budgets_if_reachable(settings)
        async with StatusReader(settings) as reader:
            return await reader.read(wanted, budgets)

    async def forever() -> None:
        stop = stop_on_signals()
        budgets = await _budgets_if_reachable(settings)
        async with StatusReader(settings) as reader:
            view = status_view(await reader.read(wanted, budgets), wide=wide)
            with Live(view, console=out) as live:
                while not stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=interval)
                    live.update(status_view(await reader.read(wanted, budgets), wide=wide))

    if watch:
        run(forever)
    elif as_json:
        sys.stdout.write(to_json(dataclasses.asdict(run(once))))
    else:
        _print_table(status_view(run(once), wide=wide), wide=wide)


async def _budgets_if_reachable(settings: Settings) -> dict[str, Decimal]:
    """Budgets from the team registry, or none when PostgreSQL is down: status goes on."""
    import asyncpg

    from accounting.reports import team_budgets
    from queuegate.db import create_pool

    try:
        pool = await create_pool(settings)
    except ServiceUnavailable:
        return {}
    try:
        return await team_budgets(pool)
    except asyncpg.UndefinedTableError:  # not migrated yet: no team has a budget
        return {}
    finally:
        await pool.close()


def _month_end(day: date) -> date:
    from accounting.reports import month_range

    return month_range(day)[1].date() - timedelta(days=1)


@app.command()
def deployments(
    catalog: Annotated[Path | None, typer.Option(help="Model catalog YAML.")] = None,
    wide: Annotated[
        bool, typer.Option("--wide", help="Also each deployment's provider and model.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of a table.")] = False,
) -> None:
    """Circuit breaker and 429 pause of every deployment, as every worker sees them."""
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError

    from queuegate.broker import redact_url
    from queuegate.errors import ServiceUnavailable
    from queuegate.keys import Keys
    from queuegate.reporting import to_json
    from router import load_catalog
    from router.health import Health
    from router.tables import deployments_table

    settings = _settings(catalog=catalog)
    cat = load_catalog(settings.catalog, os.environ)

    async def go() -> Any:
        client = aioredis.from_url(settings.redis_url)
        health = Health(client, Keys(settings.redis_prefix), cat)
        try:
            return [
                (alias, deployment, await health.status(deployment))
                for alias, entry in cat.models.items()
                for deployment in entry.deployments
            ]
        except (RedisError, OSError) as exc:
            raise ServiceUnavailable(
                f"Redis is not reachable at {redact_url(settings.redis_url)}: start it or set "
                "QUEUEGATE_REDIS_URL"
            ) from exc
        finally:
            await client.aclose()

    rows = run(go)
    if as_json:
        sys.stdout.write(
            to_json(
                [
                    {
                        "alias": alias,
                        "deployment": deployment.name,
                        "provider": deployment.provider,
                        "model": deployment.model,
                        **dataclasses.asdict(health),
                    }
                    for alias, deployment, health in rows
                ]
            )
        )
    else:
        _print_table(deployments_table(rows, wide=wide), wide=wide)


def _month(text: str | None) -> date:
    if text is None:
        return datetime.now(UTC).date().replace(day=1)
    try:
        return datetime.strptime(text, "%Y-%m").date()
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a month: use YYYY-MM") from None


@teams_app.command("add")
def teams_add(
    name: str,
    identity: Annotated[
        str | None,
        typer.Option(
            help="How workers know a job is the team's: broker (its own RabbitMQ user, the "
            "default), api_key (a key in a header) or queue (whoever can publish to its queue)."
        ),
    ] = None,
    password_stdin: Annotated[
        bool,
        typer.Option(
            "--password-stdin", help="Give a broker team's user the password read from stdin."
        ),
    ] = False,
) -> None:
    """Register a team, create its queue and its credentials; for a team that exists, enable
    it and repair what is missing, but never change its credentials."""
    from queuegate.teams_admin import register

    password = _read_password() if password_stdin else None
    added = run(
        lambda: register(
            _settings(),
            name,
            identity=_identity(identity) if identity else None,
            password=password,
        )
    )
    if added.created:
        out.print(f"team {name} is registered; workers serve it within seconds")
    else:
        again = " and is enabled again" if added.enabled_again else ""
        if added.credentials.password is not None:
            state = f"its broker user {added.credentials.user} was missing and is made again"
        else:
            state = (
                "its credentials are unchanged "
                f"(new ones: queuegate teams rotate-credentials {name})"
            )
        out.print(f"team {name} exists{again}: {state}", highlight=False)
    if password is None:
        _show_credentials(added.credentials)
    elif added.credentials.password is not None:
        out.print(f"broker user: {added.credentials.user} (the password given)", highlight=False)


def _read_password() -> str:
    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise typer.BadParameter("--password-stdin read an empty password: pipe one in")
    return password


@teams_app.command("list")
def teams_list() -> None:
    """The registered teams."""
    from queuegate.teams_admin import listing

    for team in run(lambda: listing(_settings())):
        out.print(f"{team.name}\t{'enabled' if team.enabled else 'disabled'}")


@teams_app.command("show")
def teams_show(
    name: str,
    as_json: Annotated[bool, typer.Option("--json", help="The config as JSON.")] = False,
) -> None:
    """A team's limits, budget, quota and broker user limits."""
    from queuegate.tables import team_table
    from queuegate.teams_admin import details, user_limits

    settings = _settings()
    team, security = run(lambda: details(settings, name))
    if as_json:
        out.print_json(team.config.model_dump_json())
        return
    broker = None
    if security.broker_user is not None:
        limits = user_limits(settings, team.config)
        broker = (security.broker_user, limits.max_connections, limits.max_channels)
    out.print(team_table(team, broker))


_MODEL_HELP = (
    "Per-model limits, repeatable: ALIAS:rpm=N,tpm=N,burst=N,budget=USD (ALIAS: clears them)."
)


@teams_app.command("set")
def teams_set(
    name: str,
    rpm: Annotated[int | None, typer.Option(help="Requests per minute.")] = None,
    tpm: Annotated[int | None, typer.Option(help="Tokens per minute.")] = None,
    burst: Annotated[
        int | None,
        typer.Option(help="Requests that may start at once (default: 5 s of rpm)."),
    ] = None,
    budget: Annotated[str | None, typer.Option(help="Monthly budget, USD.")] = None,
    alert_threshold: Annotated[
        float | None, typer.Option(help="Budget fraction that alerts, e.g. 0.8.")
    ] = None,
    max_queue: Annotated[int | None, typer.Option(help="Jobs the queue holds at most.")] = None,
    max_connections: Annotated[
        int | None, typer.Option(help="Connections its broker user may hold at once.")
    ] = None,
    max_channels: Annotated[
        int | None, typer.Option(help="Channels its broker user may hold at once.")
    ] = None,
    expected_output: Annotated[
        int | None, typer.Option(help="Output tokens reserved when a job sets no max_tokens.")
    ] = None,
    model: Annotated[list[str] | None, typer.Option(help=_MODEL_HELP)] = None,
    cache: Annotated[
        bool | None,
        typer.Option(
            "--cache/--no-cache",
            help="Use the response cache for jobs that do not say (a job's cache flag wins).",
        ),
    ] = None,
    unsupported_params: Annotated[
        UnsupportedParams | None,
        typer.Option(help="Parameters a provider cannot take: refuse (the default) or drop."),
    ] = None,
    unset: Annotated[
        list[str] | None, typer.Option(help="A field to clear (e.g. rpm, budget_usd).")
    ] = None,
) -> None:
    """Change a team's limits, budget, queue quota, broker user limits, cache default or
    parameter policy; workers apply it within seconds, the broker at once."""
    from queuegate.teams_admin import configure, show

    settings = _settings()
    changes: dict[str, Any] = {
        k: v
        for k, v in {
            "rpm": rpm,
            "tpm": tpm,
            "burst": burst,
            "budget_usd": budget,
            "alert_threshold": alert_threshold,
            "max_queue_length": max_queue,
            "max_connections": max_connections,
            "max_channels": max_channels,
            "expected_output_tokens": expected_output,
            "cache": cache,
            "unsupported_params": unsupported_params,
        }.items()
        if v is not None
    }
    changes |= dict.fromkeys(unset or [])
    if model:
        models = run(lambda: show(settings, name)).config.model_dump()["models"]
        changes["models"] = models | _model_limits(model)
        changes["models"] = {k: v for k, v in changes["models"].items() if v}
    config = run(lambda: configure(settings, name, changes))
    out.print(f"team {name}: {config.model_dump_json(exclude_defaults=True)}", highlight=False)


def _model_limits(specs: list[str]) -> dict[str, dict[str, str]]:
    limits: dict[str, dict[str, str]] = {}
    names = {"rpm": "rpm", "tpm": "tpm", "burst": "burst", "budget": "budget_usd"}
    for spec in specs:
        alias, _, rest = spec.partition(":")
        fields: dict[str, str] = {}
        for pair in filter(None, rest.split(",")):
            key, _, value = pair.partition("=")
            if key not in names or not value:
                raise typer.BadParameter(
                    f"{spec!r}: use ALIAS:rpm=N,tpm=N,burst=N,budget=USD (any of them)"
                )
            fields[names[key]] = value
        limits[alias] = fields
    return limits


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


# --- tenancy and audit (issue 6) ---------------------------------------------------------

_IDENTITIES = ("queue", "broker", "api_key")
_PII = ("off", "warn", "redact", "block")
_CAPTURE = ("none", "redacted", "full")


def _choice(value: str, choices: tuple[str, ...], option: str) -> Any:
    value = value.replace("-", "_")
    if value not in choices:
        raise typer.BadParameter(f"{option} must be one of {', '.join(choices)}")
    return value


def _identity(value: str) -> Any:
    return _choice(value, _IDENTITIES, "--identity")


def _show_credentials(credentials: Any) -> None:
    if credentials is None or (credentials.password or credentials.api_key) is None:
        return
    if credentials.identity == "broker":
        out.print(f"broker user: {credentials.user}", highlight=False, soft_wrap=True)
        out.print(f"password:    {credentials.password}", highlight=False, soft_wrap=True)
        out.print(
            f"for its apps: QUEUEGATE_AMQP_URL={credentials.amqp_url}",
            highlight=False,
            soft_wrap=True,
        )
    else:
        out.print(
            f"API key ({credentials.api_key_id}): {credentials.api_key}",
            highlight=False,
            soft_wrap=True,
        )
        out.print(
            "apps pass it as GatewayClient(..., api_key=...); "
            "queuegate submit reads it from QUEUEGATE_TEAM_API_KEY",
            soft_wrap=True,
        )
    err.print("[yellow]shown once: queuegate keeps no copy; rotate-credentials makes new ones[/]")


@teams_app.command("rotate-credentials")
def teams_rotate(name: str) -> None:
    """New broker password or API key for the team; the old one stops working."""
    from queuegate.teams_admin import rotate

    _show_credentials(run(lambda: rotate(_settings(), name)))


@teams_app.command("security")
def teams_security(
    name: str,
    identity: Annotated[str | None, typer.Option(help="queue, broker or api_key.")] = None,
    pii: Annotated[str | None, typer.Option(help="off, warn, redact or block.")] = None,
    capture: Annotated[
        str | None, typer.Option(help="Content kept in the audit log: none, redacted, full.")
    ] = None,
) -> None:
    """Show or change a team's identity mode, PII policy and content capture."""
    from queuegate.teams_admin import set_security

    security, credentials = run(
        lambda: set_security(
            _settings(),
            name,
            identity=_identity(identity) if identity else None,
            pii=_choice(pii, _PII, "--pii") if pii else None,
            capture=_choice(capture, _CAPTURE, "--capture") if capture else None,
        )
    )
    out.print(
        f"team {name}: identity {security.identity}, pii {security.pii}, "
        f"capture {security.capture}",
        highlight=False,
    )
    _show_credentials(credentials)


@teams_app.command("revoke-key")
def teams_revoke_key(name: str, key_id: str) -> None:
    """Revoke one of the team's API keys; workers refuse it within their cache lifetime."""
    from queuegate.teams_admin import revoke_key

    if not run(lambda: revoke_key(_settings(), name, key_id)):
        err.print(f"team {name} has no live key {key_id}: nothing revoked")
        raise typer.Exit(1)
    out.print(f"key {key_id} of team {name} is revoked")


@audit_app.command("prune")
def audit_prune(
    older_than: Annotated[str, typer.Option(help="Age like 90d, 12h or 30m.")] = "90d",
) -> None:
    """Delete captured prompts and responses older than the given age (usage rows stay)."""
    from accounting.audit import parse_age, prune_content
    from queuegate.db import create_pool

    age = parse_age(older_than)
    settings = _settings()

    async def go() -> int:
        pool = await create_pool(settings)
        try:
            return await prune_content(pool, age)
        finally:
            await pool.close()

    out.print(f"deleted {run(go):,} captured jobs older than {older_than}")


def _paragraphs_on_one_line(commands: typer.Typer) -> None:
    """Help text is wrapped at the source's width, and rich keeps those line breaks when it
    wraps again at the terminal's, cutting sentences into stubs: each paragraph of every
    command's help becomes one line, which rich alone wraps."""
    for command in commands.registered_commands:
        callback = command.callback
        if callback is not None and callback.__doc__:
            paragraphs = inspect.cleandoc(callback.__doc__).split("\n\n")
            callback.__doc__ = "\n\n".join(" ".join(p.split()) for p in paragraphs)
    for group in commands.registered_groups:
        if group.typer_instance is not None:
            _paragraphs_on_one_line(group.typer_instance)


_paragraphs_on_one_line(app)
