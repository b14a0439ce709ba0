"""Usage reports, read from the daily rollup ``usage_daily`` (migrations 0004 and 0008).

The rollup holds one row per UTC day, team, requested model and status, kept by a trigger on
``usage_log`` inserts, so a month's report reads a few hundred rows however many jobs ran.
``bench/reports.py`` measures every query here against 10 million usage rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg

from queuegate.messages import JobStatus
from queuegate.registry import MAX_BUDGET_USD


@dataclass(frozen=True)
class TeamSpend:
    """One team's usage in a period, and its monthly budget when the registry sets one."""

    team: str
    requests: int
    errors: int
    input_tokens: int
    output_tokens: int
    cost_usd: Decimal
    budget_usd: Decimal | None = None
    month_cost_usd: Decimal | None = field(default=None, metadata={"report": False})
    """The team's whole month of spend, when the row holds some of its jobs alone (of one
    model or status): what its budget is left of. No column of its own in a report."""

    @property
    def budget_remaining(self) -> Decimal | None:
        """The budget less all of the month's spend, whatever the row's filters keep."""
        if self.budget_usd is None:
            return None
        spent = self.cost_usd if self.month_cost_usd is None else self.month_cost_usd
        return self.budget_usd - spent


@dataclass(frozen=True)
class ModelSpend:
    """One team's usage of one requested model alias in a period."""

    team: str
    model: str
    requests: int
    errors: int
    input_tokens: int
    output_tokens: int
    cost_usd: Decimal


@dataclass(frozen=True)
class DaySpend:
    """All usage (or one team's) on one UTC day."""

    day: date
    requests: int
    errors: int
    input_tokens: int
    output_tokens: int
    cost_usd: Decimal


_SUMS = """
       sum(requests)::bigint AS requests,
       sum(errors)::bigint AS errors,
       sum(input_tokens)::bigint AS input_tokens,
       sum(output_tokens)::bigint AS output_tokens,
       sum(cost_usd) AS cost_usd"""

# A budget is read only when it is a number (older versions stored exponents, "1E+3") within
# the registry's bound (older versions had none: a 401-digit budget, infinite as a float,
# failed the dashboard), so a malformed config cannot fail a report; the exponent's three
# digits keep the cast in range. Workers skip such a row (``list_teams``): it holds no one.
_BUDGET = rf"""
CASE WHEN t.config->>'budget_usd' ~ '^[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]{{1,3}})?$'
     THEN CASE WHEN (t.config->>'budget_usd')::numeric <= {MAX_BUDGET_USD}
               THEN (t.config->>'budget_usd')::numeric END END"""


def _filters(first: int) -> str:
    """Parameters ``first`` to ``first + 2`` keep one team, requested model and status (NULL:
    all of them)."""
    team, model, status = first, first + 1, first + 2
    return (
        f"(${team}::text IS NULL OR d.team = ${team})"
        f" AND (${model}::text IS NULL OR d.model = ${model})"
        f" AND (${status}::text IS NULL OR d.status = ${status})"
    )


# Days are a half-open range, so no day falls between two months. $3 is the row limit (NULL:
# all), applied to the most expensive first. The budget is joined to each team's sums, not
# to its rollup rows: grouped by the team's config too, a month of 100 teams (36,000 rows)
# was sorted on disk, 300 ms of the query's 400.
MONTHLY_SPEND = f"""
SELECT s.*, {_BUDGET} AS budget_usd
FROM (
    SELECT d.team, {_SUMS}
    FROM usage_daily d
    WHERE d.day >= $1 AND d.day < $2 AND {_filters(4)}
    GROUP BY d.team
) s LEFT JOIN teams t ON t.name = s.team
ORDER BY s.cost_usd DESC, s.team
LIMIT $3
"""

MODEL_SPEND = f"""
SELECT d.team, d.model, {_SUMS}
FROM usage_daily d
WHERE d.day >= $1 AND d.day < $2 AND {_filters(4)}
GROUP BY d.team, d.model
ORDER BY cost_usd DESC, d.team, d.model
LIMIT $3
"""

DAILY_SPEND = f"""
SELECT d.day, {_SUMS}
FROM usage_daily d
WHERE d.day >= $1 AND d.day < $2 AND {_filters(3)}
GROUP BY d.day
ORDER BY d.day
"""

TEAM_BUDGETS = f"SELECT t.name, {_BUDGET} AS budget_usd FROM teams t"

# One sum per team, nothing joined: read at every refresh of ``queuegate status``.
MONTH_COSTS = """
SELECT d.team, sum(d.cost_usd) AS cost_usd
FROM usage_daily d
WHERE d.day >= $1 AND d.day < $2
GROUP BY d.team
"""


def month_range(day: date) -> tuple[datetime, datetime]:
    """The UTC calendar month containing ``day``: [first instant, first instant of the next)."""
    start = datetime(day.year, day.month, 1, tzinfo=UTC)
    if day.month == 12:
        return start, start.replace(year=day.year + 1, month=1)
    return start, start.replace(month=day.month + 1)


def _month_days(month: date) -> tuple[date, date]:
    start, end = month_range(month)
    return start.date(), end.date()


async def monthly_spend(
    pool: asyncpg.Pool,
    month: date,
    *,
    top: int | None = None,
    team: str | None = None,
    model: str | None = None,
    status: JobStatus | None = None,
) -> list[TeamSpend]:
    """Each team's requests, errors, tokens, cost and budget in the UTC month of ``month``.

    Most expensive team first (only the ``top`` ones when given); teams without usage that
    month are absent. With ``team``, that team's row alone; with ``model`` or ``status``, the
    usage of that requested model or of jobs that ended so, its budget remaining still of
    the whole month (``month_cost_usd``).
    """
    rows: list[Any] = await pool.fetch(MONTHLY_SPEND, *_month_days(month), top, team, model, status)
    spends = [TeamSpend(**dict(row)) for row in rows]
    if model is None and status is None:
        return spends
    # Before, a filtered row's budget remaining was its budget less the filtered spend: a
    # team nearly spent read as untouched in `queuegate usage --status error`.
    whole = await month_costs(pool, month)
    return [replace(s, month_cost_usd=whole.get(s.team, s.cost_usd)) for s in spends]


async def model_spend(
    pool: asyncpg.Pool,
    month: date,
    *,
    top: int | None = None,
    team: str | None = None,
    model: str | None = None,
    status: JobStatus | None = None,
) -> list[ModelSpend]:
    """Usage per team (or of ``team``) and requested model in the UTC month of ``month``, most
    expensive first; filtered as ``monthly_spend``."""
    rows: list[Any] = await pool.fetch(MODEL_SPEND, *_month_days(month), top, team, model, status)
    return [ModelSpend(**dict(row)) for row in rows]


async def daily_spend(
    pool: asyncpg.Pool,
    last_day: date,
    *,
    days: int = 30,
    team: str | None = None,
    model: str | None = None,
    status: JobStatus | None = None,
) -> list[DaySpend]:
    """Usage per UTC day over the ``days`` days ending with ``last_day``; idle days are absent.
    Filtered as ``monthly_spend``."""
    first = last_day - timedelta(days=days - 1)
    end = last_day + timedelta(days=1)
    rows: list[Any] = await pool.fetch(DAILY_SPEND, first, end, team, model, status)
    return [DaySpend(**dict(row)) for row in rows]


async def month_costs(pool: asyncpg.Pool, month: date) -> dict[str, Decimal]:
    """Each team's cost in the UTC month of ``month``, exactly as usage_log sums it (its
    trigger adds each insert to the rollup in the same transaction); teams without usage that
    month are absent. What ``queuegate status`` reads at every refresh: 13 ms (p50) for a
    month of 100 teams and 6 models, 37,200 rollup rows for 690,000 usage rows, against
    26 ms for ``monthly_spend``'s every sum and budget and 350 ms for usage_log summed
    directly (which grows with the rows; the rollup does not)."""
    rows: list[Any] = await pool.fetch(MONTH_COSTS, *_month_days(month))
    return {row["team"]: row["cost_usd"] for row in rows}


async def team_budgets(pool: asyncpg.Pool) -> dict[str, Decimal]:
    """Monthly budgets (USD) of the teams whose registry config sets ``budget_usd``."""
    rows: list[Any] = await pool.fetch(TEAM_BUDGETS)
    return {row["name"]: row["budget_usd"] for row in rows if row["budget_usd"] is not None}
