"""Rows of numbers for people and programs: a rich table, JSON or CSV, from the same records.

Used by ``queuegate usage`` and ``queuegate status``; records are dataclasses, printed in
their field order.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections.abc import Sequence
from datetime import date, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from rich.console import Group, RenderableType
from rich.table import Table

from queuegate.numbers import plain_decimal

if TYPE_CHECKING:  # the usage command needs no broker or Redis client
    from queuegate.status import Status

_MONEY = ("cost_usd", "budget_usd", "budget_remaining", "spend_usd")


def records(rows: Sequence[Any]) -> list[dict[str, Any]]:
    """Dataclass rows as dicts, with the properties a report shows (budget remaining)."""
    out = []
    for row in rows:
        record = dataclasses.asdict(row)
        if hasattr(row, "budget_remaining"):
            record["budget_remaining"] = row.budget_remaining
        out.append(record)
    return out


def to_json(data: Any) -> str:
    return json.dumps(data, default=_plain, separators=(",", ":")) + "\n"


def to_csv(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: csv_cell(value) for key, value in row.items()})
    return buffer.getvalue()


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """One CSV cell; text a spreadsheet would run as a formula is prefixed with ``'``.

    A model alias or team name like ``=HYPERLINK(...)`` comes from whoever published the job,
    so text starting with ``= + - @``, a tab or a carriage return is neutralised as OWASP
    advises (CSV injection). Numbers stay numbers: a negative amount is not text.
    """
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return _plain(value)


def table(rows: list[dict[str, Any]], *, title: str, empty: str = "(no usage)") -> Table:
    out = Table(title=title)
    if not rows:
        out.add_column("")
        out.add_row(empty)
        return out
    for name, value in rows[0].items():
        numeric = isinstance(value, int | float | Decimal) or name in _MONEY
        out.add_column(name.replace("_", " "), justify="right" if numeric else "left")
    for row in rows:
        out.add_row(*(_cell(name, value) for name, value in row.items()))
    return out


def status_view(status: Status) -> RenderableType:
    """The status tables: teams, then deployments."""
    teams = Table(title=f"teams at {status.at:%H:%M:%S} UTC ({status.workers} workers live)")
    for name in ("team", "queued", "consumers", "in flight", "in/s", "out/s", "err/s"):
        teams.add_column(name, justify="left" if name == "team" else "right")
    for name in ("wait p50", "wait p99", "bucket", "spend (month)", "budget"):
        teams.add_column(name, justify="right")
    for t in status.teams:
        teams.add_row(
            t.team,
            _count(t.queue_depth),
            _count(t.consumers),
            f"{t.in_flight:,}",
            f"{t.jobs_in_per_s:.1f}",
            f"{t.jobs_out_per_s:.1f}",
            f"{t.errors_per_s:.1f}",
            _ms(t.wait_p50_ms),
            _ms(t.wait_p99_ms),
            "-" if t.bucket_fill is None else f"{t.bucket_fill:.0%}",
            f"${t.spend_usd:,.4f}",
            "-" if t.budget_usd is None else f"${t.budget_usd:,.2f}",
        )
    if not status.teams:
        teams.add_row("(no live worker: name teams with --teams)", *[""] * 11)
    deployments = Table(title="deployments (last minute)")
    for name in ("deployment", "breaker", "calls/s", "error rate"):
        deployments.add_column(name, justify="left" if name == "deployment" else "right")
    for d in status.deployments:
        deployments.add_row(
            d.deployment,
            d.breaker or "-",
            f"{d.calls_per_s:.1f}",
            "-" if d.error_rate is None else f"{d.error_rate:.1%}",
        )
    if not status.deployments:
        deployments.add_row("(no provider calls reported)", "", "", "")
    return Group(teams, deployments)


def _count(value: int | None) -> str:
    return "none" if value is None else f"{value:,}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f} ms"


def _cell(name: str, value: Any) -> str:
    if value is None:
        return "-"
    if name in _MONEY:
        return f"{value:,.6f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _plain(value: Any) -> Any:
    if isinstance(value, Decimal):
        return plain_decimal(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    return value
