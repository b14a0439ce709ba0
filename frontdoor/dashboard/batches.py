"""The dashboard's Batches page: the HTTP APIs' batches (OpenAI Batches and Anthropic Message
Batches) of the signed-in team, or of every team for an administrator, each with its
progress, counts, spend, pace and a Cancel button.

The numbers are the batch's own row (``frontdoor.batches.records``), which its runner keeps
up to date every second and the APIs answer with; a cancel goes through the one function
every cancel uses (``BatchRunner.cancel``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response

from frontdoor.batches import records
from frontdoor.batches.records import BatchRow
from frontdoor.dashboard import session as sessions
from frontdoor.dashboard.outage import Guarded
from frontdoor.dashboard.render import page
from frontdoor.dashboard.routes import Refused
from frontdoor.dashboard.session import Session
from frontdoor.service import Door

router = APIRouter(prefix="/dashboard", include_in_schema=False, route_class=Guarded)

Signed = Annotated[Session, Depends(sessions.current)]

SHOWN = 100
"""Batches listed, newest first."""
NOTABLE = ("expired", "cancelling", "cancelled")
"""Statuses marked on the page, short of a failure."""


@dataclass(frozen=True)
class Progress:
    """One batch as the page shows it."""

    row: BatchRow
    rate: float | None
    """Result lines written per second since it started; None before the first."""
    eta_s: float | None
    """Seconds left at that rate, while it runs."""

    @property
    def percent(self) -> int:
        return round(100 * self.row.written / self.row.total) if self.row.total else 0

    @property
    def tone(self) -> str:
        status = self.row.status
        return "over" if status == "failed" else "near" if status in NOTABLE else ""


def progress(row: BatchRow, now: datetime) -> Progress:
    """Its pace: lines written over the time since it started (until it ended)."""
    if row.in_progress_at is None or row.written == 0:
        return Progress(row, None, None)
    elapsed = ((row.ended_at or now) - row.in_progress_at).total_seconds()
    if elapsed <= 0:
        return Progress(row, None, None)
    rate = row.written / elapsed
    left = max(0, row.total - row.written)
    return Progress(row, rate, None if row.ended else left / rate)


def duration(seconds: float) -> str:
    """A time left as a person reads it: ``45 s``, ``3 min 20 s``, ``2 h 05 min``."""
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


@router.get("/batches")
async def batches(door: Door, session: Signed, canceled: str | None = None) -> Response:
    rows = await records.recent_batches(door.pool, session.team, limit=SHOWN)
    now = datetime.now(UTC)
    return page(
        "batches.html",
        title="Batches",
        session=session,
        batches=[progress(row, now) for row in rows],
        shown=SHOWN,
        # Said only of a batch on the page: the link cannot make the page say anything else.
        canceled=next((row.id for row in rows if row.id == canceled), None),
        duration=duration,
    )


@router.post("/batches/{batch_id}/cancel")
async def cancel(batch_id: str, request: Request, door: Door, session: Signed) -> Response:
    """Cancel a batch of the session's team (any team's, for an administrator)."""
    await sessions.check_csrf(request, session)
    row = await records.find_batch(door.pool, batch_id, session.team)
    if row is None:
        raise Refused(404, f"No batch {batch_id} of yours: the Batches page lists them.")
    await door.batch_runner.cancel(row.team, row.api, row.id)
    return RedirectResponse(f"/dashboard/batches?canceled={row.id}", status_code=303)


__all__ = ["router"]
