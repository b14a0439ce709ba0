"""The deployments table operators read: where each one stands with every worker."""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table

from router.catalog import Deployment
from router.health import Status

_STATE_STYLE = {"closed": "green", "open": "red", "half_open": "yellow"}


def deployments_table(rows: Sequence[tuple[str, Deployment, Status]]) -> Table:
    table = Table(title="deployments")
    for column in ("alias", "deployment", "provider", "upstream model", "circuit"):
        table.add_column(column)
    table.add_column("probe in (s)", justify="right")
    table.add_column("429 pause (s)", justify="right")
    for alias, deployment, status in rows:
        style = _STATE_STYLE.get(status.state, "")
        table.add_row(
            alias,
            deployment.name,
            deployment.provider,
            deployment.model,
            f"[{style}]{status.state}[/]",
            f"{status.wait:.1f}" if status.state != "closed" else "",
            f"{status.paused_for:.1f}" if status.paused_for else "",
        )
    return table
