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

from frontdoor.service import READY_TIMEOUT, FrontDoor
from queuegate.db import UNREACHABLE, database_unreachable
from queuegate.errors import ServiceUnavailable
from queuegate.redis_client import redis_unreachable
from queuegate.settings import Settings

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
held 60 s and more), naming the service that did not answer: both are asked (``readiness``)
in the wait's last ``READY_TIMEOUT`` seconds."""
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
            asking: asyncio.Future[dict[str, bool]] | None = None
            try:
                await asyncio.wait([serving], timeout=PAGE_WAIT - READY_TIMEOUT)
                if not serving.done():
                    # Which service is silent, asked while the page has its last seconds and
                    # read only if it is still not done: a page done meanwhile is answered at
                    # once, not held until both services answer (up to READY_TIMEOUT).
                    asking = asyncio.ensure_future(door.readiness())
                    await asyncio.wait([serving], timeout=READY_TIMEOUT)
                    if not serving.done():
                        serving.cancel()  # its reads let go in their own time
                        raise Unavailable(_silent(door.settings, await asking))
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
            finally:
                if asking is not None:
                    asking.cancel()  # its reads let go in their own time (``readiness``)

        return guarded


def _silent(settings: Settings, ready: dict[str, bool]) -> str:
    """The one line a page past ``PAGE_WAIT`` answers: which of PostgreSQL and Redis did not
    answer ``FrontDoor.readiness`` (``ready``), and what to do."""
    how = "check that it runs and answers"
    if ready["database"] and ready["redis"]:  # both answer: the page's own reads were slow
        return (
            f"the page's reads took over {PAGE_WAIT:g} s, though PostgreSQL and Redis answer: "
            "reload the page"
        )
    if ready["redis"]:
        return database_unreachable(settings, how=how)
    if ready["database"]:
        return redis_unreachable(settings, how)
    return f"PostgreSQL and Redis did not answer within {PAGE_WAIT:g} s: check that they run"
