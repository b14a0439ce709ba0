"""``/healthz`` (the process answers), ``/readyz`` (broker, Redis and PostgreSQL reachable
from here) and ``/metrics`` (Prometheus: requests by route and status, and their latency, of
every front-door process sharing the port: ``queuegate.metrics``)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from frontdoor.service import Door
from queuegate.metrics import exposition

router = APIRouter(tags=["Health"])


@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Broker, Redis and PostgreSQL are reachable")
async def readyz(door: Door) -> JSONResponse:
    checks = await door.readiness()
    ready = all(checks.values())
    body = {"status": "ok" if ready else "unavailable", **checks}
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics of the front door (all its processes)")
async def metrics() -> Response:
    return Response(exposition(), media_type=CONTENT_TYPE_LATEST)
