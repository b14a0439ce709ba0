"""The dashboard's pages: Overview and Live (administrators), Team and Audit log (a team
sees its own; an administrator any), sign-in and sign-out. Batches: ``batches``.

Every number comes from the functions the command line and the admin API serve
(``admin.usage``, ``admin.audit``, ``admin.keys``, ``accounting.reports``,
``queuegate.status``); this module only arranges them on a page.
"""

from __future__ import annotations

import asyncio
import calendar
import dataclasses
import math
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, cast
from urllib.parse import urlencode

import aio_pika
from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import ValidationError
from redis.exceptions import RedisError

from accounting.reports import DaySpend, ModelSpend, TeamSpend, team_budgets
from admin.audit import AuditFilter, audit_page
from admin.keys import team_keys
from admin.status import registered
from admin.usage import TREND_DAYS, team_month, usage_rows
from frontdoor.auth import TeamDisabled
from frontdoor.dashboard import session as sessions
from frontdoor.dashboard.charts import NEAR, Bar, bars, columns
from frontdoor.dashboard.outage import RETRY_AFTER, Guarded, Unavailable
from frontdoor.dashboard.render import page
from frontdoor.dashboard.session import Session
from frontdoor.failed_keys import Throttled, client_of
from frontdoor.query_once import repeated
from frontdoor.service import Door, FrontDoor
from frontdoor.url_text import unstorable
from queuegate.errors import ConfigError, ServiceUnavailable, UnknownTeam
from queuegate.registry import TEAM_NAME, get_team
from queuegate.reporting import to_json
from queuegate.status import status_record

router = APIRouter(prefix="/dashboard", include_in_schema=False, route_class=Guarded)

Signed = Annotated[Session, Depends(sessions.current)]

AUDIT_PAGE = 50
RECENT_ERRORS = 10
TEAMS_CHARTED = 20
"""Teams the overview's budget chart draws, nearest their budget first: a hundred bars would
be too thin to read; the table below it lists every team."""


class Refused(Exception):
    """A page the session may not see (403), that does not exist (404), or whose team's
    stored config is invalid (409)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def storable_url(request: Request) -> None:
    """``frontdoor.url_text.storable_url``, answered as a page: a path naming nothing (a
    batch to cancel, a team) 404, a filter or cursor 400."""
    found = unstorable(request)
    if found is not None:
        status = 404 if found.where == "path" else 400
        raise Refused(status, f"No such page: {found}." if status == 404 else f"{found}.")


async def once_each(request: Request) -> None:
    """``frontdoor.query_once.once_each``, answered as a page: 400."""
    found = repeated(request)
    if found is not None:
        raise Refused(400, f"{found}.")


@router.get("/sign-in")
async def sign_in_form(request: Request, door: Door) -> Response:
    return await _sign_in_page(request, door)


@router.post("/sign-in")
async def sign_in(request: Request, door: Door) -> Response:
    form = await sessions.read_form(request)
    key, csrf = form.get("key", ""), form.get("csrf", "")
    form_id = request.cookies.get(sessions.SIGN_IN_COOKIE)
    if not sessions.same_token(await sessions.take_sign_in_token(door, form_id), csrf):
        return await _sign_in_page(
            request,
            door,
            status=403,
            error="The form was stale or did not come from this dashboard: sign in again.",
        )
    try:
        owner = await door.keys.owner(key.strip(), client_of(request))
    except Throttled as exc:
        request.app.state.held.unproven(request.scope)
        wait = math.ceil(exc.retry_after)
        refused = await _sign_in_page(
            request,
            door,
            status=429,
            error=f"Too many wrong keys from this address: try again in {wait} s.",
        )
        refused.headers["retry-after"] = str(wait)
        return refused
    except TeamDisabled as exc:
        request.app.state.held.unproven(request.scope)
        return await _sign_in_page(
            request,
            door,
            status=403,
            error=f"Team {exc.team} is disabled: ask an operator to enable it again.",
        )
    session = None if owner is None else await sessions.start(door, owner)
    if session is None:
        request.app.state.held.unproven(request.scope)
        return await _sign_in_page(
            request,
            door,
            status=401,
            error="That key is unknown or revoked, or its team is disabled.",
        )
    signed_in = RedirectResponse(_home(session), status_code=303)
    sessions.set_cookie(
        request, signed_in, sessions.COOKIE, session.session_id, sessions.SESSION_TTL
    )
    signed_in.delete_cookie(sessions.SIGN_IN_COOKIE, path="/dashboard")
    return signed_in


async def _sign_in_page(
    request: Request, door: FrontDoor, *, status: int = 200, error: str | None = None
) -> Response:
    """The sign-in form, bound to a pre-session (``session.sign_in_form``)."""
    form_id, token = await sessions.sign_in_form(door, request.cookies.get(sessions.SIGN_IN_COOKIE))
    response = page(
        "sign_in.html", status=status, title="Sign in", session=None, csrf=token, error=error
    )
    sessions.set_cookie(request, response, sessions.SIGN_IN_COOKIE, form_id, sessions.SIGN_IN_TTL)
    return response


@router.post("/sign-out")
async def sign_out(request: Request, door: Door, session: Signed) -> Response:
    await sessions.check_csrf(request, session)
    await sessions.end(door, session)
    response = RedirectResponse("/dashboard/sign-in", status_code=303)
    response.delete_cookie(sessions.COOKIE, path="/dashboard")
    return response


@router.get("")
async def overview(door: Door, session: Signed) -> Response:
    if not session.is_admin:
        return RedirectResponse(_home(session), status_code=303)
    today = datetime.now(UTC).date()
    month = today.replace(day=1)
    # Side by side on the pool's connections: each reads a month of every team's rollup.
    reports = await asyncio.gather(
        usage_rows(door.pool, "team", month=month),
        usage_rows(door.pool, "day", month=month, last_day=today),
        usage_rows(door.pool, "model", month=month),
        team_budgets(door.pool),
    )
    spent = cast(list[TeamSpend], reports[0])
    daily = cast(list[DaySpend], reports[1])
    per_model = cast(list[ModelSpend], reports[2])
    budgets = reports[3]
    rows = _team_rows(spent, budgets)
    models: defaultdict[str, Decimal] = defaultdict(Decimal)
    for m in per_model:
        models[m.model] += m.cost_usd
    total = TeamSpend(
        "all",
        sum(t.requests for t in spent),
        sum(t.errors for t in spent),
        sum(t.input_tokens for t in spent),
        sum(t.output_tokens for t in spent),
        sum((t.cost_usd for t in spent), Decimal(0)),
    )
    return page(
        "overview.html",
        title="Overview",
        session=session,
        month=month.strftime("%B %Y"),
        total=total,
        error_rate=100 * total.errors / total.requests if total.requests else 0.0,
        flagged=sum(1 for r in rows if r["tone"] != "ok"),
        teams=rows,
        charted=min(len(rows), TEAMS_CHARTED),
        team_chart=bars(
            [
                Bar(r["team"], float(r["cost_usd"]), _float(r["budget_usd"]))
                for r in rows[:TEAMS_CHARTED]
            ],
            unit="USD",
            label="Spend per team against its budget",
        ),
        daily_chart=columns(
            _by_day(daily, lambda d: float(d.cost_usd), today), unit="USD", label="Daily spend"
        ),
        requests_chart=columns(
            _by_day(daily, lambda d: d.requests, today), unit="jobs", label="Requests per day"
        ),
        model_chart=bars(
            [Bar(name, float(usd)) for name, usd in sorted(models.items(), key=lambda i: -i[1])],
            unit="USD",
            label="Spend by model",
        ),
    )


@router.get("/teams/{team}")
async def team_page(team: str, door: Door, session: Signed) -> Response:
    registered = await _readable(door, session, team)
    today = datetime.now(UTC).date()
    month = today.replace(day=1)
    report = await team_month(door.pool, team, month, today=today)
    keys = await team_keys(door.pool, team)
    errors = await audit_page(
        door.pool, AuditFilter(team=team, status="error"), limit=RECENT_ERRORS
    )
    projection = _projection(report.cost_usd, today)
    budget = report.budget_usd
    return page(
        "team.html",
        title=f"Team {team}",
        session=session,
        month=month.strftime("%B %Y"),
        report=report,
        projection=projection,
        projection_tone=_tone(projection, budget),
        limits=registered.config,
        keys=keys,
        entries=errors.entries,
        budget_chart=bars(
            [
                Bar("spent", float(report.cost_usd), _float(budget)),
                Bar("projected", float(projection), _float(budget)),
            ],
            unit="USD",
            label="Spend and projection against the budget",
        ),
        daily_chart=columns(
            _by_day(report.daily, lambda d: float(d.cost_usd), today),
            unit="USD",
            label="Daily spend",
        ),
        token_chart=bars(
            [Bar(m.model, m.input_tokens + m.output_tokens) for m in report.by_model],
            unit="tokens",
            label="Tokens by model",
        ),
    )


@router.get("/audit")
async def audit(
    request: Request,
    door: Door,
    session: Signed,
    *,
    team: str | None = None,
    model: str | None = None,
    status: str | None = None,
    pii: str | None = None,
    since: str | None = None,
    until: str | None = None,
    cursor: str | None = None,
) -> Response:
    if team and not session.may_read(team):
        raise Refused(403, "A team's session reads its own audit log only.")
    chosen: dict[str, Any] = {
        "team": (team or None) if session.is_admin else session.team,
        "model": model or None,
        "status": status or None,
        "pii": {"true": True, "false": False}.get(pii or ""),
        "since": since or None,
        "until": until or None,
    }
    error = None
    refused = 400
    entries: list[Any] = []
    next_url = None
    try:
        where = AuditFilter(**_parsed_filter(chosen))
        result = await audit_page(door.pool, where, limit=AUDIT_PAGE, cursor=cursor or None)
        entries = result.entries
        if result.next_cursor is not None:
            query = {k: v for k, v in request.query_params.items() if k != "cursor" and v}
            next_url = "/dashboard/audit?" + urlencode({**query, "cursor": result.next_cursor})
        chosen = dataclasses.asdict(where)
    except (ConfigError, ValidationError, ValueError) as exc:
        error = f"{exc}".splitlines()[0]
        if isinstance(exc, UnknownTeam):
            # As the Team page and the admin API answer a team that is not there.
            error, refused = f"No team named {exc.team}.", 404
        where = AuditFilter(team=chosen["team"])
    return page(
        "audit.html",
        status=refused if error else 200,
        title="Audit log",
        session=session,
        where=where,
        since=since or "",
        until=until or "",
        entries=entries,
        next_url=next_url,
        error=error,
    )


@router.get("/live")
async def live(session: Signed) -> Response:
    _admin_only(session)
    return page("live.html", title="Live", session=session)


@router.get("/live.json")
async def live_json(door: Door, session: Signed) -> Response:
    """What ``queuegate status`` shows, for the Live page's script: every deployment of the
    catalog, its breaker and pause as ``queuegate deployments`` reads them; ``stale`` with the
    reason when no worker reports or Redis or the broker cannot be read."""
    _admin_only(session)
    registry = await registered(door.pool, door.settings)
    try:
        reader = await door.status()
        status = await reader.read(
            registry.teams,
            registry.budgets,
            door.catalog.deployment_names,
            stale=registry.unread,
            accounted=registry.accounted,
            disabled=registry.disabled,
        )
    except (ServiceUnavailable, RedisError, OSError, aio_pika.exceptions.AMQPError) as exc:
        reason = str(exc) if isinstance(exc, ServiceUnavailable) else type(exc).__name__
        return _json({"stale": True, "reason": reason, "at": datetime.now(UTC)})
    return _json(status_record(status))


def install_handlers(app: Any) -> None:
    """How the dashboard answers a missing session, a bad CSRF token and a refused page."""

    async def to_sign_in(request: Request, exc: Exception) -> Response:
        if request.url.path.endswith(".json"):
            return _json({"stale": True, "reason": "signed out"}, status=401)
        return RedirectResponse("/dashboard/sign-in", status_code=303)

    async def bad_csrf(request: Request, exc: Exception) -> Response:
        return page(
            "message.html",
            status=403,
            title="Refused",
            session=None,
            message="The form was stale or did not come from this dashboard: reload the page "
            "and try again.",
        )

    async def unavailable(request: Request, exc: Exception) -> Response:
        # The Live page's script shows the reason as its stale mark.
        if request.url.path.endswith(".json"):
            answer = _json({"stale": True, "reason": str(exc), "at": datetime.now(UTC)}, 503)
        else:
            answer = page(
                "message.html",
                status=503,
                title="Unavailable",
                session=None,
                message=f"The dashboard cannot answer now. {exc}.",
            )
        answer.headers["retry-after"] = str(RETRY_AFTER)
        return answer

    async def refused(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Refused)
        title = "Not found" if exc.status == 404 else "Not allowed"
        return page("message.html", status=exc.status, title=title, session=None, message=str(exc))

    app.add_exception_handler(sessions.SignInNeeded, to_sign_in)
    app.add_exception_handler(sessions.BadCsrf, bad_csrf)
    app.add_exception_handler(Refused, refused)
    app.add_exception_handler(Unavailable, unavailable)


def _home(session: Session) -> str:
    return "/dashboard" if session.is_admin else f"/dashboard/teams/{session.team}"


def _admin_only(session: Session) -> None:
    if not session.is_admin:
        raise Refused(403, "This page is for administrators: your team's page is under Team.")


async def _readable(door: FrontDoor, session: Session, team: str) -> Any:
    """The registered team, when the session may read it: 403 for another team's session
    (whether that team exists or not), 404 for an administrator naming no team."""
    if not session.may_read(team):
        raise Refused(403, "A team's session reads its own team only.")
    if not TEAM_NAME.fullmatch(team):
        raise Refused(404, f"No team named {team}.")
    try:
        registered = await get_team(door.pool, team)
    except ConfigError as exc:
        # A row stored before its bounds existed: workers skip it (list_teams), and so does
        # this page, saying why instead of failing or calling the team missing.
        raise Refused(409, f"{exc}: correct it with queuegate teams set {team}.") from None
    if registered is None:
        raise Refused(404, f"No team named {team}.")
    return registered


def _team_rows(spent: list[TeamSpend], budgets: dict[str, Decimal]) -> list[dict[str, Any]]:
    """Each team with spend or a budget, its share of the budget and its tone, most used
    first."""
    by_team = {t.team: t for t in spent}
    rows = []
    for name in sorted(set(by_team) | set(budgets)):
        t = by_team.get(name) or TeamSpend(name, 0, 0, 0, 0, Decimal(0))
        budget = budgets.get(name)
        share = float(t.cost_usd / budget) if budget else None
        rows.append(
            {
                **vars(t),
                "budget_usd": budget,
                "used": "n/a"
                if share is None
                else f"{share:.1%}"
                if share < 0.1
                else f"{share:.0%}",
                "share": share if share is not None else -1.0,
                "tone": _tone(t.cost_usd, budget),
            }
        )
    return sorted(rows, key=lambda r: (-r["share"], -r["cost_usd"]))


def _tone(spend: Decimal, budget: Decimal | None) -> str:
    if budget is None:
        return "ok"
    if spend >= budget:
        return "over"
    return "near" if budget and spend / budget >= Decimal(str(NEAR)) else "ok"


def _projection(spent: Decimal, today: date) -> Decimal:
    """The month's spend if the rest of it goes as it went so far."""
    days = calendar.monthrange(today.year, today.month)[1]
    return (spent / today.day * days).quantize(Decimal("0.000001"))


def _by_day(days: list[DaySpend], value: Any, last_day: date) -> list[tuple[str, float]]:
    """One point for each of the ``TREND_DAYS`` days to ``last_day``, idle days at zero."""
    seen = {d.day: value(d) for d in days}
    span = [last_day - timedelta(days=n) for n in reversed(range(TREND_DAYS))]
    return [(day.strftime("%b %d"), seen.get(day, 0)) for day in span]


def _float(value: Decimal | None) -> float | None:
    return None if value is None else float(value)


def _parsed_filter(chosen: dict[str, Any]) -> dict[str, Any]:
    """The audit filter's fields as its types: times from the form's local ISO text (UTC)."""
    parsed = dict(chosen)
    for name in ("since", "until"):
        if parsed[name] is not None:
            moment = datetime.fromisoformat(parsed[name])
            parsed[name] = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    if parsed["status"] not in (None, "ok", "error"):
        raise ConfigError(f"status {parsed['status']!r}: choose ok or error")
    return parsed


def _json(data: Any, status: int = 200) -> Response:
    return Response(to_json(data), media_type="application/json", status_code=status)


__all__ = ["install_handlers", "router"]
