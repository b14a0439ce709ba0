"""Reports read from ``usage_log``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import asyncpg


@dataclass(frozen=True)
class TeamSpend:
    """One team's usage in a period."""

    team: str
    requests: int
    errors: int
    input_tokens: int
    output_tokens: int
    cost_usd: Decimal


# A half-open range on ts, so the (ts) index serves it and no row falls between two months.
_MONTHLY_SPEND = """
SELECT team,
       count(*) AS requests,
       count(*) FILTER (WHERE status = 'error') AS errors,
       coalesce(sum(input_tokens), 0)::bigint AS input_tokens,
       coalesce(sum(output_tokens), 0)::bigint AS output_tokens,
       coalesce(sum(cost_usd), 0) AS cost_usd
FROM usage_log
WHERE ts >= $1 AND ts < $2
GROUP BY team
ORDER BY cost_usd DESC, team
"""


def month_range(day: date) -> tuple[datetime, datetime]:
    """The UTC calendar month containing ``day``: [first instant, first instant of the next)."""
    start = datetime(day.year, day.month, 1, tzinfo=UTC)
    if day.month == 12:
        return start, start.replace(year=day.year + 1, month=1)
    return start, start.replace(month=day.month + 1)


async def monthly_spend(pool: asyncpg.Pool, month: date) -> list[TeamSpend]:
    """Each team's requests, errors, tokens and cost in the UTC month containing ``month``.

    Most expensive team first; teams without usage that month are absent.
    """
    rows: list[Any] = await pool.fetch(_MONTHLY_SPEND, *month_range(month))
    return [
        TeamSpend(
            team=row["team"],
            requests=row["requests"],
            errors=row["errors"],
            input_tokens=row["input_tokens"],
            output_tokens=row["output_tokens"],
            cost_usd=row["cost_usd"],
        )
        for row in rows
    ]
