"""What ``queuegate status`` and the dashboard's Live page read of the registry, read once
for both: the enabled teams (each listed with its queue depth whether or not a worker
serves it), the disabled ones (listed while their queues hold jobs), their budgets and the
month's spend accounting wrote (the least status shows, as Redis may have lost its own
count), or why PostgreSQL could not be read (the status is then stale, its budgets unknown,
its spend Redis's, and it lists the teams live workers serve)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

import asyncpg

from accounting.reports import month_costs, team_budgets
from queuegate.db import UNREACHABLE, database_unreachable
from queuegate.errors import ServiceUnavailable
from queuegate.registry import list_teams
from queuegate.settings import Settings
from queuegate.status import Accounted
from queuegate.urls import redact_url
from queuegate.visible import visible

REGISTRY_WAIT = 2.0
"""Seconds a refresh gives PostgreSQL to answer, as it gives Redis each round trip
(queuegate.status.REDIS_WAIT): a hung server would otherwise hold every refresh."""


@dataclass(frozen=True)
class Registered:
    teams: list[str] | None = None
    """The enabled teams; None when the registry could not be read (or is not migrated)."""
    disabled: list[str] = field(default_factory=list)
    """The disabled teams: no worker serves them, and the jobs left in their queues wait."""
    budgets: dict[str, Decimal] = field(default_factory=dict)
    accounted: Accounted | None = None
    """The month's spend per team in usage_log; None when it was not read (as ``teams``)."""
    unread: str | None = None
    """Why PostgreSQL could not be read, in one line saying what to do; None when it was."""
    invalid: list[str] = field(default_factory=list)
    """Rows no worker serves, their name or config invalid (as shown: ``visible``)."""


UNREADABLE: tuple[type[Exception], ...] = (*UNREACHABLE, ServiceUnavailable)
"""What opening or reading the registry raises when PostgreSQL cannot be read
(``create_pool`` says why in a ServiceUnavailable; a REGISTRY_WAIT passed is a TimeoutError)."""


def unreadable(settings: Settings, exc: BaseException) -> str:
    """Why PostgreSQL could not be read, from what ``UNREADABLE`` was raised, in one line."""
    if isinstance(exc, TimeoutError):
        url = redact_url(settings.database_url)
        return f"PostgreSQL at {url} did not answer within {REGISTRY_WAIT:g} s: check that it runs"
    if isinstance(exc, ServiceUnavailable):  # its line already names the cause
        return str(exc)
    return database_unreachable(settings, exc)


async def registered(pool: asyncpg.Pool, settings: Settings) -> Registered:
    """The registry's teams, enabled and disabled, budgets and month's spend, or why they
    could not be read."""
    today = datetime.now(UTC).date()
    try:
        # A row workers cannot serve is left out, as they leave it out, and named apart;
        # ``teams show`` says what is wrong with it (logged here, it would repeat at every
        # refresh).
        invalid: list[str] = []
        async with asyncio.timeout(REGISTRY_WAIT):
            teams = await list_teams(pool, on_invalid=lambda name, _: invalid.append(visible(name)))
            budgets = await team_budgets(pool)
            spent = await month_costs(pool, today)
    except asyncpg.UndefinedTableError:  # not migrated yet: no team, no budget
        return Registered()
    except UNREADABLE as exc:
        return Registered(unread=unreadable(settings, exc))
    enabled = [team.name for team in teams if team.enabled]
    disabled = [team.name for team in teams if not team.enabled]
    accounted = Accounted(f"{today:%Y-%m}", spent)
    return Registered(enabled, disabled, budgets, accounted, invalid=invalid)
