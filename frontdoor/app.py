"""The ASGI app of the HTTP front door: ``create_app(settings)``, served by uvicorn.

Its lifespan opens this process's ``FrontDoor`` (broker bridge, API keys, outcomes,
catalog) and closes it on shutdown. Every route family is an ``APIRouter`` in
``frontdoor/routes/``, mounted here; errors are answered in the shape of the API called
(``frontdoor.errors``); each answer is counted in ``/metrics`` by route template and status,
and carries an ``x-request-id``.
OpenAPI docs are at ``/docs``.

To add an API family: write ``frontdoor/routes/<family>.py`` with its ``router``, include it
in ``ROUTERS`` (each is mounted behind ``frontdoor.url_text.storable_url``: no route reads a
URL PostgreSQL could not hold; and ``frontdoor.query_once.once_each``: none reads the last of
a parameter given twice as if alone), and register its error shape
(``app.state.error_shapes.register(prefix, shape)``) when it is not OpenAI's. Routes take
``caller: Calling`` (``frontdoor.auth``: the proven team) and ``door: Door``
(``frontdoor.service``: the process's services), build a ``ChatJob``, and run it with
``frontdoor.calls`` (``run_job``, ``open_stream``, ``publish_job``). The admin routes take
``owner: Owner`` instead (a team, or an administrator) and serve ``admin``'s reports.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from frontdoor.answers import TRACE_HEADER, note_arrival, request_id
from frontdoor.dashboard import install as install_dashboard
from frontdoor.errors import UnexpectedErrors, install_error_handlers
from frontdoor.held import Held, HeldRequests
from frontdoor.query_once import once_each
from frontdoor.routes import (
    admin,
    anthropic,
    batches,
    files,
    health,
    jobs,
    message_batches,
    openai,
)
from frontdoor.service import FrontDoor
from frontdoor.url_text import storable_url
from queuegate import tracing
from queuegate.api_errors import anthropic_error
from queuegate.metrics import observe_http
from queuegate.settings import Settings
from router import Catalog, load_catalog

ROUTERS = (
    openai.router,
    anthropic.router,
    files.router,
    batches.router,
    message_batches.router,
    jobs.router,
    admin.router,
    health.router,
)


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
        summary=(
            "The HTTP front door of a queue-based LLM gateway: OpenAI's and Anthropic's APIs "
            "over team queues."
        ),
        version="1",
        lifespan=lifespan,
    )
    # The multipart parser logs a warning for each malformed upload, which its client is
    # answered 400 for already (``frontdoor.batches.upload``): any client could flood the
    # log with them. Its errors (a spool file it cannot open) are the process's own, kept.
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
    shapes = install_error_handlers(app)
    # /v1/messages/batches lies under this prefix: Anthropic's shape for both.
    shapes.register(anthropic.PREFIX, anthropic_error)
    for router in ROUTERS:
        # A URL PostgreSQL could not hold, or repeating a parameter read as one value, is
        # answered before any route reads it
        app.include_router(router, dependencies=[Depends(storable_url), Depends(once_each)])
    install_dashboard(app)

    app.state.held = held = Held.of(settings)
    app.add_middleware(HeldRequests, held=held, shapes=shapes)
    # Inside RequestMetrics: an unexpected failure's answer is counted and has its ids too.
    app.add_middleware(UnexpectedErrors, shapes=shapes)
    app.add_middleware(RequestMetrics)
    app.add_middleware(TraceRequests)
    return app


class RequestMetrics:
    """Notes when each request arrived (``frontdoor.answers.note_arrival``), counts each
    answer by route template and status when its first byte leaves, and gives every answer an
    ``x-request-id``, errors included (``frontdoor.answers.request_id``), and the same id as
    ``request-id`` (Anthropic's name). A plain ASGI middleware: Starlette's
    ``BaseHTTPMiddleware`` would buffer every request through an extra task."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        note_arrival(scope)
        started = time.perf_counter()

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                # The router has put the matched route in the scope by now.
                route = getattr(scope.get("route"), "path", "unmatched")
                observe_http(route, message["status"], time.perf_counter() - started)
                headers = MutableHeaders(scope=message)
                if "x-request-id" not in headers:
                    headers["x-request-id"] = request_id(scope)
                # Anthropic's SDK reads the id from ``request-id`` (message._request_id).
                headers["request-id"] = headers["x-request-id"]
            await send(message)

        await self._app(scope, receive, counted)


class TraceRequests:
    """When tracing, each request in a span of its own (``<method> <route>``, kind SERVER),
    current while the route runs: the job the route publishes carries the trace on to the
    worker. The span starts the gateway's own trace, linked to the caller's span when its
    ``traceparent`` header names one (its child only with ``heed_callers``). An answer that
    names no trace of its job's names this one in ``TRACE_HEADER``: a stream's headers and a
    202 leave before the job's result (and its trace id) exists."""

    TRACE_HEADERS = frozenset(name.encode() for name in tracing.HEADERS)

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not tracing.ON:
            await self._app(scope, receive, send)
            return
        method = scope["method"]
        carried = {k.decode(): v for k, v in scope["headers"] if k in self.TRACE_HEADERS}
        attributes = {"http.request.method": method, "url.path": scope["path"]}
        parent, links = tracing.caller(carried)
        with tracing.span(
            method, kind="SERVER", parent=parent, links=links, attributes=attributes
        ) as span:
            # Sampled or not, the span has the trace id the job continues
            trace_id = format(span.get_span_context().trace_id, "032x")

            async def answered(message: Message) -> None:
                if message["type"] == "http.response.start":
                    MutableHeaders(scope=message).setdefault(TRACE_HEADER, trace_id)
                    route = getattr(scope.get("route"), "path", None)
                    if route is not None:
                        span.update_name(f"{method} {route}")
                        span.set_attribute("http.route", route)
                    status = message["status"]
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        tracing.errored(span, str(status), f"answered {status}")
                await send(message)

            await self._app(scope, receive, answered)


__all__ = ["create_app"]
