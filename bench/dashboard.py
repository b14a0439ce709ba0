"""Every dashboard page over HTTP, against a front door whose schema holds 10 million usage
rows of 100 teams.

    .venv/bin/python -m bench.dashboard [--rows 10000000] [--teams 100] [--loads 5]

Loads the rows with ``bench.reports``' generator (its schema and namespace its own), gives
each team its queue (as ``teams add`` does) and ``BATCHES_PER_TEAM`` finished batches, starts
``queuegate api`` as a process of its own, signs in with an admin key and with a team's key
as a browser would (form, CSRF token, cookie), then loads each page ``--loads`` times one
after another: the time to the last byte of each answer, p50 and max (the first load
included). Prints a table and JSON, then drops the schema, the queues and the Redis keys.
The target is every page under ``TARGET_MS``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import time
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from accounting import migrate
from admin.audit import make_cursor
from admin.keys import issue_admin_key
from bench.reports import DEEP_ROW, MODELS, load
from bench.stack import bench_settings, free_port, wait_ready
from queuegate.broker import connect
from queuegate.db import create_pool
from queuegate.namespace import drop_namespace
from queuegate.settings import Settings
from queuegate.tenancy import add_api_key
from queuegate.topology import Topology

TARGET_MS = 1000.0
TEAMS = 100
TEAM = "team-7"
"""The team whose pages are loaded, by an administrator and by the team's own key."""
BATCHES_PER_TEAM = 100
START_TIMEOUT = 60.0
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')

# Finished batches (phase 'done': no runner takes them up), one every ten minutes per team.
_BATCHES = """
INSERT INTO api_batches (id, team, api, status, key_id, input_file_id, endpoint,
                         completion_window, total, done, failed, spend_usd, created_at,
                         expires_at, in_progress_at, completed_at, phase)
SELECT 'batch_bench' || t || '_' || n, 'team-' || t, 'openai', 'completed', 'bench',
       'file-bench', '/v1/chat/completions', '24h', 1000, 990, 10, 0.42,
       now() - n * interval '10 minutes', now() + interval '1 day',
       now() - n * interval '10 minutes', now() - n * interval '10 minutes' + interval '5 minutes',
       'done'
FROM generate_series(0, $1 - 1) AS t, generate_series(1, $2) AS n
"""


def pages(today: date, deep_cursor: str) -> dict[str, dict[str, str]]:
    """Each session's pages: name → path."""
    week = (today - timedelta(days=7)).isoformat() + "T00:00"
    audit = "/dashboard/audit"
    return {
        "admin": {
            "overview": "/dashboard",
            f"team {TEAM}": f"/dashboard/teams/{TEAM}",
            "audit log": audit,
            "audit: team, model, errors": f"{audit}?team={TEAM}&model={MODELS[1]}&status=error",
            "audit: PII found, all teams": f"{audit}?pii=true",
            "audit: errors, all teams": f"{audit}?status=error",
            "audit: one model, all teams": f"{audit}?model={MODELS[-1]}",
            "audit: team, last 7 days": f"{audit}?team={TEAM}&since={week}",
            "audit: deep page (cursor)": f"{audit}?cursor={deep_cursor}",
            "batches": "/dashboard/batches",
            "live (page)": "/dashboard/live",
            "live (data, every 1.5 s)": "/dashboard/live.json",
        },
        TEAM: {
            "team (own)": f"/dashboard/teams/{TEAM}",
            "audit log (own)": audit,
            "audit: own errors": f"{audit}?status=error",
            "batches (own)": "/dashboard/batches",
        },
    }


async def prepare(settings: Settings, rows: int, teams: int, console: Console) -> dict[str, Any]:
    """The schema filled, the team queues declared; the keys, the deep cursor, load time."""
    pool = await create_pool(settings, max_size=2)
    try:
        await migrate(pool, settings.database_schema)
        load_s = await load(pool, rows, console, teams=teams)
        await pool.execute(_BATCHES, teams, BATCHES_PER_TEAM)
        await pool.execute("ANALYZE api_batches")
        deep = await pool.fetchrow(DEEP_ROW, min(rows // 2, 1_000_000), timeout=None)
        admin = await issue_admin_key(pool, "bench")
        _, team_key = await add_api_key(pool, TEAM)
    finally:
        await pool.close()
    connection = await connect(settings.amqp_url, name="bench-dashboard")
    async with connection:
        channel = await connection.channel()
        topology = Topology.of(settings)
        for n in range(teams):
            await topology.declare_team_queue(channel, f"team-{n}")
    return {
        "load_s": load_s,
        "cursor": make_cursor(deep["ts"], deep["id"]),
        "keys": {"admin": admin.key, TEAM: team_key},
    }


async def sign_in(client: httpx.AsyncClient, key: str) -> None:
    """As the sign-in form does: its CSRF token and cookie, then the key."""
    form = await client.get("/dashboard/sign-in")
    match = _CSRF.search(form.text)
    if match is None:
        raise RuntimeError(f"no sign-in form at {form.url} ({form.status_code})")
    answer = await client.post("/dashboard/sign-in", data={"key": key, "csrf": match[1]})
    if answer.status_code != 303:
        raise RuntimeError(f"sign-in answered {answer.status_code}")


async def measure(
    url: str, key: str, paths: dict[str, str], loads: int, console: Console
) -> dict[str, dict[str, Any]]:
    """Per page: p50 and max ms over ``loads`` loads, the answer's status and size."""
    figures: dict[str, dict[str, Any]] = {}
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        await sign_in(client, key)
        for name, path in paths.items():
            console.print(f"[dim]loading {name}…[/]")
            times, status, size = [], 0, 0
            for _ in range(loads):
                started = time.perf_counter()
                answer = await client.get(path)
                times.append((time.perf_counter() - started) * 1000)
                status, size = answer.status_code, len(answer.content)
            figures[name] = {
                "p50_ms": round(statistics.median(times), 1),
                "max_ms": round(max(times), 1),
                "status": status,
                "bytes": size,
            }
    return figures


async def main(rows: int, teams: int, loads: int) -> None:
    console = Console()
    settings = bench_settings()
    today = datetime.now(UTC).date()
    door: asyncio.subprocess.Process | None = None
    results: dict[str, dict[str, dict[str, Any]]] = {}
    try:
        prepared = await prepare(settings, rows, teams, console)
        port = free_port()
        env = {
            "QUEUEGATE_NAMESPACE": settings.namespace,
            "QUEUEGATE_DATABASE_SCHEMA": settings.database_schema,
            "QUEUEGATE_METRICS_PORT": "0",
        }
        door = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "cli", "api", "--port", str(port), "--log-level", "warning"),
            env={**os.environ, **env},
        )
        url = f"http://127.0.0.1:{port}"
        await wait_ready(f"{url}/readyz", START_TIMEOUT, door)
        for session, paths in pages(today, prepared["cursor"]).items():
            key = prepared["keys"][session]
            results[session] = await measure(url, key, paths, loads, console)
    finally:
        if door is not None and door.returncode is None:
            door.terminate()
            await door.wait()
        await drop_namespace(settings, [f"team-{n}" for n in range(teams)])

    table = Table(title=f"dashboard pages over {rows:,} usage rows, {teams} teams ({loads} loads)")
    for column in ("session", "page", "p50 ms", "max ms", "status", "KiB", f"< {TARGET_MS:.0f} ms"):
        table.add_column(column, justify="left" if column in ("session", "page") else "right")
    for session, figures in results.items():
        for name, f in figures.items():
            met = "yes" if f["max_ms"] < TARGET_MS and f["status"] == 200 else "NO"
            table.add_row(
                session,
                name,
                f"{f['p50_ms']:.1f}",
                f"{f['max_ms']:.1f}",
                str(f["status"]),
                f"{f['bytes'] / 1024:.1f}",
                met,
            )
    console.print(table)
    console.print(f"load: {prepared['load_s']:.0f} s")
    summary = {
        "rows": rows,
        "teams": teams,
        "loads": loads,
        "load_s": round(prepared["load_s"], 1),
        "pages": results,
        "date": date.today().isoformat(),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--teams", type=int, default=TEAMS)
    parser.add_argument("--loads", type=int, default=5, help="loads of each page")
    args = parser.parse_args()
    asyncio.run(main(args.rows, args.teams, args.loads))
