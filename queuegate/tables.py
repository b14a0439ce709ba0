"""Tables people read numbers from, rendered with rich."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Protocol

from rich.table import Table

if TYPE_CHECKING:
    from queuegate.dlq import DeadLetter


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


def dead_letter_table(letters: Sequence[DeadLetter], *, total: int) -> Table:
    table = Table(title=f"dead letters: {len(letters):,} of {total:,} shown")
    table.add_column("#", justify="right")
    for column in ("job id", "reason", "from queue", "deaths", "dead since (UTC)", "bytes"):
        table.add_column(column, justify="right" if column in {"deaths", "bytes"} else "left")
    table.add_column("detail", overflow="fold")
    for letter in letters:
        table.add_row(
            str(letter.position),
            letter.message_id or "-",
            letter.reason,
            letter.queue,
            str(letter.deaths),
            f"{letter.at:%Y-%m-%d %H:%M:%S}" if letter.at else "-",
            f"{len(letter.body):,}",
            letter.detail[:80],
        )
    if not letters:
        table.add_row("", "(empty)", "", "", "", "", "", "")
    return table
