"""The operators' tables at 80 columns (a terminal's default, and what a pipe gets)."""

from __future__ import annotations

import asyncio
import io
import os
import sys
from datetime import UTC, datetime
from decimal import Decimal

from rich.console import Console, RenderableType

from accounting.reports import ModelSpend, TeamSpend
from admin.teams import add
from queuegate.deployment_health import DeploymentHealth
from queuegate.reporting import records, status_view, table
from queuegate.settings import Settings
from queuegate.status import DeploymentStatus, Status, TeamStatus
from router.catalog import Deployment
from router.tables import deployments_table


def _render(renderable: RenderableType) -> list[str]:
    console = Console(width=80, file=io.StringIO(), color_system=None)
    console.print(renderable)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    lines: list[str] = text.splitlines()
    assert lines and max(len(line) for line in lines) <= 80, text
    assert "…" not in text, text
    return lines


def _whole(lines: list[str], *values: str) -> None:
    """Each value appears uncut on one line."""
    for value in values:
        assert any(value in line for line in lines), (value, "\n".join(lines))


def test_status_fits_80_columns_with_every_number_whole() -> None:
    # Given a busy team with large numbers and a long name, and a deployment half open
    team = TeamStatus(
        team="research-and-development",
        queue_depth=123_456,
        consumers=12,
        in_flight=1_024,
        jobs_in_per_s=123.4,
        jobs_out_per_s=120.1,
        errors_per_s=3.2,
        wait_p50_ms=1_234.0,
        wait_p99_ms=98_765.0,
        bucket_fill=0.42,
        spend_usd=Decimal("1234.567891"),
        budget_usd=Decimal("50000"),
    )
    deployment = DeploymentStatus("openai-main-east-us-2", "half_open", 123.4, 0.0081, 1_234, 12.5)
    status = Status(datetime(2026, 3, 1, 12, tzinfo=UTC), 3, [team], [deployment])

    # When it is rendered at 80 columns
    lines = _render(status_view(status))

    # Expect every header and number whole
    _whole(lines, "queued", "cons.", "in fl.", "out/s", "p99 wait", "bucket", "spend", "budget")
    _whole(lines, "123,456", "1,024", "120.1", "98.8 s", "42%", "$1,234.567891", "$50,000")
    _whole(lines, "openai-main-east-us-2", "half_open", "0.8%", "1,234", "12.5 s")


def test_usage_reports_fit_80_columns_with_every_number_whole() -> None:
    # Given a month of a big team, with a budget, and its most used model
    spend = TeamSpend(
        "research", 1_234_567, 12_345, 123_456_789, 12_345_678, Decimal("12345.678901")
    )
    spend = TeamSpend(**{**spend.__dict__, "budget_usd": Decimal(50_000)})
    model = ModelSpend(
        "research", "claude-3-5-sonnet-latest", 1_234_567, 12_345, 1, 2, Decimal("0.0081")
    )

    # When both reports are rendered at 80 columns
    by_team = _render(table(records([spend]), title="usage by team"))
    by_model = _render(table(records([model]), title="usage by model"))

    # Expect the numbers whole, tokens in and out summed, and the model alias not cut
    _whole(by_team, "requests", "tokens", "cost (USD)", "budget left")
    _whole(by_team, "1,234,567", "12,345", "135,802,467", "12,345.678901", "37,654.321099")
    _whole(by_model, "claude-3-5-sonnet-latest", "0.008100", "3")


def test_deployments_fit_80_columns() -> None:
    deployment = Deployment.model_validate(
        {
            "name": "anthropic-main-europe-west-4",
            "provider": "anthropic",
            "model": "claude-3-5-haiku-latest",
            "api_base": "http://127.0.0.1:1",
            "api_key_env": "K",
            "input_per_mtok": 0.8,
            "output_per_mtok": 4,
        }
    )
    rows = [("claude-haiku-fallback", deployment, DeploymentHealth("open", 12.3, 4.5))]
    lines = _render(deployments_table(rows))
    _whole(lines, "claude-haiku-fallback", "anthropic-main-europe-west-4", "open")
    _whole(lines, "12.3 s", "4.5 s", "probe in", "429 pause")


async def test_status_and_deployments_piped_are_whole(settings: Settings) -> None:
    # Given team alpha and no worker running, as an operator pipes the commands into less or
    # a file
    await add(settings, "alpha", identity="queue")
    env = {
        **os.environ,
        "QUEUEGATE_NAMESPACE": settings.namespace,
        "QUEUEGATE_DATABASE_SCHEMA": settings.database_schema,
        "COLUMNS": "",
    }

    async def piped(*args: str, code: int = 0) -> str:
        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli", *args, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        stdout, stderr = await asyncio.wait_for(cli.communicate(), timeout=30)
        assert cli.returncode == code, stderr.decode()
        return stdout.decode()

    # (status is stale, exit 3, with no worker reporting)
    status, deployments, wide = await asyncio.gather(
        piped("status", "--teams", "alpha", code=3),
        piped("deployments"),
        piped("deployments", "--wide"),
    )

    # Expect 80 columns at most and no cut header or name
    for text in (status, deployments):
        assert max(len(line) for line in text.splitlines()) <= 80, text
        assert "…" not in text, text
    _whole(status.splitlines(), "queued", "cons.", "p99 wait", "budget", "alpha")
    _whole(deployments.splitlines(), "deployment", "anthropic-main", "closed", "429 pause")
    # and --wide as wide as it needs, every name on one line
    _whole(wide.splitlines(), "openai_compatible", "claude-3-5-haiku-latest", "upstream model")


def test_dead_letters_show_a_publishers_escapes_and_bidi_overrides_written_out() -> None:
    # Given a dead letter whose id and detail a publisher filled with a title escape, a bell,
    # a right-to-left override and rich markup
    from cli.dlq import dead_letter_table
    from queuegate.dlq import DeadLetter

    letter = DeadLetter(
        position=0, message_id="id\x1b]0;owned\x07", reason="invalid_request",
        detail="[red]x\u202e", then=None, queue="ns.jobs.alpha", team="alpha", deaths=1,
        at=None, headers={}, body=b"{}", reply_to=None, user_id=None, truncated=None,
    )  # fmt: skip

    # When the wide list is rendered
    console = Console(width=160, file=io.StringIO(), color_system=None)
    console.print(dead_letter_table([letter], total=1, wide=True))
    text = console.file.getvalue()  # type: ignore[attr-defined]

    # Expect each control character written out and the brackets kept as text
    assert not any(c in text for c in "\x1b\x07\u202e"), repr(text)
    assert "id\\x1b]0;owned\\x07" in text and "[red]x\\u202e" in text


def test_a_cheap_jobs_cost_shows_its_significant_digits_in_every_cost_table() -> None:
    # Given a job that cost $0.00000039 (3 tokens of a $0.13/Mtok model), in the audit log,
    # the usage report and the demo's spend table, beside an amount with no more than six
    # decimals
    from admin.audit import AuditEntry, AuditPage
    from cli.audit import audit_table
    from queuegate.tables import spend_table

    cheap, plain = Decimal("0.000000390"), Decimal("12.5")
    entry = AuditEntry(
        id=1, job_id="j-1", team="alpha", ts=datetime(2026, 3, 1, tzinfo=UTC),
        model_requested="local-llama", model_used="local-llama", provider="openai",
        deployment="local-1", status="ok", error_code=None, input_tokens=2, output_tokens=1,
        cached_tokens=0, cost_usd=cheap, queued_ms=1.0, latency_ms=2.0, attempts=1,
        fallback_used=False, cached=False, identity=None, pii=[], captured=False,
    )  # fmt: skip
    spends = [TeamSpend("alpha", 1, 0, 2, 1, cheap), TeamSpend("beta", 1, 0, 2, 1, plain)]

    # When each is rendered
    audit = _render(audit_table(AuditPage([entry]), wide=False))
    usage = _render(table(records(spends), title="usage by team"))
    demo = _render(spend_table(spends, title="usage this month"))

    # Expect the cost's every significant digit, never rounded to 0.000000, and six decimals
    # still where it has no more
    for lines in (audit, usage, demo):
        _whole(lines, "0.00000039")
        assert not any("0.000000 " in f"{line} " for line in lines), lines
    for lines in (usage, demo):
        _whole(lines, "12.500000")
