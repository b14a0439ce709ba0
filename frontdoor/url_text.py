"""A request's URL as text PostgreSQL can hold, checked once for every route.

Path parameters (a file's, a batch's id) and query parameters (a list's cursor, a filter)
go into queries as text, and PostgreSQL's text holds no NUL: asyncpg refuses such a value
with an error of its own, which was a bare 500 and a traceback per request (retried by the
SDKs). So no route reads a URL holding one: each router takes ``storable_url`` as a
dependency (the dashboard's its own, answering in a page), which runs before the route::

    app.include_router(router, dependencies=[Depends(storable_url)])

A path parameter holding one names nothing any route can have (ids, names and aliases are
stored text or generated): 404 ``not_found``. A query parameter holding one is the caller's
mistake: 400 ``invalid_request`` naming it. A URL's percent-escapes are decoded as UTF-8
with replacement, so a lone surrogate, the other text PostgreSQL refuses, cannot arrive so;
a body's text is checked where it is parsed (``queuegate.messages.StoredText``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fastapi import Request

from frontdoor.errors import ApiError, shown
from queuegate.messages import storable_problem


@dataclass(frozen=True)
class Unstorable:
    """A URL parameter PostgreSQL cannot hold."""

    where: Literal["path", "query"]
    name: str
    value: str
    problem: str

    def __str__(self) -> str:
        return f"{self.name}: {self.problem}"


def unstorable(request: Request) -> Unstorable | None:
    """The first of the request's path and query parameters that PostgreSQL cannot hold."""
    for name, value in request.path_params.items():
        if isinstance(value, str) and (problem := storable_problem(value)) is not None:
            return Unstorable("path", name, value, problem)
    for name, value in request.query_params.multi_items():
        if (problem := storable_problem(value)) is not None:
            return Unstorable("query", name, value, problem)
    return None


async def storable_url(request: Request) -> None:
    """ApiError (in the API's shape) for a URL ``unstorable`` finds fault with."""
    found = unstorable(request)
    if found is None:
        return
    if found.where == "path":
        raise ApiError("not_found", f"no {found.name} {shown(found.value)!r}: {found.problem}")
    raise ApiError("invalid_request", str(found), param=found.name)


__all__ = ["Unstorable", "storable_url", "unstorable"]
