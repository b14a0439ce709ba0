"""Commands that run the gateway's parts: worker, accounting, migrate, the mock provider, and
the demo that runs them all at once."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

from cli.console import out
from cli.options import Host, Joining, LogLevel, Port, bounds, finite, make_settings, split_teams
from queuegate import tracing
from queuegate.errors import ConfigError, StartRefused
from queuegate.runtime import configure_logging, run, stop_on_signals, tune_gc
from queuegate.settings import MAX_PORT, Settings

if TYPE_CHECKING:
    from router import Catalog
    from workers import Worker

log = logging.getLogger(__name__)


def worker(
    teams: Annotated[
        str | None,
        typer.Option(help="Comma-separated teams to serve (a dedicated pool); all if unset."),
    ] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(
            "--concurrency",
            "--prefetch",
            **bounds("prefetch"),
            help="Jobs held per team queue, per process.",
        ),
    ] = None,
    processes: Annotated[
        int, typer.Option(min=1, help="Worker processes under one supervisor.")
    ] = 1,
    catalog: Annotated[Path | None, typer.Option(help="Model catalog YAML.")] = None,
    log_level: LogLevel = "info",
    joining: Joining = False,
) -> None:
    """Consume team queues and serve their jobs until SIGTERM or Ctrl-C.

    With --processes N, a supervisor runs N worker processes, restarts one that dies, and
    stops them all gracefully; process i serves metrics on QUEUEGATE_METRICS_PORT + i (9464 + i
    if unset). One that cannot start as configured at its first start (its metrics port
    taken) stops them all.
    """
    settings = make_settings(prefetch=concurrency, catalog=catalog)
    configure_logging(log_level, form=settings.log_format)
    named = split_teams(teams)
    if not joining:
        # Once, by the process started, not by each its supervisor starts: started again
        # after a team named was deleted, a process would refuse to start, again and again.
        if named is not None:
            run(partial(_registered, settings, named))
        run(partial(_keeps_keys, settings))
    if processes > 1:
        # Once, here, as the teams are: else each process said the same line.
        _catalog(settings)
        # Never returns: the process exits once its processes stopped.
        _supervise(settings, processes, teams, catalog, log_level)
    started: list[Worker] = []
    try:
        _serve(settings, named, started)
    except ConfigError as exc:
        if joining and not any(serving.ready.is_set() for serving in started):
            # Started again it would fail the same way: its supervisor stops them all.
            raise StartRefused(str(exc)) from exc
        raise


def _serve(settings: Settings, named: list[str] | None, started: list[Worker]) -> None:
    """Serve as one worker process until stopped; ``started`` gets its ``Worker`` once made."""
    tracing.start(
        "queuegate-worker",
        content=settings.trace_content,
        heed_callers=settings.trace_heed_callers,
    )

    from queuegate.metrics_server import MetricsServer
    from router import open_router
    from workers import Worker

    cat = _catalog(settings)
    tune_gc()

    async def serve() -> None:
        stop = stop_on_signals()
        async with open_router(cat, os.environ, settings) as router:
            serving = Worker(settings, router, teams=named, registered_only=True)
            started.append(serving)
            async with MetricsServer(
                settings.metrics_host, settings.metrics_port_of("worker"), serving.is_ready
            ):
                await serving.run(stop)

    run(serve)


def _catalog(settings: Settings) -> Catalog:
    """The model catalog of ``settings``, read and checked (ConfigError in one line)."""
    from router import load_catalog

    return load_catalog(settings.catalog, os.environ)


async def _registered(settings: Settings, teams: list[str]) -> None:
    """ConfigError naming those of ``teams`` the registry lacks. Without it a name mistyped
    was served all the same: its queues declared, left behind, and shown by ``status`` as an
    idle team. Refused, not waited for: a pool started before its team is added says so at
    once, and serves it when started again after ``teams add``."""
    from queuegate.db import wait_for_pool
    from queuegate.registry import unregistered

    # Waiting out an outage at start, as the worker does for the same registry.
    pool = await wait_for_pool(settings, max_size=1)
    try:
        missing = await unregistered(pool, teams)
    finally:
        await pool.close()
    if len(missing) == 1:
        [team] = missing
        raise ConfigError(
            f"no team named {team}: add it with queuegate teams add {team}, then start the worker"
        )
    if missing:
        raise ConfigError(
            f"no teams named {', '.join(missing)}: add each with queuegate teams add NAME, then "
            "start the worker"
        )


async def _keeps_keys(settings: Settings) -> None:
    """ConfigError when Redis evicts keys once full (``eviction_policy``): jobs would be
    called and answered twice; or when it refuses the worker's credentials. Waited for while
    it does not answer, as PostgreSQL is at start: a worker started before its Redis
    (compose, a pod) would otherwise serve on one that evicts, unseen. Not waited for with
    ``QUEUEGATE_REDIS_OUTAGE=fail_open``, which serves through an outage; not asked of a Redis
    that refuses INFO (a managed one may)."""
    from redis.exceptions import AuthenticationError, NoPermissionError, RedisError

    from queuegate.redis_client import evicting, eviction_policy, redis_for, redis_place
    from queuegate.start_wait import StartWait

    place = redis_place(settings)
    waiting = StartWait(log, "Redis")
    client = redis_for(settings, connect_timeout=5)
    try:
        while True:
            try:
                async with asyncio.timeout(5):
                    policy = await eviction_policy(client)
                break
            except AuthenticationError as exc:
                raise ConfigError(
                    f"{place} refused the worker's credentials ({exc}): set the "
                    "password (and user) it expects in QUEUEGATE_REDIS_URL, "
                    "redis://USER:PASSWORD@HOST"
                ) from None
            except NoPermissionError:
                return
            except (RedisError, OSError, TimeoutError) as exc:
                if settings.redis_outage == "fail_open":
                    return
                await waiting.failed(f"{place} does not answer ({type(exc).__name__})")
    finally:
        await client.aclose()
    if policy is not None:
        raise ConfigError(f"{evicting(place, policy)}, then start the worker")
    waiting.answered()


def _supervise(
    settings: Settings, processes: int, teams: str | None, catalog: Path | None, log_level: str
) -> NoReturn:
    from queuegate.supervisor import supervise

    first = settings.metrics_port_of("worker")
    if first + processes - 1 > MAX_PORT:
        # Each process serves the next port: past the last, one would fail its start.
        raise ConfigError(
            f"{processes} worker processes serve metrics on ports {first} to "
            f"{first + processes - 1}, past {MAX_PORT}: set QUEUEGATE_METRICS_PORT to at most "
            f"{MAX_PORT - processes + 1} (or 0 for any free ones)"
        )
    argv = [sys.executable, "-m", "cli", "worker", "--log-level", log_level, "--joining"]
    argv += ["--concurrency", str(settings.prefetch)]
    if teams:
        argv += ["--teams", teams]
    if catalog:
        argv += ["--catalog", str(catalog)]

    def command(slot: int) -> tuple[list[str], dict[str, str]]:
        port = first + slot if first else 0
        return argv, {**os.environ, "QUEUEGATE_METRICS_PORT": str(port)}

    supervise(command, processes=processes, grace=settings.shutdown_grace)


def api(
    host: Host = "127.0.0.1",
    port: Port = 8080,
    processes: Annotated[int, typer.Option(min=1, help="Processes under one supervisor.")] = 1,
    log_level: LogLevel = "info",
    joining: Joining = False,
) -> None:
    """Serve the HTTP front door (OpenAI's and Anthropic's APIs; docs at /docs) until SIGTERM
    or Ctrl-C."""
    from frontdoor.serve import serve

    settings = make_settings()
    configure_logging(log_level, form=settings.log_format)
    serve(
        settings,
        host=host,
        port=port,
        processes=processes,
        log_level=log_level,
        joining=joining,
    )


def accounting(log_level: LogLevel = "info") -> None:
    """Write usage events to PostgreSQL in batches until SIGTERM or Ctrl-C; metrics on
    QUEUEGATE_METRICS_PORT (9463 if unset: a worker's is 9464)."""
    from accounting import Accountant
    from queuegate.metrics_server import MetricsServer

    settings = make_settings()
    configure_logging(log_level, form=settings.log_format)
    tracing.start("queuegate-accounting", heed_callers=settings.trace_heed_callers)
    tune_gc()

    async def serve() -> None:
        stop = stop_on_signals()
        async with (
            Accountant(settings) as accountant,
            MetricsServer(
                settings.metrics_host, settings.metrics_port_of("accounting"), accountant.is_ready
            ),
        ):
            await accountant.run(stop)

    run(serve)


def migrate() -> None:
    """Apply the database migrations that are not applied yet."""
    from accounting import migrate as apply_migrations
    from queuegate.db import create_pool

    settings = make_settings()

    async def go() -> list[str]:
        pool = await create_pool(settings)
        try:
            return await apply_migrations(pool, settings.database_schema)
        finally:
            await pool.close()

    applied = run(go)
    out.print(f"applied {', '.join(applied)}" if applied else "schema is up to date")


def mock_provider(
    host: Host = "127.0.0.1",
    port: Port = 8089,
    latency_ms: Annotated[
        float, typer.Option(min=0, callback=finite, help="Added to every call.")
    ] = 0.0,
    error_rate: Annotated[
        float, typer.Option(min=0, max=1, callback=finite, help="Fraction of calls that fail.")
    ] = 0.0,
    error_status: Annotated[int, typer.Option(help="HTTP status of injected failures.")] = 500,
    timeout_rate: Annotated[
        float, typer.Option(min=0, max=1, callback=finite, help="Fraction of calls that hang.")
    ] = 0.0,
    rate_limit_rpm: Annotated[
        int | None, typer.Option(help="Requests/min before answering 429.")
    ] = None,
    rate_limit_burst: Annotated[
        int | None, typer.Option(help="Requests the limit admits at once (default: a minute's).")
    ] = None,
    retry_after: Annotated[
        float | None,
        typer.Option(
            min=0,
            callback=finite,
            help="Retry-After of those 429s, s (default: until the limit admits one).",
        ),
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


def demo(
    once: Annotated[
        bool, typer.Option("--once", help="Exit after the usage table; serve no dashboard.")
    ] = False,
    log_level: LogLevel = "warning",
) -> None:
    """Run the whole path once: mock provider, worker, accounting, two teams, usage table;
    then serve the dashboard (its address and a key that signs in printed) until Ctrl-C."""
    from cli.demo import run_demo

    configure_logging(log_level)
    settings = make_settings()
    run(partial(_keeps_keys, settings))  # its worker's, as any worker's
    run(lambda: run_demo(settings, out.console, once=once))
