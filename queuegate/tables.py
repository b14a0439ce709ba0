"""Tables people read numbers from, rendered with rich.

Laid out for 80 columns (a terminal's default, and rich's width when output is piped): few
columns, a border that costs one space between them, and cells that fold onto a second line
rather than end in "…", so no number or id is ever cut. Commands offer ``--wide`` (and
``--json``) for the columns left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Any, Protocol

from rich import box
from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from queuegate.numbers import plain_decimal, usd_places, usd_text
from queuegate.registry import Team
from queuegate.visible import visible

TEXT_MIN_WIDTH = 12
"""What a text column (a team, a model alias) keeps at least when a table must shrink."""


class SafeTable(Table):
    """A table whose text cells are shown as they are: control characters written out, and
    brackets taken literally (never as rich markup). Other renderables pass unchanged."""

    def add_row(
        self,
        *renderables: RenderableType | None,
        style: Any = None,
        end_section: bool = False,
    ) -> None:
        cells = [Text(visible(cell)) if isinstance(cell, str) else cell for cell in renderables]
        super().add_row(*cells, style=style, end_section=end_section)


def safe_title(title: str) -> Text:
    """A title that may hold a name someone chose, written out, in rich's title style."""
    return Text(visible(title), style="table.title")


def compact_table(title: str) -> Table:
    """A table whose columns are one space apart, with a rule under the header."""
    return SafeTable(title=safe_title(title), box=box.SIMPLE_HEAD, padding=0, show_edge=False)


def add_text_column(table: Table, header: str) -> None:
    """Left-aligned; a long value folds onto the next line, whole."""
    table.add_column(header, overflow="fold")


def add_number_column(table: Table, header: str, *, long: bool = False) -> None:
    """Right-aligned and never wrapped (see ``fit``); a ``long`` one (money, whose every
    decimal is shown: up to 24 characters) folds onto a second line, whole, when 80 columns
    are too few for it, rather than push the table past them."""
    table.add_column(header, justify="right", no_wrap=not long, overflow="fold")


def fit(table: Table) -> Table:
    """Call once the rows are in: number columns keep the width of their widest cell and
    header, so when 80 columns are too few rich narrows the text columns, never a number;
    a long number column (``add_number_column``) may narrow to its header, folding."""
    for column in table.columns:
        header = Text.from_markup(str(column.header)).cell_len
        widest = max([header, *(_width(cell) for cell in column.cells)])
        if column.no_wrap:
            column.min_width = widest
        elif column.justify == "right":
            column.min_width = header
        else:
            column.min_width = min(widest, TEXT_MIN_WIDTH)
    return table


def _width(cell: object) -> int:
    return cell.cell_len if isinstance(cell, Text) else Text.from_markup(str(cell)).cell_len


class SpendRow(Protocol):
    @property
    def team(self) -> str: ...
    @property
    def requests(self) -> int: ...
    @property
    def errors(self) -> int: ...
    @property
    def input_tokens(self) -> int: ...
    @property
    def output_tokens(self) -> int: ...
    @property
    def cost_usd(self) -> Decimal: ...


def spend_table(rows: Sequence[SpendRow], *, title: str) -> Table:
    table = SafeTable(title=safe_title(title))
    table.add_column("team")
    for column in ("requests", "errors", "input tokens", "output tokens", "cost (USD)"):
        table.add_column(column, justify="right")
    places = usd_places(row.cost_usd for row in rows)
    for row in rows:
        table.add_row(
            row.team,
            f"{row.requests:,}",
            f"{row.errors:,}",
            f"{row.input_tokens:,}",
            f"{row.output_tokens:,}",
            usd_text(row.cost_usd, places),
        )
    if not rows:
        table.add_row("(no usage)", "", "", "", "", "")
    return table


def _or_default(setting: str, value: int | None, unit: str = "") -> str:
    """A team setting's caption line, which says when the gateway's default applies."""
    return f"{setting}: the gateway's default" if value is None else f"{setting} {value:,}{unit}"


def team_table(team: Team, broker_limits: tuple[str, int, int] | None = None) -> Table:
    """A team's config, one row per limit; per-model limits below the team-wide ones.

    ``broker_limits``: the team's broker user and its connection and channel limits.
    """
    config = team.config
    table = SafeTable(title=f"team {team.name} ({'enabled' if team.enabled else 'disabled'})")
    table.add_column("scope")
    for column in ("rpm", "tpm", "budget (USD)"):
        table.add_column(column, justify="right")

    def cell(value: object) -> str:
        if value is None:
            return "-"
        if isinstance(value, Decimal):
            return plain_decimal(value)
        return f"{value:,}" if isinstance(value, int) else str(value)

    table.add_row("team", cell(config.rpm), cell(config.tpm), cell(config.budget_usd))
    for alias, limits in sorted(config.models.items()):
        table.add_row(alias, cell(limits.rpm), cell(limits.tpm), cell(limits.budget_usd))
    lines = [
        f"alert at {config.alert_threshold:.0%} of the budget",
        _or_default("max queue length", config.max_queue_length),
        _or_default("max queue bytes", config.max_queue_bytes),
        _or_default("file storage", config.file_storage_bytes, " bytes"),
        _or_default("expected output", config.expected_output_tokens, " tokens"),
        f"response cache {'on' if config.cache else 'off'} by default",
    ]
    if broker_limits is not None:
        user, connections, channels = broker_limits
        lines.append(f"broker user {user}: {connections:,} connections, {channels:,} channels")
    table.caption = "\n".join(lines)
    table.caption_justify = "left"
    return table
