"""Usage reports of the admin layer: filters by model and status, a team's month with its
budget and trend, and the rollup rebuilt by status when a schema is upgraded."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import sys
from collections.abc import Sequence
from datetime import UTC, date
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from accounting import migrate
from accounting.migrate import available_migrations
from accounting.store import insert_usage
from admin.usage import UsageFilter, team_month, usage_rows
from queuegate.db import create_pool
from queuegate.errors import ConfigError
from queuegate.messages import JobStatus
from queuegate.registry import TeamConfig, add_team, set_team_config
from queuegate.settings import Settings
from tests.test_reports import MONTH, _events, _in_month, _rows, _sums


def _team_sums(spend: Sequence[Any]) -> dict[Any, tuple[int, int, int, int, Decimal]]:
    return {
        s.team: (s.requests, s.errors, s.input_tokens, s.output_tokens, s.cost_usd) for s in spend
    }


@pytest.mark.parametrize("status", ["ok", "error"])
async def test_usage_of_one_status_and_model_equals_the_sums_of_those_rows(
    pool: asyncpg.Pool, status: JobStatus
) -> None:
    # Given usage of three teams and models in and around March 2026, some of it failed
    await insert_usage(pool, _events(500, seed=7))
    rows = [r for r in await _rows(pool) if _in_month(r)]

    # When usage per team is asked for one status, then for one model and status
    by_status = await usage_rows(pool, "team", month=MONTH, where=UsageFilter(status=status))
    only = UsageFilter(model="claude-haiku", status=status)
    by_model = await usage_rows(pool, "team", month=MONTH, where=only)

    # Expect each to count exactly those rows: their tokens and cost, not the others'
    assert _team_sums(by_status) == _sums(
        [r for r in rows if r["status"] == status], lambda r: r["team"]
    )
    assert _team_sums(by_model) == _sums(
        [r for r in rows if r["status"] == status and r["model_requested"] == "claude-haiku"],
        lambda r: r["team"],
    )


async def test_team_month_holds_totals_budget_models_and_trend(pool: asyncpg.Pool) -> None:
    # Given usage, and alpha with a budget of 50 USD
    await insert_usage(pool, _events(600, seed=11))
    await add_team(pool, "alpha")
    await set_team_config(pool, "alpha", TeamConfig(budget_usd=Decimal(50)))
    rows = [r for r in await _rows(pool) if _in_month(r) and r["team"] == "alpha"]
    spent = sum((r["cost_usd"] for r in rows), Decimal(0))

    # When alpha's March is asked for, whole and for failed jobs only
    whole = await team_month(pool, "alpha", date(2026, 3, 17), today=date(2026, 6, 1))
    failed = await team_month(
        pool, "alpha", date(2026, 3, 17), today=date(2026, 6, 1), status="error"
    )

    # Expect the month's totals, per model and per day equal to the rows'
    assert whole.month == MONTH
    assert (whole.requests, whole.errors, whole.cost_usd) == (
        len(rows),
        sum(r["status"] == "error" for r in rows),
        spent,
    )
    assert {m.model: m.cost_usd for m in whole.by_model} == {
        model: sums[4] for model, sums in _sums(rows, lambda r: r["model_requested"]).items()
    }
    # ... the trend: the 30 days to March 31, idle days absent
    assert {d.day: d.requests for d in whole.daily} == {
        day: sums[0]
        for day, sums in _sums(rows, lambda r: r["ts"].astimezone(UTC).date()).items()
        if day >= date(2026, 3, 2)
    }
    # ... and the budget less all of the month's spend, whatever the filter keeps
    assert whole.budget_usd == Decimal(50) and whole.budget_remaining == Decimal(50) - spent
    assert failed.requests == failed.errors == whole.errors
    assert failed.budget_remaining == whole.budget_remaining


async def test_the_usage_command_filtered_leaves_the_budget_of_the_whole_month(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    # Given alpha's March, with a budget of 50 USD
    await insert_usage(pool, _events(300, seed=19))
    await add_team(pool, "alpha")
    await set_team_config(pool, "alpha", TeamConfig(budget_usd=Decimal(50)))
    rows = [r for r in await _rows(pool) if _in_month(r) and r["team"] == "alpha"]
    spent = sum((r["cost_usd"] for r in rows), Decimal(0))
    env = {
        **os.environ,
        "QUEUEGATE_NAMESPACE": settings.namespace,
        "QUEUEGATE_DATABASE_SCHEMA": settings.database_schema,
    }

    # When an operator asks for its failed jobs
    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", "usage", "--month", "2026-03", "--team", "alpha",
        "--status", "error", "--json",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(cli.communicate(), timeout=20)

    # Expect their cost alone, but the budget left of all of the month's spend, as the admin
    # API says it (before: the budget less the failed jobs' cost)
    assert cli.returncode == 0, stderr.decode()
    [row] = json.loads(stdout)
    failed = sum((r["cost_usd"] for r in rows if r["status"] == "error"), Decimal(0))
    assert Decimal(row["cost_usd"]) == failed < spent
    assert Decimal(row["budget_remaining"]) == Decimal(50) - spent
    assert "month_cost_usd" not in row


async def test_team_month_of_an_unknown_team_is_refused(pool: asyncpg.Pool) -> None:
    with pytest.raises(ConfigError, match="no team named nobody"):
        await team_month(pool, "nobody", MONTH, today=MONTH)


async def test_upgrade_rebuilds_the_rollup_by_status(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a schema migrated to before the rollup kept statuses apart, with usage in it
    # (and with the trace and claim columns, which today's insert_usage writes)
    written = {"0012", "0014", "0015"}
    before = [m for m in available_migrations() if m.version < "0008" or m.version in written]
    # (the package's own ``migrate`` function hides the module of the same name)
    module = importlib.import_module("accounting.migrate")
    monkeypatch.setattr(module, "available_migrations", lambda: before)
    async with await create_pool(settings) as pool:
        await migrate(pool, settings.database_schema)
        await insert_usage(pool, _events(300, seed=5))
        monkeypatch.undo()

        # When it is migrated to this version
        applied = await migrate(pool, settings.database_schema)
        failed = await usage_rows(pool, "team", month=MONTH, where=UsageFilter(status="error"))
        rows = [r for r in await _rows(pool) if _in_month(r)]

    # Expect the failed jobs' usage read from the rebuilt rollup, as the rows say
    assert "0008" in applied
    assert _team_sums(failed) == _sums(
        [r for r in rows if r["status"] == "error"], lambda r: r["team"]
    )


async def test_usage_command_filters_by_model_and_status(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    # Given usage in March 2026
    await insert_usage(pool, _events(200, seed=13))
    rows = [r for r in await _rows(pool) if _in_month(r)]
    env = {
        **os.environ,
        "QUEUEGATE_NAMESPACE": settings.namespace,
        "QUEUEGATE_DATABASE_SCHEMA": settings.database_schema,
    }

    # When an operator asks for one model's failed jobs as JSON
    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", "usage", "--month", "2026-03", "--model", "local-llama",
        "--status", "error", "--json",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(cli.communicate(), timeout=20)

    # Expect their totals alone
    assert cli.returncode == 0, stderr.decode()
    kept = [r for r in rows if r["model_requested"] == "local-llama" and r["status"] == "error"]
    assert {r["team"]: Decimal(r["cost_usd"]) for r in json.loads(stdout)} == {
        team: sums[4] for team, sums in _sums(kept, lambda r: r["team"]).items()
    }


@pytest.mark.parametrize(
    "flags",
    [[], ["--json"], ["--csv"], ["--daily"], ["--by", "model"], ["--model", "local-llama"]],
)
async def test_usage_command_of_an_unknown_team_is_an_error_naming_it(
    settings: Settings, pool: asyncpg.Pool, flags: list[str]
) -> None:
    # Given usage of other teams in March 2026
    await insert_usage(pool, _events(50, seed=17))
    env = {
        **os.environ,
        "QUEUEGATE_NAMESPACE": settings.namespace,
        "QUEUEGATE_DATABASE_SCHEMA": settings.database_schema,
    }

    # When an operator asks for a team that is not registered, in any form of the report
    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", "usage", "--month", "2026-03", "--team", "nosuch", *flags,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(cli.communicate(), timeout=20)

    # Expect one line naming the team, as the audit log says it, and no empty report
    assert cli.returncode == 1 and stdout == b""
    assert stderr.decode().splitlines() == [
        "error: no team named nosuch: list them with queuegate teams list"
    ]
