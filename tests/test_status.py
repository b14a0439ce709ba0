"""``queuegate status``: what a run in progress looks like, from the broker and Redis."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import aio_pika
import pytest
import redis.asyncio as aioredis

from mockprovider import Behavior, MockConfig
from queuegate.db import create_pool
from queuegate.errors import ServiceUnavailable
from queuegate.keys import Keys
from queuegate.metrics import BREAKER_STATE
from queuegate.registry import TeamConfig, disable_team
from queuegate.settings import Settings
from queuegate.spend import NANO, current_month
from queuegate.status import REDIS_WAIT, Status, StatusReader
from queuegate.topology import Topology
from tests.proxy import TcpProxy
from tests.support import PRICED, PRICED_OUTPUT, priced_catalog, running_gateway
from tests.teams import register

JOBS = 8
PREFETCH = 3
# Twelve jobs of $0.013 (tests.support.PRICED) added as floats make 0.15600000000000003, not
# $0.156 (small sums lose the error to the 17 places Redis keeps).
PRICED_JOBS = 12


async def _until(
    reader: StatusReader, ok: Callable[[Status], bool], timeout: float = 10.0
) -> Status:
    """Read the status until ``ok(status)`` holds: live stats arrive every stats_interval."""
    async with asyncio.timeout(timeout):
        while True:
            status = await reader.read(["alpha"])
            if ok(status):
                return status
            await asyncio.sleep(0.05)


async def test_status_json_reports_queue_depth_and_in_flight_of_a_run(settings: Settings) -> None:
    # Given a worker holding 3 jobs of team alpha at a slow provider, and 5 more queued
    # (a grace of 0.2 s at its stop: the jobs it holds are never answered, and the grace of
    # the suite's settings would hold the stop 5 s for them)
    settings = settings.model_copy(
        update={"prefetch": PREFETCH, "stats_interval": 0.1, "shutdown_grace": 0.2}
    )
    await register(settings, "alpha", TeamConfig())  # status names registered teams only
    # Slower than anything the test waits for (a CLI start on a loaded machine included), so
    # the 3 jobs are still in flight when the CLI reads: the worker's grace ends them.
    slow = MockConfig(default=Behavior(latency_ms=120_000))
    async with (
        running_gateway(settings, mock_config=slow) as gw,
        gw.client("alpha") as client,
        StatusReader(settings) as reader,
    ):
        for i in range(JOBS):
            await client.submit(client.job("gpt-4o-mini", [{"role": "user", "content": f"{i}"}]))
        await _until(reader, lambda s: bool(s.teams) and s.teams[0].in_flight == PREFETCH)

        # When an operator asks for the status as JSON
        env = {
            **os.environ,
            "QUEUEGATE_NAMESPACE": settings.namespace,
            "QUEUEGATE_DATABASE_SCHEMA": settings.database_schema,
        }
        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli", "status", "--json", "--teams", "alpha",
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        stdout, stderr = await asyncio.wait_for(cli.communicate(), timeout=20)

    # Expect the queue's depth and consumer, the worker's in-flight jobs and its presence
    assert cli.returncode == 0, stderr.decode()
    status = json.loads(stdout)
    assert status["workers"] == 1
    [alpha] = status["teams"]
    assert alpha["team"] == "alpha"
    assert alpha["queue_depth"] == JOBS - PREFETCH
    assert alpha["consumers"] == 1
    assert alpha["in_flight"] == PREFETCH
    assert alpha["jobs_in_per_s"] > 0


SEEN = ("openai-flaky", "anthropic-main")


async def test_status_reports_breaker_state_and_error_rate_per_deployment(
    settings: Settings,
) -> None:
    # Given a primary deployment answering 500 to everything
    settings = settings.model_copy(update={"stats_interval": 0.1})
    faults = MockConfig(models={"flaky-gpt": Behavior(error_rate=1.0, error_status=500)})
    async with (
        running_gateway(settings, mock_config=faults) as gw,
        gw.client("alpha") as client,
        StatusReader(settings) as reader,
    ):
        try:
            # When jobs for it fall back to claude-haiku, opening its breaker (5 failures)
            for _ in range(3):
                assert (
                    await client.chat("flaky-gpt", [{"role": "user", "content": "x"}])
                ).status == "ok"

            # Expect the failing deployment at 100 % errors and open, the fallback at 0 %
            # (the breaker gauge is the process's: earlier tests' deployments may be listed).
            # The breaker's state is written as it changes and the call counts each
            # stats_interval, so the wait is for both.
            status = await _until(
                reader,
                lambda s: (
                    {
                        d.deployment: (d.breaker, d.error_rate is not None)
                        for d in s.deployments
                        if d.deployment in SEEN
                    }
                    == {"openai-flaky": ("open", True), "anthropic-main": ("closed", True)}
                ),
            )
        finally:
            for deployment in SEEN:
                with contextlib.suppress(KeyError):  # the gauge is the process's: left clean
                    BREAKER_STATE.remove(deployment)
    flaky, haiku = sorted(
        (d for d in status.deployments if d.deployment in SEEN),
        key=lambda d: d.deployment != "openai-flaky",
    )
    assert (flaky.deployment, flaky.breaker, flaky.error_rate) == ("openai-flaky", "open", 1.0)
    assert (haiku.deployment, haiku.breaker, haiku.error_rate) == ("anthropic-main", "closed", 0.0)


async def test_a_watching_reader_sees_the_queue_depth_change(settings: Settings) -> None:
    # Given team alpha's queue holding 2 jobs, and a reader kept open as --watch keeps it
    topology = Topology(settings.namespace)
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection, StatusReader(settings) as reader:
        channel = await connection.channel(publisher_confirms=True)
        await topology.declare_team_queue(channel, "alpha")
        jobs = await channel.get_exchange(topology.jobs_exchange)
        for _ in range(2):
            await jobs.publish(aio_pika.Message(b"{}"), routing_key="alpha")
        [before] = (await reader.read(["alpha"])).teams

        # When 3 more jobs arrive between two refreshes
        for _ in range(3):
            await jobs.publish(aio_pika.Message(b"{}"), routing_key="alpha")
        [after] = (await reader.read(["alpha"])).teams

    # Expect the second refresh to show the new depth, not the first one again
    assert (before.queue_depth, after.queue_depth) == (2, 5)
    assert (before.consumers, after.consumers) == (0, 0)


async def test_a_reader_says_redis_is_unreachable_when_it_hangs(settings: Settings) -> None:
    # Given a reader kept open, reaching Redis through a proxy
    async with TcpProxy(settings.redis_url) as proxy:
        s = settings.model_copy(update={"redis_url": proxy.url})
        async with StatusReader(s) as reader:
            await reader.read(["alpha"])
            # When Redis stops answering, its connections kept open (a stopped process)
            proxy.hold_replies_after(b"EVALSHA")
            # Expect the next read to say so within its bound, not to wait as long as it hangs
            with pytest.raises(ServiceUnavailable, match="Redis is not reachable"):
                async with asyncio.timeout(REDIS_WAIT + 2):
                    await reader.read(["alpha"])
            assert proxy.held.is_set()


async def test_status_with_a_frozen_redis_fails_in_one_line_within_its_bound(
    settings: Settings,
) -> None:
    # Given a Redis that stops answering once connected to (stopped, as by SIGSTOP: the
    # connection stays open, nothing is refused)
    async with TcpProxy(settings.redis_url) as proxy:
        proxy.hold_replies_after(b"ZRANGEBYSCORE")  # status's first read
        env = {
            **os.environ,
            "QUEUEGATE_NAMESPACE": settings.namespace,
            "QUEUEGATE_DATABASE_SCHEMA": settings.database_schema,
            "QUEUEGATE_REDIS_URL": proxy.url,
        }

        # When an operator asks for the status
        started = time.monotonic()
        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli", "status", "--teams", "alpha",
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        stdout, stderr = await asyncio.wait_for(cli.communicate(), timeout=3 * REDIS_WAIT + 25)
        took = time.monotonic() - started

    # Expect a failure in one line naming Redis, once a read's bound passed (a CLI start on
    # a loaded machine takes seconds of its own)
    assert proxy.held.is_set()
    assert cli.returncode != 0
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1, stderr.decode()
    assert "Redis is not reachable" in lines[0]
    assert stdout == b""
    assert took < 3 * REDIS_WAIT + 15  # three reads of Redis


async def test_status_spend_of_a_team_without_a_budget_is_usage_logs_exact_sum(
    settings: Settings, tmp_path: Path
) -> None:
    # Given team alpha, added without a budget (status then shows the spend the workers
    # saw), and ten jobs whose costs do not add up exactly as floats, all written by
    # accounting; one flush of live stats, as the worker stops, adds them all up
    await register(settings, "alpha", TeamConfig())
    settings = settings.model_copy(update={"stats_interval": 3600})
    catalog = priced_catalog(tmp_path)
    async with running_gateway(settings, catalog=catalog) as gw, gw.client("alpha") as client:
        for _ in range(PRICED_JOBS):
            result = await client.chat("priced", PRICED, max_tokens=PRICED_OUTPUT)
            assert result.status == "ok"
        rows = await gw.usage_rows(PRICED_JOBS)
    assert {row["cost_usd"] for row in rows} == {Decimal("0.013")}
    total = sum(row["cost_usd"] for row in rows)

    # When the status is read
    async with StatusReader(settings) as reader:
        [alpha] = (await reader.read(["alpha"])).teams

    # Expect the spend to be usage_log's sum to the last digit, as a Decimal
    assert alpha.budget_usd is None
    assert alpha.spend_usd == total == Decimal("0.156")


async def test_status_spend_leaves_out_a_dead_workers_lapsed_reservation(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given team alpha with a budget, whose ledger holds $0.25 spent and a $1 reservation of
    # a job whose worker died, lapsed a second ago (no job of the team came since to reap it)
    await register(settings, "alpha", TeamConfig(budget_usd=Decimal(10)))
    keys, month = Keys(settings.redis_prefix), current_month()
    seconds, _ = await redis_client.time()
    await redis_client.hset(
        keys.spend("alpha", month),
        mapping={"base": 250_000_000, "open": int(NANO), "j:dead": int(NANO)},
    )
    await redis_client.zadd(keys.spend_expiry("alpha", month), {"dead": seconds * 1000 - 1000})

    # When the status is read (with the budget, as the registry gives it)
    async with StatusReader(settings) as reader:
        [alpha] = (await reader.read(["alpha"], {"alpha": Decimal(10)})).teams

    # Expect the spend as the next reserve sees it: without the lapsed reservation
    assert alpha.spend_usd == Decimal("0.25")


HI = [{"role": "user", "content": "hi"}]


async def test_status_lists_a_disabled_teams_backlog_marked_disabled(settings: Settings) -> None:
    # Given enabled alpha, and disabled beta and gamma, beta's queue holding 2 jobs no worker
    # takes while it is disabled, gamma's none
    for team in ("alpha", "beta", "gamma"):
        await register(settings, team, TeamConfig())
    topology = Topology.of(settings)
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        for team in ("alpha", "beta", "gamma"):
            await topology.declare_team_queue(channel, team)
        jobs = await channel.get_exchange(topology.jobs_exchange)
        for i in range(2):
            job = {"job_id": f"j{i}", "team": "beta", "model": "gpt-4o-mini", "messages": HI}
            await jobs.publish(aio_pika.Message(json.dumps(job).encode()), routing_key="beta")
    pool = await create_pool(settings)
    try:
        for team in ("beta", "gamma"):
            await disable_team(pool, team)
    finally:
        await pool.close()

    # When an operator asks for the status, as JSON and as a table
    said = []
    for shape in (["--json"], []):
        code, stdout, stderr = await _status_cli(settings, *shape)
        assert code == 3, stderr  # (stale: no worker runs)
        said.append(stdout)

    # Expect beta listed, marked disabled, with its 2 jobs; alpha listed as ever; gamma,
    # disabled with nothing waiting, left out
    teams = {t["team"]: t for t in json.loads(said[0])["teams"]}
    assert sorted(teams) == ["alpha", "beta"]
    assert (teams["beta"]["enabled"], teams["beta"]["queue_depth"]) == (False, 2)
    assert (teams["alpha"]["enabled"], teams["alpha"]["queue_depth"]) == (True, 0)
    assert "beta (disabled)" in said[1] and "gamma" not in said[1]


async def test_status_names_the_registry_rows_no_worker_serves(settings: Settings) -> None:
    # Given enabled alpha, and rows written with SQL that no worker serves: delta's rpm not a
    # number, epsilon's config a JSON string
    await register(settings, "alpha", TeamConfig())
    pool = await create_pool(settings)
    try:
        for team, config in (("delta", '{"rpm": "abc"}'), ("epsilon", '"text"')):
            await pool.execute(
                "INSERT INTO teams (name, config) VALUES ($1, $2::text::jsonb)", team, config
            )
    finally:
        await pool.close()
    # When an operator asks for the status, as JSON and as a table
    _, as_json, _ = await _status_cli(settings, "--json")
    _, _, stderr = await _status_cli(settings)
    # Expect both named as not served, what to run said (before: left out without a word)
    status = json.loads(as_json)
    assert status["invalid_teams"] == ["delta", "epsilon"]
    assert [t["team"] for t in status["teams"]] == ["alpha"]
    assert "not served: delta, epsilon: their registry rows are invalid" in stderr
    assert "queuegate teams show NAME" in stderr


async def _status_cli(settings: Settings, *options: str) -> tuple[int | None, str, str]:
    """``queuegate status`` of the test's namespace and schema: exit status, stdout, stderr."""
    env = {
        **os.environ,
        "QUEUEGATE_NAMESPACE": settings.namespace,
        "QUEUEGATE_DATABASE_SCHEMA": settings.database_schema,
        "COLUMNS": "160",
    }
    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", "status", *options,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(cli.communicate(), timeout=20)
    return cli.returncode, stdout.decode(), stderr.decode()
