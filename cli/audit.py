"""``queuegate audit``: the audit log's pages, and retention of captured prompts and responses."""

from __future__ import annotations

import dataclasses
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated

import typer

from cli.console import err, out, print_table
from cli.options import OnlyTeam, make_settings, one
from queuegate.messages import JobStatus
from queuegate.numbers import usd_text
from queuegate.runtime import run

if TYPE_CHECKING:
    from rich.table import Table

    from admin.audit import AuditPage

audit_app = typer.Typer(
    help="The audit log, and captured prompts and responses: retention.", no_args_is_help=True
)

_TIMES = ["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"]
_TIME = "YYYY-MM-DD[THH:MM:SS]"


@audit_app.command("log")
def audit_log(
    team: OnlyTeam = None,
    model: Annotated[str | None, typer.Option(help="Only this requested model alias.")] = None,
    status: Annotated[
        JobStatus | None, typer.Option(help="Only jobs that ended so: ok or error.")
    ] = None,
    pii: Annotated[
        bool | None, typer.Option("--pii/--no-pii", help="Only jobs with (without) PII found.")
    ] = None,
    since: Annotated[
        datetime | None,
        typer.Option(formats=_TIMES, metavar=_TIME, help="Finished at or after (UTC)."),
    ] = None,
    until: Annotated[
        datetime | None, typer.Option(formats=_TIMES, metavar=_TIME, help="Finished before (UTC).")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="Rows on the page.")] = 50,
    offset: Annotated[int, typer.Option(min=0, help="Rows skipped first.")] = 0,
    cursor: Annotated[
        str | None, typer.Option(help="Start after this row: a page's next cursor.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of a table.")] = False,
    wide: Annotated[
        bool, typer.Option("--wide", help="Also provider, latency, identity and PII.")
    ] = False,
) -> None:
    """Finished jobs, newest first: who ran what model, how it ended, tokens and cost."""
    from admin.audit import AuditFilter, audit_page
    from queuegate.db import create_pool
    from queuegate.reporting import to_json

    where = AuditFilter(one(team), model, status, pii, since, until)
    settings = make_settings()

    async def go() -> AuditPage:
        async with await create_pool(settings) as pool:
            return await audit_page(pool, where, limit=limit, offset=offset, cursor=cursor)

    page = run(go)
    if as_json:
        sys.stdout.write(to_json(dataclasses.asdict(page)))
        return
    print_table(audit_table(page, wide=wide), wide=wide)
    if page.next_cursor is not None:
        err.print(f"next page: --cursor {page.next_cursor}", highlight=False)


def audit_table(page: AuditPage, *, wide: bool) -> Table:
    from queuegate.tables import add_number_column, add_text_column, compact_table, fit

    table = compact_table(f"audit log: {len(page.entries):,} jobs, newest first")
    for header in ("finished (UTC)", "team", "job id", "model", "status"):
        add_text_column(table, header)
    for header in ("tokens", "cost (USD)"):
        add_number_column(table, header)
    if wide:
        for header in ("served by", "provider"):
            add_text_column(table, header)
        add_number_column(table, "ms")
        for header in ("identity", "pii"):
            add_text_column(table, header)
    for e in page.entries:
        row = [
            f"{e.ts.astimezone(UTC):%Y-%m-%d %H:%M:%S}",
            e.team,
            e.job_id,
            e.model_requested,
            e.status if e.status == "ok" else e.error_code or "error",
            f"{e.input_tokens + e.output_tokens:,}",
            usd_text(e.cost_usd),
        ]
        if wide:
            row += [
                e.model_used or "-",
                e.provider or "-",
                f"{e.latency_ms:,.0f}",
                e.identity or "-",
                ",".join(e.pii) or "-",
            ]
        table.add_row(*row)
    if not page.entries:
        table.add_row("(no jobs)", *[""] * (len(table.columns) - 1))
    return fit(table)


@audit_app.command("prune")
def audit_prune(
    older_than: Annotated[str, typer.Option(help="Age like 90d, 12h or 30m.")] = "90d",
) -> None:
    """Delete captured prompts and responses older than the given age (usage rows stay)."""
    from admin.audit import parse_age, prune_content
    from queuegate.db import create_pool

    age = parse_age(older_than)
    settings = make_settings()

    async def go() -> int:
        async with await create_pool(settings) as pool:
            return await prune_content(pool, age)

    out.print(f"deleted {run(go):,} captured jobs older than {older_than}")
