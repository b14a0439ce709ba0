"""The admin API: ``GET /admin/usage``, ``/admin/audit-log`` and ``/admin/teams``.

Each answer is the data of the ``admin`` function the command line renders (``team_month``,
``audit_page``, ``team_listing``) as JSON, the same JSON ``--json`` prints: money as
strings in plain notation (``"0.0000087"``), times in ISO 8601 (UTC). Errors are OpenAI's
shape.

Who reads what: a team's key reads its own team only (naming another team is 403, whether it
exists or not); an administrator's key (``qga_...``) reads any team, and the team list.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import Response

from admin.audit import AuditFilter, audit_page
from admin.keys import KeyOwner
from admin.teams import team_listing
from admin.usage import parse_month, team_month
from frontdoor.auth import Owner
from frontdoor.errors import ApiError
from frontdoor.service import Door
from queuegate.db import DB_ERRORS
from queuegate.errors import ConfigError, UnknownTeam
from queuegate.messages import JobStatus
from queuegate.reporting import to_json

router = APIRouter(prefix="/admin", tags=["Admin"])

Team = Annotated[
    str | None, Query(description="A team: an admin key's choice; a team key's own, if given.")
]
Model = Annotated[str | None, Query(description="Only jobs that requested this model alias.")]
Status = Annotated[JobStatus | None, Query(description="Only jobs that ended so: ok or error.")]


@router.get("/usage", summary="A team's month: totals, budget remaining, by model, daily trend")
async def usage(
    door: Door,
    owner: Owner,
    *,
    team: Team = None,
    month: Annotated[str | None, Query(description="YYYY-MM (UTC); this month when unset.")] = None,
    model: Model = None,
    status: Status = None,
) -> Response:
    name = _readable_team(owner, team)
    if name is None:
        raise ApiError(
            "invalid_request",
            "team: an admin key names the team whose usage it reads (GET /admin/teams lists them)",
        )
    with _answered():
        report = await team_month(
            door.pool,
            name,
            parse_month(month),
            today=datetime.now(UTC).date(),
            model=model,
            status=status,
        )
    return _json(dataclasses.asdict(report))


@router.get("/audit-log", summary="Finished jobs, newest first, a page at a time")
async def audit_log(
    door: Door,
    owner: Owner,
    *,
    limit: Annotated[int, Query(description="Rows on the page (1 to 1000).")] = 50,
    offset: Annotated[int, Query(description="Rows skipped first (to 10,000).")] = 0,
    cursor: Annotated[
        str | None, Query(description="Start after this row: a page's next_cursor.")
    ] = None,
    team: Team = None,
    model: Model = None,
    status: Status = None,
    pii: Annotated[
        bool | None, Query(description="Only jobs with (true) or without (false) PII found.")
    ] = None,
    since: Annotated[
        datetime | None, Query(description="Finished at or after (ISO 8601; UTC if no offset).")
    ] = None,
    until: Annotated[datetime | None, Query(description="Finished before.")] = None,
) -> Response:
    where = AuditFilter(_readable_team(owner, team), model, status, pii, since, until)
    with _answered():
        page = await audit_page(door.pool, where, limit=limit, offset=offset, cursor=cursor)
    return _json(dataclasses.asdict(page))


@router.get("/teams", summary="Every team: limits, budget, security settings (admin key)")
async def teams(door: Door, owner: Owner) -> Response:
    if not owner.is_admin:
        raise ApiError(
            "forbidden", "the team list is for admin keys: a team's key reads /admin/usage"
        )
    with _answered():
        listed = await team_listing(door.pool)
    return _json({"teams": [dataclasses.asdict(team) for team in listed]})


def _readable_team(owner: KeyOwner, team: str | None) -> str | None:
    """The team whose rows the caller reads: a team key its own, whatever it names (another
    team is refused alike whether it exists or not); an admin key the one it names, or every
    team (None)."""
    if owner.team is None:
        return team
    if team is not None and team != owner.team:
        raise ApiError(
            "forbidden",
            f"a team's key reads its own team only: leave team out or pass team={owner.team}",
        )
    return owner.team


@contextlib.contextmanager
def _answered() -> Iterator[None]:
    """What stops an admin function, answered: a team filter naming no team 404 (for every
    report alike), a bad cursor, limit, month or team name 400, PostgreSQL out of reach 503."""
    try:
        yield
    except UnknownTeam as exc:
        raise ApiError(
            "not_found", f"no team named {exc.team}: GET /admin/teams lists them"
        ) from exc
    except ConfigError as exc:
        raise ApiError("invalid_request", str(exc)) from exc
    except DB_ERRORS as exc:
        raise ApiError(
            "service_unavailable",
            f"the usage database (PostgreSQL) failed ({type(exc).__name__}): retry shortly",
        ) from exc


def _json(data: Any) -> Response:
    return Response(to_json(data), media_type="application/json")
