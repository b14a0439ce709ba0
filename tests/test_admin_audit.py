"""Audit log pages: the rows their filters keep, newest first, each once across pages."""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from accounting.store import insert_usage
from admin.audit import MAX_OFFSET, AuditFilter, audit_page
from queuegate.errors import ConfigError
from queuegate.messages import AuditContent, UsageEvent
from queuegate.registry import add_team
from queuegate.settings import Settings

START = datetime(2026, 3, 1, tzinfo=UTC)


def _events(n: int) -> list[UsageEvent]:
    """Jobs of two teams and three models over ten days; some failed, some flagged for PII,
    some finishing at the very same instant (pages must still order and split them)."""
    rng = random.Random(3)
    events = []
    for i in range(n):
        failed = i % 5 == 0
        events.append(
            UsageEvent(
                job_id=f"job-{i}",
                team=("alpha", "beta")[i % 2],
                model_requested=("gpt-4o-mini", "claude-haiku", "local-llama")[i % 3],
                status="error" if failed else "ok",
                error_code="provider_error" if failed else None,
                input_tokens=rng.randrange(1000),
                output_tokens=rng.randrange(100),
                cost_usd=Decimal(rng.randrange(10**6)) / 10**10,
                ts=START + timedelta(hours=rng.randrange(10 * 24)),
                pii="email,phone" if i % 7 == 0 else None,
                identity="queue",
                content=AuditContent(capture="full", prompt=[{"role": "user", "content": "hi"}])
                if i % 11 == 0
                else None,
            )
        )
    return events


async def _expected(pool: asyncpg.Pool, keep: Any) -> list[str]:
    rows = await pool.fetch("SELECT id, job_id, ts FROM usage_log")
    kept = sorted((r for r in rows if keep(r)), key=lambda r: (r["ts"], r["id"]), reverse=True)
    return [r["job_id"] for r in kept]


async def _all_pages(pool: asyncpg.Pool, where: AuditFilter, limit: int) -> list[str]:
    seen: list[str] = []
    cursor = None
    while True:
        page = await audit_page(pool, where, limit=limit, cursor=cursor)
        assert len(page.entries) <= limit
        seen += [e.job_id for e in page.entries]
        if page.next_cursor is None:
            return seen
        cursor = page.next_cursor


FILTERS: dict[str, tuple[AuditFilter, Any]] = {
    "all": (AuditFilter(), lambda r: True),
    "team": (AuditFilter(team="beta"), lambda r: r["job_id"].endswith(("1", "3", "5", "7", "9"))),
    "model and status": (
        AuditFilter(model="local-llama", status="error"),
        lambda r: int(r["job_id"][4:]) % 15 == 5,
    ),
    "pii": (AuditFilter(team="alpha", pii=True), lambda r: int(r["job_id"][4:]) % 14 == 0),
    "no pii": (AuditFilter(pii=False), lambda r: int(r["job_id"][4:]) % 7 != 0),
    "time": (
        AuditFilter(since=START + timedelta(days=2), until=START + timedelta(days=5)),
        lambda r: START + timedelta(days=2) <= r["ts"] < START + timedelta(days=5),
    ),
}


@pytest.mark.parametrize("name", sorted(FILTERS))
async def test_pages_hold_every_kept_row_once_newest_first(pool: asyncpg.Pool, name: str) -> None:
    # Given 400 jobs' usage of two registered teams
    for team in ("alpha", "beta"):
        await add_team(pool, team)
    await insert_usage(pool, _events(400))
    where, keep = FILTERS[name]
    expected = await _expected(pool, keep)
    assert expected  # the filter keeps some rows, and not all (but for "all")
    if name != "all":
        assert len(expected) < 400

    # When every page is read by cursor, 17 rows at a time, and the first pages by offset
    by_cursor = await _all_pages(pool, where, limit=17)
    first = await audit_page(pool, where, limit=17)
    second = await audit_page(pool, where, limit=17, offset=17)

    # Expect the kept rows, each once, newest first; offsets the same pages
    assert by_cursor == expected
    assert [e.job_id for e in first.entries + second.entries] == expected[:34]
    assert first.next_offset == 17


async def test_an_entry_carries_the_row_and_whether_content_was_captured(
    pool: asyncpg.Pool,
) -> None:
    await insert_usage(pool, _events(30))
    page = await audit_page(pool, AuditFilter(pii=True), limit=100)
    entries = {e.job_id: e for e in page.entries}

    assert set(entries) == {"job-0", "job-7", "job-14", "job-21", "job-28"}
    zero = entries["job-0"]
    assert (zero.team, zero.model_requested, zero.status, zero.error_code) == (
        "alpha",
        "gpt-4o-mini",
        "error",
        "provider_error",
    )
    assert zero.pii == ["email", "phone"] and zero.identity == "queue"
    assert zero.captured and not entries["job-7"].captured
    assert isinstance(zero.cost_usd, Decimal)


async def test_the_last_page_has_no_next(pool: asyncpg.Pool) -> None:
    await insert_usage(pool, _events(10))
    page = await audit_page(pool, limit=10)
    assert len(page.entries) == 10
    assert page.next_cursor is None and page.next_offset is None


@pytest.mark.parametrize(
    ("limit", "offset", "cursor", "message"),
    [
        (0, 0, None, "limit 0 is out of range"),
        (1001, 0, None, "limit 1001 is out of range"),
        (10, MAX_OFFSET + 1, None, "next_cursor"),
        (10, 0, "1700000000000000", "is not one of ours"),
        (10, 0, "9" * 20 + "-1", "is not one of ours"),
    ],
)
async def test_out_of_range_pages_are_refused_in_one_line(
    pool: asyncpg.Pool, limit: int, offset: int, cursor: str | None, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        await audit_page(pool, limit=limit, offset=offset, cursor=cursor)


async def test_audit_log_command_prints_pages_as_json(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    # Given 50 jobs' usage
    await insert_usage(pool, _events(50))
    expected = await _expected(pool, lambda r: int(r["job_id"][4:]) % 5 == 0)
    env = {
        **os.environ,
        "QUEUEGATE_NAMESPACE": settings.namespace,
        "QUEUEGATE_DATABASE_SCHEMA": settings.database_schema,
    }

    async def audit_log(*flags: str) -> str:
        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli", "audit", "log", "--status", "error", *flags,
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        stdout, stderr = await asyncio.wait_for(cli.communicate(), timeout=20)
        assert cli.returncode == 0, stderr.decode()
        return stdout.decode()

    # When an operator reads the failed jobs two pages of 6, then as a table
    first = json.loads(await audit_log("--limit", "6", "--json"))
    second = json.loads(await audit_log("--limit", "6", "--cursor", first["next_cursor"], "--json"))
    table = await audit_log("--limit", "3")

    # Expect the pages to follow each other, and the table to show the newest
    assert [e["job_id"] for e in first["entries"] + second["entries"]] == expected[:12]
    assert first["entries"][0]["cost_usd"] == str(first["entries"][0]["cost_usd"])
    assert all(job_id in table for job_id in expected[:3])
    assert expected[3] not in table
