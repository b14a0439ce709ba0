"""The deployments table operators read: where each one stands with every worker."""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table
from rich.text import Text

from queuegate.deployment_health import DeploymentHealth
from queuegate.tables import add_number_column, add_text_column, compact_table, fit
from router.catalog import Deployment

_STATE_STYLE = {"closed": "green", "open": "red", "half_open": "yellow"}


def deployments_table(
    rows: Sequence[tuple[str, Deployment, DeploymentHealth]], *, wide: bool = False
) -> Table:
    """Alias, deployment and where its breaker and 429 pause stand; ``wide`` adds the
    provider and upstream model."""
    table = compact_table("deployments")
    headers = ["alias", "deployment", *(["provider", "upstream model"] if wide else [])]
    for column in headers:
        add_text_column(table, column)
    add_text_column(table, "circuit")
    add_number_column(table, "probe in")
    add_number_column(table, "429 pause")
    for alias, deployment, status in rows:
        style = _STATE_STYLE.get(status.state, "")
        names = [alias, deployment.name]
        if wide:
            names += [deployment.provider, deployment.model]
        table.add_row(
            *names,
            Text(status.state, style=style),
            f"{status.wait:.1f} s" if status.state != "closed" else "",
            f"{status.paused_for:.1f} s" if status.paused_for else "",
        )
    return fit(table)
