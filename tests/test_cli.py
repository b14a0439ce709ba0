"""The ``queuegate`` command as an operator uses it, against the real services."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

from typer.testing import CliRunner

from queuegate.cli import app
from queuegate.settings import Settings
from tests.support import running_gateway

runner = CliRunner()


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    return {
        "QUEUEGATE_NAMESPACE": settings.namespace,
        "QUEUEGATE_DATABASE_SCHEMA": settings.database_schema,
        **extra,
    }


def test_migrate_applies_once_then_reports_up_to_date(settings: Settings) -> None:
    first = runner.invoke(app, ["migrate"], env=_env(settings))
    again = runner.invoke(app, ["migrate"], env=_env(settings))

    assert first.exit_code == 0 and "applied 0001" in first.output
    assert again.exit_code == 0 and "up to date" in again.output


def test_teams_are_added_listed_and_disabled(settings: Settings) -> None:
    env = _env(settings)
    assert runner.invoke(app, ["teams", "add", "alpha"], env=env).exit_code == 0
    assert runner.invoke(app, ["teams", "add", "beta"], env=env).exit_code == 0
    assert runner.invoke(app, ["teams", "disable", "beta"], env=env).exit_code == 0

    listing = runner.invoke(app, ["teams", "list"], env=env)
    assert listing.output.split() == ["alpha", "enabled", "beta", "disabled"]
    missing = runner.invoke(app, ["teams", "disable", "gamma"], env=env)
    assert missing.exit_code == 1 and "no team named gamma" in missing.output


async def test_submit_prints_the_reply_and_usage_reports_it(settings: Settings) -> None:
    # Given a running gateway
    async with running_gateway(settings) as gw:
        env = _env(settings, QUEUEGATE_MOCK_KEY="k")
        # When an operator submits one job from the command line
        submitted = await asyncio.to_thread(
            runner.invoke, app, ["submit", "--team", "alpha", "Hello CLI"], env=env
        )
        # Expect the reply printed, and the job in this month's usage
        assert submitted.exit_code == 0, submitted.output
        assert "mock reply to: Hello CLI" in submitted.output
        await gw.usage_rows(1)
        report = await asyncio.to_thread(runner.invoke, app, ["usage", "--json"], env=env)
        [row] = json.loads(report.stdout)
        assert row["team"] == "alpha" and row["requests"] == 1 and row["errors"] == 0


def test_an_unreachable_broker_is_one_line_that_says_what_to_do(settings: Settings) -> None:
    env = {**os.environ, **_env(settings), "QUEUEGATE_AMQP_URL": "amqp://guest:secret@127.0.0.1:1/"}
    done = subprocess.run(
        [sys.executable, "-m", "queuegate", "submit", "--team", "alpha", "hi"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "RabbitMQ is not reachable at amqp://guest:***@127.0.0.1:1/" in lines[0]
    assert "secret" not in done.stderr
