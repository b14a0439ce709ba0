"""Tables people read numbers from, rendered with rich."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Protocol

from rich.table import Table

from queuegate.registry import Team


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


def team_table(team: Team) -> Table:
    """A team's config, one row per limit; per-model limits below the team-wide ones."""
    config = team.config
    table = Table(title=f"team {team.name} ({'enabled' if team.enabled else 'disabled'})")
    table.add_column("scope")
    for column in ("rpm", "tpm", "budget (USD)"):
        table.add_column(column, justify="right")

    def cell(value: object) -> str:
        return "-" if value is None else f"{value:,}" if isinstance(value, int) else str(value)

    table.add_row("team", cell(config.rpm), cell(config.tpm), cell(config.budget_usd))
    for alias, limits in sorted(config.models.items()):
        table.add_row(alias, cell(limits.rpm), cell(limits.tpm), cell(limits.budget_usd))
    table.caption = (
        f"alert at {config.alert_threshold:.0%} of the budget · "
        f"max queue length {cell(config.max_queue_length)} · "
        f"expected output {cell(config.expected_output_tokens)} tokens · "
        f"response cache {'on' if config.cache else 'off'} by default"
    )
    return table
