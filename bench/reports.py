"""Usage reports and audit log pages against 10 million usage rows, in a schema of its own.

    .venv/bin/python -m bench.reports [--rows 10000000] [--runs 5]

Loads synthetic rows (generate_series in SQL, chunk by chunk, the rollup trigger on), runs
every report query and audit log page (admin.usage, admin.audit) with EXPLAIN ANALYZE, then
the same month read straight from usage_log for comparison, and what the rollup trigger
costs accounting's batch inserts. Prints a table
and JSON, then drops the schema. Figures are noisy on a shared machine: read them as orders
of magnitude.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from accounting import migrate
from accounting.reports import (
    DAILY_SPEND,
    MODEL_SPEND,
    MONTHLY_SPEND,
    TEAM_BUDGETS,
    month_range,
)
from accounting.store import insert_usage
from admin.audit import MAX_OFFSET, AuditFilter, make_cursor, page_query
from queuegate.db import create_pool, quote_ident
from queuegate.messages import UsageEvent
from queuegate.settings import Settings

CHUNK = 500_000
INDEX_MEMORY = "512MB"
"""Memory each index build sorts in (the session's, for the load only)."""
TEAMS = 50
MODELS = ("gpt-4o-mini", "gpt-4o", "claude-haiku", "claude-sonnet", "local-llama", "o3-mini")
DAYS = 90

# Rows spread evenly over the DAYS days before $3 across $5 teams, each team's rows over the
# models in turn; 5% failed and 1% flagged for PII, in every team and model alike (k: the
# row's number within its team).
_LOAD = f"""
INSERT INTO usage_log (job_id, team, model_requested, model_used, provider, deployment,
                       input_tokens, output_tokens, cost_usd, status, error_code, latency_ms,
                       attempts, worker, ts, pii)
SELECT 'bench-' || i, 'team-' || (i % $5), model, model, 'openai', 'main',
       100 + i % 4000, 10 + i % 800, ((100 + i % 4000) * 15 + (10 + i % 800) * 60) / 1e8,
       CASE WHEN k / {len(MODELS)} % 20 = 0 THEN 'error' ELSE 'ok' END,
       CASE WHEN k / {len(MODELS)} % 20 = 0 THEN 'provider_error' END,
       200 + i % 1000, 1, 'bench',
       $3::timestamptz - ((i::float8 / $4) * interval '{DAYS} days'),
       CASE WHEN k / {len(MODELS)} % 100 = 7 THEN 'email' END
FROM generate_series($1::bigint, $2::bigint) AS i,
     LATERAL (SELECT i / $5 AS k) AS team_row,
     LATERAL (SELECT (ARRAY{list(MODELS)!r})[1 + k % {len(MODELS)}] AS model) AS chosen
"""

# Every index but the constraints' is dropped before the load and built again after it;
# the constraints' indexes too, given again by their definitions.
_INDEXES = """
SELECT i.indexname, i.indexdef FROM pg_indexes i
WHERE i.schemaname = current_schema() AND i.tablename = 'usage_log'
  AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conname = i.indexname)
"""
_CONSTRAINTS = """
SELECT c.conname, pg_get_constraintdef(c.oid) AS definition FROM pg_constraint c
WHERE c.conrelid = 'usage_log'::regclass AND c.contype IN ('p', 'u')
"""

DEEP_ROW = "SELECT ts, id FROM usage_log ORDER BY ts DESC, id DESC OFFSET $1 LIMIT 1"
RAW_MONTHLY = """
SELECT team, count(*), count(*) FILTER (WHERE status = 'error'), sum(input_tokens),
       sum(output_tokens), sum(cost_usd)
FROM usage_log WHERE ts >= $1 AND ts < $2 GROUP BY team ORDER BY 6 DESC
"""


async def load(pool: asyncpg.Pool, rows: int, console: Console, *, teams: int = TEAMS) -> float:
    """Fill the (empty, migrated) schema of ``pool`` with ``rows`` usage rows of ``teams``
    teams ``team-0``… (registered, each with a budget) and their rollup; the seconds it took.
    The rows span the ``DAYS`` days that end with this UTC month, so this month's reports
    read a whole month, as they do on its last day (the most they ever read).

    Generated in SQL (generate_series), so nothing crosses the wire: a binary COPY of the same
    rows from Python took four times as long. Indexes are built once after the load, sorted,
    rather than row by row."""
    end = month_range(datetime.now(UTC).date())[1]
    started = time.perf_counter()
    async with pool.acquire() as conn:
        await conn.execute("SET synchronous_commit = off")
        await conn.execute(f"SET maintenance_work_mem = '{INDEX_MEMORY}'")
        indexes = await conn.fetch(_INDEXES)
        constraints = await conn.fetch(_CONSTRAINTS)
        await conn.execute(f"DROP INDEX {', '.join(row['indexname'] for row in indexes)}")
        drops = ", ".join(f"DROP CONSTRAINT {quote_ident(c['conname'])}" for c in constraints)
        await conn.execute(f"ALTER TABLE usage_log {drops}")
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task(f"loading {rows:,} usage rows", total=rows)
            for first in range(1, rows + 1, CHUNK):
                last = min(first + CHUNK - 1, rows)
                await conn.execute(_LOAD, first, last, end, rows, teams, timeout=None)
                progress.update(task, completed=last)
        adds = ", ".join(
            f"ADD CONSTRAINT {quote_ident(c['conname'])} {c['definition']}" for c in constraints
        )
        await conn.execute(f"ALTER TABLE usage_log {adds}", timeout=None)
        for row in indexes:
            await conn.execute(row["indexdef"], timeout=None)
        await conn.execute("VACUUM ANALYZE usage_log", timeout=None)
        await conn.execute("VACUUM ANALYZE usage_daily", timeout=None)
        await conn.execute(
            "INSERT INTO teams (name, config) SELECT 'team-' || i,"
            " jsonb_build_object('budget_usd', '500') FROM generate_series(0, $1 - 1) i",
            teams,
        )
    return time.perf_counter() - started


async def explain(pool: asyncpg.Pool, sql: str, args: tuple[Any, ...], runs: int) -> dict[str, Any]:
    """Median planning and execution time (ms) of EXPLAIN ANALYZE over ``runs`` runs."""
    planning, execution = [], []
    rows = 0
    for _ in range(runs):
        plan = await pool.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", *args, timeout=None)
        top = (json.loads(plan) if isinstance(plan, str) else plan)[0]
        planning.append(top["Planning Time"])
        execution.append(top["Execution Time"])
        rows = top["Plan"]["Actual Rows"]
    return {
        "planning_ms": round(statistics.median(planning), 3),
        "execution_ms": round(statistics.median(execution), 3),
        "rows": rows,
    }


async def trigger_cost(pool: asyncpg.Pool, batches: int = 20, size: int = 500) -> dict[str, float]:
    """Batch inserts per second (events/s) with and without the rollup trigger."""
    figures: dict[str, float] = {}
    for label, action in (("with_rollup", "ENABLE"), ("without_rollup", "DISABLE")):
        await pool.execute(f"ALTER TABLE usage_log {action} TRIGGER usage_daily_add")
        started = time.perf_counter()
        for b in range(batches):
            events = [
                UsageEvent(
                    job_id=f"cost-{label}-{b}-{i}",
                    team=f"team-{i % TEAMS}",
                    model_requested=MODELS[i % len(MODELS)],
                    input_tokens=100,
                    output_tokens=20,
                    cost_usd=Decimal("0.0001"),
                    status="ok",
                )
                for i in range(size)
            ]
            await insert_usage(pool, events)
        figures[f"{label}_events_per_s"] = round(batches * size / (time.perf_counter() - started))
    await pool.execute("ALTER TABLE usage_log ENABLE TRIGGER usage_daily_add")
    return figures


async def main(rows: int, runs: int) -> None:
    console = Console()
    schema = f"qg_bench_{uuid.uuid4().hex[:8]}"
    settings = Settings(database_schema=schema)
    pool = await create_pool(settings, max_size=2)
    try:
        await migrate(pool, schema)
        load_s = await load(pool, rows, console)
        today = datetime.now(UTC).date()
        month = month_range(today)
        month_days = (month[0].date(), month[1].date())
        last_30 = (today - timedelta(days=29), today + timedelta(days=1))
        # Filters: team, model, status (NULL: all); the monthly and model queries limit first.
        queries: dict[str, tuple[str, tuple[Any, ...]]] = {
            "usage (by team, month)": (MONTHLY_SPEND, (*month_days, None, None, None, None)),
            "usage --top 5": (MONTHLY_SPEND, (*month_days, 5, None, None, None)),
            "usage --by model": (MODEL_SPEND, (*month_days, None, None, None, None)),
            "usage --daily (30 days)": (DAILY_SPEND, (*last_30, None, None, None)),
            "usage --daily --team": (DAILY_SPEND, (*last_30, "team-7", None, None)),
            "team month, errors": (MONTHLY_SPEND, (*month_days, None, "team-7", None, "error")),
            "team month by model, one model": (
                MODEL_SPEND,
                (*month_days, None, "team-7", "gpt-4o", None),
            ),
            "team trend, errors": (DAILY_SPEND, (*last_30, "team-7", None, "error")),
            "budgets": (TEAM_BUDGETS, ()),
        }
        deep = await pool.fetchrow(DEEP_ROW, min(rows // 2, 1_000_000), timeout=None)
        cursor = make_cursor(deep["ts"], deep["id"])
        pages = {
            "audit page, all teams": AuditFilter(),
            "audit page, team": AuditFilter(team="team-7"),
            "audit page, team, model": AuditFilter(team="team-7", model="claude-haiku"),
            "audit page, team, errors": AuditFilter(team="team-7", status="error"),
            "audit page, team, pii": AuditFilter(team="team-7", pii=True),
            "audit page, all teams, pii": AuditFilter(pii=True),
            "audit page, all teams, errors": AuditFilter(status="error"),
            "audit page, all teams, one model": AuditFilter(model="o3-mini"),
            "audit page, team, 7 days": AuditFilter(
                team="team-7", since=month[0] - timedelta(days=7), until=month[0]
            ),
        }
        for name, where in pages.items():
            sql, page_args = page_query(where, limit=50, offset=0, cursor=None)
            queries[name] = (sql, tuple(page_args))
        for name, offset, after in (
            (f"audit page at offset {MAX_OFFSET:,}", MAX_OFFSET, None),
            (f"audit page after row {min(rows // 2, 1_000_000):,} (cursor)", 0, cursor),
        ):
            sql, page_args = page_query(AuditFilter(), limit=50, offset=offset, cursor=after)
            queries[name] = (sql, tuple(page_args))
        queries["month from usage_log (no rollup)"] = (RAW_MONTHLY, month)
        results = {}
        for name, (sql, args) in queries.items():
            console.print(f"[dim]measuring {name}…[/]")
            results[name] = await explain(pool, sql, args, runs if "no rollup" not in name else 1)
        rollup_rows = await pool.fetchval("SELECT count(*) FROM usage_daily")
        insert = await trigger_cost(pool)
    finally:
        await pool.execute(f"DROP SCHEMA {quote_ident(schema)} CASCADE", timeout=None)
        await pool.close()

    table = Table(title=f"report queries over {rows:,} usage rows ({rollup_rows:,} rollup rows)")
    for column in ("query", "planning ms", "execution ms", "rows out"):
        table.add_column(column, justify="left" if column == "query" else "right")
    for name, figures in results.items():
        table.add_row(
            name,
            f"{figures['planning_ms']:.2f}",
            f"{figures['execution_ms']:.2f}",
            f"{figures['rows']:,}",
        )
    console.print(table)
    console.print(
        f"load: {load_s:.0f} s; accounting batch inserts: {insert['with_rollup_events_per_s']:,}"
        f" events/s with the rollup trigger, {insert['without_rollup_events_per_s']:,} without"
    )
    summary = {
        "rows": rows,
        "rollup_rows": rollup_rows,
        "runs": runs,
        "load_s": round(load_s, 1),
        "queries": results,
        "insert": insert,
        "date": date.today().isoformat(),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--runs", type=int, default=5, help="EXPLAIN ANALYZE runs per query")
    args = parser.parse_args()
    asyncio.run(main(args.rows, args.runs))
