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

from pydantic import BaseModel
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from queuegate.numbers import USD_PLACES, plain_decimal, usd_places, usd_text
from queuegate.tables import add_number_column, add_text_column, compact_table, fit
from queuegate.visible import visible

if TYPE_CHECKING:  # the usage command needs no broker or Redis client
    from queuegate.status import Status

_MONEY = ("cost_usd", "budget_usd", "budget_remaining", "spend_usd")


def records(rows: Sequence[Any]) -> list[dict[str, Any]]:
    """Dataclass rows as dicts, with the properties a report shows (budget remaining), without
    the fields that only feed them (``metadata={"report": False}``)."""
    out = []
    for row in rows:
        record = {
            f.name: getattr(row, f.name)
            for f in dataclasses.fields(row)
            if f.metadata.get("report", True)
        }
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
    advises (CSV injection), and control characters are written out as in tables
    (``visible``): a terminal that shows the file runs none. Numbers stay numbers: a
    negative amount is not text.
    """
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + visible(value)
    return visible(value) if isinstance(value, str) else _plain(value)


_HEADERS = {
    "requests": "requests",
    "input_tokens": "tokens in",
    "output_tokens": "tokens out",
    "cost_usd": "cost (USD)",
    "budget_usd": "budget",
    "budget_remaining": "budget left",
}
_NARROW = ("day", "team", "model", "requests", "errors", "tokens", "cost_usd", "budget_remaining")
"""The columns of an 80-column report, in this order; ``--wide`` shows every field."""


def table(
    rows: list[dict[str, Any]], *, title: str, wide: bool = False, empty: str = "(no usage)"
) -> Table:
    out = compact_table(title)
    if not rows:
        add_text_column(out, "")
        out.add_row(empty)
        return out
    if wide:
        shown = rows
    else:
        tokens = [{**row, "tokens": row["input_tokens"] + row["output_tokens"]} for row in rows]
        shown = [{k: row[k] for k in _NARROW if k in row} for row in tokens]
    for name, value in shown[0].items():
        header = _HEADERS.get(name, name.replace("_", " "))
        if isinstance(value, int | float | Decimal) or name in _MONEY:
            add_number_column(out, header)
        else:
            add_text_column(out, header)
    places = {
        name: usd_places((row[name] for row in shown), 0 if name == "budget_usd" else USD_PLACES)
        for name in _MONEY
        if name in shown[0]
    }
    for row in shown:
        out.add_row(*(_cell(value, places.get(name)) for name, value in row.items()))
    return fit(out)


def status_view(status: Status, *, wide: bool = False) -> RenderableType:
    """The status tables: teams, then deployments; ``wide`` adds error rates and p50 waits.

    A status whose budgets were not read shows them "unknown", never as no budget."""
    unknown = "-" if status.budgets_read else "unknown"
    live = f"{status.workers} worker{'' if status.workers == 1 else 's'} live"
    if status.draining:
        each = "; ".join(f"{d.worker}, {d.in_flight:,} in flight" for d in status.draining)
        live += f", {len(status.draining)} draining ({each})"
    teams = compact_table(f"teams at {status.at:%H:%M:%S} UTC, {live}")
    add_text_column(teams, "team")
    headers = ["queued", "cons.", "in fl.", *(["in/s"] if wide else []), "out/s"]
    headers += ["err/s", "p50 wait"] if wide else []
    headers += ["p99 wait", "bucket", "spend", "budget"]
    for name in headers:
        add_number_column(teams, name, long=name in ("spend", "budget"))
    spend = usd_places(t.spend_usd for t in status.teams)
    budget = usd_places((t.budget_usd for t in status.teams), least=0)
    for t in status.teams:
        cells = [
            t.team if t.enabled else f"{t.team} (disabled)",
            _count(t.queue_depth),
            _count(t.consumers),
            f"{t.in_flight:,}",
            *([f"{t.jobs_in_per_s:.1f}"] if wide else []),
            f"{t.jobs_out_per_s:.1f}",
        ]
        if wide:
            cells += [f"{t.errors_per_s:.1f}", _ms(t.wait_p50_ms)]
        cells += [
            _ms(t.wait_p99_ms),
            "-" if t.bucket_fill is None else f"{t.bucket_fill:.0%}",
            f"${usd_text(t.spend_usd, spend)}",
            unknown if t.budget_usd is None else f"${usd_text(t.budget_usd, budget)}",
        ]
        teams.add_row(*cells)
    if not status.teams:
        teams.add_row("(no live worker: name teams with --teams)", *[""] * len(headers))
    if status.teams:
        # What accounting wrote is read with the budgets: not known when they are not.
        floor = ", at least what accounting wrote" if status.budgets_read else ""
        # Two lines: piped, a caption is not wrapped, and one line would pass 80 columns.
        teams.caption = (
            f"cons.: consumers · in fl.: in flight\nspend: this month, as workers count it{floor}"
        )
    deployments = compact_table("deployments, last minute")
    add_text_column(deployments, "deployment")
    for name in ("breaker", "calls/s", "error rate", "429s", "429 pause"):
        add_number_column(deployments, name)
    for d in status.deployments:
        deployments.add_row(
            d.deployment,
            d.breaker,
            f"{d.calls_per_s:.1f}",
            "-" if d.error_rate is None else f"{d.error_rate:.1%}",
            f"{d.rate_limited:,}",
            f"{d.paused_for:.1f} s" if d.paused_for else "-",
        )
    if not status.deployments:
        deployments.add_row("(no deployment in the catalog)", "", "", "", "", "")
    return Group(fit(teams), fit(deployments))


def watch_view(
    last: Status | None, reason: str | None, since: datetime | None, *, wide: bool = False
) -> RenderableType:
    """What ``status --watch`` shows: the last status it read (if any) and, while it is
    stale, one line above it saying since when and why."""
    parts: list[RenderableType] = []
    if reason is not None:
        when = f" since {since:%H:%M:%S} UTC" if since is not None else ""
        parts.append(Text(f"stale{when}: {visible(reason)}", style="bold yellow"))
    if last is not None:
        parts.append(status_view(last, wide=wide))
    return Group(*parts)


def _count(value: int | None) -> str:
    return "none" if value is None else f"{value:,}"


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f} ms" if value < 10_000 else f"{value / 1000:,.1f} s"


def _cell(value: Any, places: int | None) -> str:
    """``places``: the decimals of a money column (``usd_places``); None for any other."""
    if value is None:
        return "-"
    if places is not None:
        return usd_text(value, places)
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):  # a team's config: its own serializers (money as text)
        return value.model_dump(mode="json")
    if isinstance(value, Decimal):
        return plain_decimal(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    return value
