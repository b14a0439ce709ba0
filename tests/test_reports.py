"""Usage reports: their totals equal sums computed directly from the usage rows."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import random
import sys
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg

from accounting.reports import daily_spend, model_spend, monthly_spend
from accounting.store import insert_usage
from queuegate.messages import UsageEvent
from queuegate.registry import add_team
from queuegate.settings import Settings

MONTH = date(2026, 3, 1)
TEAMS = ("alpha", "beta", "gamma")
MODELS = ("gpt-4o-mini", "claude-haiku", "local-llama")


def _events(n: int, seed: int) -> list[UsageEvent]:
    """Usage of three teams and models from mid-February to early April 2026, some failed."""
    rng = random.Random(seed)
    start = datetime(2026, 2, 14, tzinfo=UTC)
    return [
        UsageEvent(
            job_id=f"job-{seed}-{i}",
            team=rng.choice(TEAMS),
            model_requested=rng.choice(MODELS),
            status=rng.choice(["ok", "ok", "ok", "error"]),
            input_tokens=rng.randrange(5_000),
            output_tokens=rng.randrange(1_000),
            cost_usd=Decimal(rng.randrange(10**8)) / 10**10,
            ts=start + timedelta(seconds=rng.randrange(50 * 86_400)),
        )
        for i in range(n)
    ]


async def _rows(pool: asyncpg.Pool) -> list[Any]:
    return list(await pool.fetch("SELECT * FROM usage_log"))


def _sums(rows: list[Any], key: Any) -> dict[Any, tuple[int, int, int, int, Decimal]]:
    totals: dict[Any, list[Any]] = defaultdict(lambda: [0, 0, 0, 0, Decimal(0)])
    for row in rows:
        t = totals[key(row)]
        t[0] += 1
        t[1] += row["status"] == "error"
        t[2] += row["input_tokens"]
        t[3] += row["output_tokens"]
        t[4] += row["cost_usd"]
    return {k: (t[0], t[1], t[2], t[3], t[4]) for k, t in totals.items()}


def _in_month(row: Any) -> bool:
    return bool(date(2026, 3, 1) <= row["ts"].astimezone(UTC).date() < date(2026, 4, 1))


async def test_report_totals_equal_sums_of_the_rows(pool: asyncpg.Pool) -> None:
    # Given usage written in two batches, one of them delivered twice, and a budget for alpha
    await insert_usage(pool, _events(400, seed=1))
    await insert_usage(pool, _events(300, seed=2))
    await insert_usage(pool, _events(300, seed=2))
    await add_team(pool, "alpha")
    await pool.execute(
        "UPDATE teams SET config = '{\"budget_usd\": \"12.5\"}' WHERE name = 'alpha'"
    )
    rows = await _rows(pool)
    assert len(rows) == 700

    # When each report is asked for March 2026
    by_team = await monthly_spend(pool, MONTH)
    by_model = await model_spend(pool, MONTH)
    trend = await daily_spend(pool, date(2026, 3, 31), days=31)
    top = await monthly_spend(pool, MONTH, top=2)

    # Expect every total equal to the sum over the rows of that month
    month_rows = [row for row in rows if _in_month(row)]
    assert {
        s.team: (s.requests, s.errors, s.input_tokens, s.output_tokens, s.cost_usd) for s in by_team
    } == _sums(month_rows, lambda r: r["team"])
    assert {
        (s.team, s.model): (s.requests, s.errors, s.input_tokens, s.output_tokens, s.cost_usd)
        for s in by_model
    } == _sums(month_rows, lambda r: (r["team"], r["model_requested"]))
    assert {
        d.day: (d.requests, d.errors, d.input_tokens, d.output_tokens, d.cost_usd) for d in trend
    } == _sums(month_rows, lambda r: r["ts"].astimezone(UTC).date())
    # ... the budget and what remains of it, and the most expensive teams first
    [alpha] = [s for s in by_team if s.team == "alpha"]
    assert alpha.budget_usd == Decimal("12.5")
    assert alpha.budget_remaining == Decimal("12.5") - alpha.cost_usd
    assert top == sorted(by_team, key=lambda s: s.cost_usd, reverse=True)[:2]


async def test_usage_command_prints_the_same_totals_as_csv_and_json(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    # Given some usage in March 2026
    await insert_usage(pool, _events(200, seed=3))
    expected = _sums([r for r in await _rows(pool) if _in_month(r)], lambda r: r["team"])
    env = {
        **os.environ,
        "QUEUEGATE_NAMESPACE": settings.namespace,
        "QUEUEGATE_DATABASE_SCHEMA": settings.database_schema,
    }

    async def usage(*flags: str) -> str:
        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli", "usage", "--month", "2026-03", *flags,
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        stdout, stderr = await asyncio.wait_for(cli.communicate(), timeout=20)
        assert cli.returncode == 0, stderr.decode()
        return stdout.decode()

    # When an operator exports the month as CSV and as JSON
    as_csv, as_json = await asyncio.gather(usage("--csv"), usage("--json"))

    # Expect both to carry the totals of the rows
    for records in (list(csv.DictReader(io.StringIO(as_csv))), json.loads(as_json)):
        assert {
            r["team"]: (
                int(r["requests"]),
                int(r["errors"]),
                int(r["input_tokens"]),
                int(r["output_tokens"]),
                Decimal(r["cost_usd"]),
            )
            for r in records
        } == expected


async def _usage_cli(settings: Settings, *flags: str) -> str:
    env = {
        **os.environ,
        "QUEUEGATE_NAMESPACE": settings.namespace,
        "QUEUEGATE_DATABASE_SCHEMA": settings.database_schema,
    }
    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", "usage", "--month", "2026-03", *flags,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(cli.communicate(), timeout=20)
    assert cli.returncode == 0, stderr.decode()
    return stdout.decode()


async def test_usage_csv_is_one_team_plain_numbers_and_no_formulas(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    # Given alpha's free job on a model named like a spreadsheet formula, and beta's paid job
    await add_team(pool, "alpha")
    formula = '=HYPERLINK("http://attacker.example","invoice")'
    day = datetime(2026, 3, 5, tzinfo=UTC)
    await insert_usage(
        pool,
        [
            UsageEvent(job_id="a", team="alpha", model_requested=formula, status="ok", ts=day),
            UsageEvent(
                job_id="b",
                team="beta",
                model_requested="m",
                status="ok",
                cost_usd=Decimal(1),
                ts=day,
            ),
        ],
    )

    # When an operator exports alpha's month, by team and by model
    by_team, by_model = await asyncio.gather(
        _usage_cli(settings, "--team", "alpha", "--csv"),
        _usage_cli(settings, "--team", "alpha", "--by", "model", "--csv"),
    )

    # Expect alpha alone, its zero cost written as 0, and the formula neutralised as text
    [team_row] = list(csv.DictReader(io.StringIO(by_team)))
    assert (team_row["team"], team_row["cost_usd"]) == ("alpha", "0")
    [model_row] = list(csv.DictReader(io.StringIO(by_model)))
    assert (model_row["team"], model_row["model"]) == ("alpha", "'" + formula)
    assert model_row["cost_usd"] == "0"


async def test_control_characters_a_team_puts_in_a_model_name_are_written_out(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    # Given alpha's job on a model named with a colour escape and a bell
    day = datetime(2026, 3, 5, tzinfo=UTC)
    evil = "m\x1b[31m\x07"
    await insert_usage(
        pool, [UsageEvent(job_id="a", team="alpha", model_requested=evil, status="ok", ts=day)]
    )

    # When an operator reads usage by model, as an 80-column table and as CSV
    shown, exported = await asyncio.gather(
        _usage_cli(settings, "--by", "model"), _usage_cli(settings, "--by", "model", "--csv")
    )

    # Expect no control character reaching the terminal, and the name shown escaped
    written_out = "m\\x1b[31m\\x07"
    assert "\x1b" not in shown and "\x07" not in shown
    assert written_out in shown
    assert max(len(line) for line in shown.splitlines()) <= 80
    [row] = list(csv.DictReader(io.StringIO(exported)))
    assert row["model"] == written_out
