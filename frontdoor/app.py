"""The ASGI app of the HTTP front door: ``create_app(settings)``, served by uvicorn.

Its lifespan opens this process's ``FrontDoor`` (broker bridge, API keys, outcomes,
catalog) and closes it on shutdown. Every route family is an ``APIRouter`` in
``frontdoor/routes/``, mounted here; errors are answered in the shape of the API called
(``frontdoor.errors``); each answer is counted in ``/metrics`` by route template and status.
OpenAPI docs are at ``/docs``.

To add an API family: write ``frontdoor/routes/<family>.py`` with its ``router``, include it
in ``ROUTERS``, and register its error shape (``app.state.error_shapes.register(prefix,
shape)``) when it is not OpenAI's. Routes take ``Depends(require_caller)`` (the proven team)
and ``Depends(frontdoor)`` (the process's services), build a ``ChatJob``, and run it with
``frontdoor.calls`` (``run_job``, ``open_stream``, ``publish_job``).
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from starlette.routing import Match

from frontdoor.errors import install_error_handlers
from frontdoor.routes import health, jobs, openai
from frontdoor.service import FrontDoor
from queuegate.metrics import observe_http
from queuegate.settings import Settings
from router import Catalog, load_catalog

ROUTERS = (openai.router, jobs.router, health.router)


def create_app(settings: Settings, *, catalog: Catalog | None = None) -> FastAPI:
    """The app of one front-door process; ``catalog`` defaults to ``settings.catalog``."""
    served = catalog if catalog is not None else load_catalog(settings.catalog, os.environ)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with FrontDoor(settings, served) as door:
            app.state.frontdoor = door
            yield

    app = FastAPI(
        title="queuegate",
        summary="The HTTP front door of a queue-based LLM gateway: OpenAI's API over team queues.",
        version="1",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)

    @app.middleware("http")
    async def count(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        observe_http(_route(request), response.status_code, time.perf_counter() - started)
        return response

    return app


def _route(request: Request) -> str:
    """The template of the route that served the request: a bounded label, never a raw path."""
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match == Match.FULL:
            return str(getattr(route, "path", "other"))
    return "unmatched"


__all__ = ["create_app"]
