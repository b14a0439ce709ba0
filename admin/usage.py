"""Usage reports: the rows of ``queuegate usage`` and a team's month (``GET /admin/usage``).

Both read the daily rollup through ``accounting.reports``, so they stay fast however many
usage rows there are; money is Decimal, as stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Literal

import asyncpg

from accounting.reports import (
    DaySpend,
    ModelSpend,
    TeamSpend,
    daily_spend,
    model_spend,
    month_costs,
    month_range,
    monthly_spend,
    team_budgets,
)
from admin.filters import known_team, plain_text
from queuegate.errors import ConfigError
from queuegate.messages import JobStatus
from queuegate.visible import clipped

Grouping = Literal["team", "model", "day"]

TREND_DAYS = 30


@dataclass(frozen=True)
class UsageFilter:
    """What a report keeps: one team, one requested model alias, jobs of one status (None:
    all)."""

    team: str | None = None
    model: str | None = None
    status: JobStatus | None = None


def parse_month(text: str | None) -> date:
    """``YYYY-MM`` as its first day; this UTC month when None. ConfigError for another text,
    and for 9999-12, whose end (the next month's start) no date holds."""
    if text is None:
        return datetime.now(UTC).date().replace(day=1)
    try:
        first = datetime.strptime(text, "%Y-%m").date()
    except ValueError:
        raise ConfigError(f"{clipped(text)!r} is not a month: use YYYY-MM") from None
    if first.year == date.max.year and first.month == 12:
        raise ConfigError(f"month {text} is out of range: the last is {date.max.year}-11")
    return first


def month_end(month: date) -> date:
    """The last UTC day of the month of ``month``."""
    return month_range(month)[1].date() - timedelta(days=1)


async def usage_rows(
    pool: asyncpg.Pool,
    by: Grouping,
    *,
    month: date,
    last_day: date | None = None,
    days: int = TREND_DAYS,
    where: UsageFilter = UsageFilter(),
    top: int | None = None,
) -> list[TeamSpend] | list[ModelSpend] | list[DaySpend]:
    """Usage in the UTC month of ``month`` per team (budget included) or per team and model,
    most expensive first (the ``top`` ones only, when given); or per day over the ``days``
    days ending with ``last_day`` (the month's last day by default), idle days absent.
    UnknownTeam when ``where`` names a team that is not registered, as every report says."""
    team, model = plain_text("team", where.team), plain_text("model", where.model)
    if team is not None:
        await known_team(pool, team)
    status = where.status
    if by == "day":
        end = last_day or month_end(month)
        return await daily_spend(pool, end, days=days, team=team, model=model, status=status)
    if by == "model":
        return await model_spend(pool, month, top=top, team=team, model=model, status=status)
    return await monthly_spend(pool, month, top=top, team=team, model=model, status=status)


@dataclass(frozen=True)
class TeamMonth:
    """A team's usage in one UTC month, with its budget, per model and per day."""

    team: str
    month: date
    """The month's first day."""
    requests: int
    errors: int
    input_tokens: int
    output_tokens: int
    cost_usd: Decimal
    budget_usd: Decimal | None
    budget_remaining: Decimal | None
    """The budget less all of the month's spend, whatever the filters keep."""
    by_model: list[ModelSpend]
    daily: list[DaySpend]
    """The ``TREND_DAYS`` days to the month's last day (to ``today`` in the current month);
    idle days are absent."""


async def team_month(
    pool: asyncpg.Pool,
    team: str,
    month: date,
    *,
    today: date,
    model: str | None = None,
    status: JobStatus | None = None,
    days: int = TREND_DAYS,
) -> TeamMonth:
    """The team's month: totals, budget remaining, usage per model and the daily trend, of the
    jobs ``model`` and ``status`` keep (all when None). UnknownTeam for an unknown team."""
    await known_team(pool, team)
    plain_text("model", model)
    first = month.replace(day=1)
    [totals] = await monthly_spend(pool, first, team=team, model=model, status=status) or [
        TeamSpend(team, 0, 0, 0, 0, Decimal(0))
    ]
    budget = (await team_budgets(pool)).get(team)
    spent = totals.cost_usd
    if model is not None or status is not None:
        spent = (await month_costs(pool, first)).get(team, Decimal(0))
    by_model = await model_spend(pool, first, team=team, model=model, status=status)
    last_day = min(month_end(first), today)
    daily = await daily_spend(pool, last_day, days=days, team=team, model=model, status=status)
    return TeamMonth(
        team=team,
        month=first,
        requests=totals.requests,
        errors=totals.errors,
        input_tokens=totals.input_tokens,
        output_tokens=totals.output_tokens,
        cost_usd=totals.cost_usd,
        budget_usd=budget,
        budget_remaining=None if budget is None else budget - spent,
        by_model=by_model,
        daily=daily,
    )
