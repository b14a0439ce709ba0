"""Tables people read numbers from, rendered with rich."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Protocol

from rich.table import Table


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
    table = Table(title=title)
    table.add_column("team")
    for column in ("requests", "errors", "input tokens", "output tokens", "cost (USD)"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            row.team,
            f"{row.requests:,}",
            f"{row.errors:,}",
            f"{row.input_tokens:,}",
            f"{row.output_tokens:,}",
            f"{row.cost_usd:.6f}",
        )
    if not rows:
        table.add_row("(no usage)", "", "", "", "", "")
    return table
