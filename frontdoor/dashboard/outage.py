"""What the dashboard answers while Redis or PostgreSQL cannot be read: a 503 page naming
which one (the Live page's data: a stale payload with the reason), within ``WAIT`` seconds,
not a 500 or a wait as long as the outage.

Sessions read Redis and PostgreSQL on every request (``session``), bounded by ``bounded``;
``Guarded`` routes turn an outage met later, in a page's own reads, into the same answer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from redis.exceptions import RedisError

from frontdoor.service import FrontDoor
from queuegate.db import UNREACHABLE, database_unreachable
from queuegate.errors import ServiceUnavailable
from queuegate.redis_client import redis_unreachable

OUTAGE: tuple[type[Exception], ...] = (RedisError, *UNREACHABLE)
"""A read of Redis or PostgreSQL that could not reach its service."""
WAIT = 2.0
"""Seconds a session's read of Redis or PostgreSQL may take before the page says the service
is unavailable: a hung server (stopped, partitioned) would otherwise hold the page until the
client gives up."""
PAGE_WAIT = 5.0
"""Seconds a page's own reads may take (a session read already done within ``WAIT``):
the overview sums a month of every team's rollup, tens of milliseconds on a healthy server.
Past it the page answers 503 without waiting for the reads to let go of their connections,
which a hung PostgreSQL holds until it answers (the overview and the Live page's data were
held 60 s and more)."""
RETRY_AFTER = 5
"""Seconds a 503 asks the browser to wait before trying again."""


class Unavailable(Exception):
    """Redis or PostgreSQL cannot be read now: the dashboard answers 503 with this reason."""


@contextlib.asynccontextmanager
async def bounded(reason: str) -> AsyncIterator[None]:
    """Unavailable(``reason``) when the reads inside fail to reach their service or take more
    than ``WAIT`` seconds."""
    try:
        async with asyncio.timeout(WAIT):
            yield
    except OUTAGE as exc:
        raise Unavailable(reason) from exc


class Guarded(APIRoute):
    """A dashboard route whose outage errors, met anywhere in it, answer as ``Unavailable``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            door: FrontDoor = request.app.state.frontdoor
            serving = asyncio.ensure_future(handler(request))
            try:
                await asyncio.wait([serving], timeout=PAGE_WAIT)
                if not serving.done():
                    serving.cancel()  # its reads let go in their own time
                    raise Unavailable(
                        f"PostgreSQL or Redis did not answer within {PAGE_WAIT:g} s: check "
                        "that they run"
                    )
                return serving.result()
            except asyncio.CancelledError:
                serving.cancel()
                raise
            except RedisError as exc:
                raise Unavailable(redis_unreachable(door.settings, cause=exc)) from exc
            except UNREACHABLE as exc:
                raise Unavailable(database_unreachable(door.settings)) from exc
            except ServiceUnavailable as exc:
                raise Unavailable(str(exc)) from exc

        return guarded
