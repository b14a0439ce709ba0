"""A query parameter read as one value is given once, checked once for every route.

Starlette keeps each value of a repeated query parameter, and FastAPI reads the last of them
into a parameter declared as one value: ``/admin/usage?team=a&team=b`` answered team b's
month, 200, as though ``a`` had not been asked for. So each router takes ``once_each`` as a
dependency, which runs before the route and refuses such a request 400 ``invalid_request``
naming the parameter, in the API's error shape::

    app.include_router(router, dependencies=[Depends(storable_url), Depends(once_each)])

Which parameters are read as one value comes from what the matched route declares, by
FastAPI's own rule (a ``list[str]`` parameter keeps every value, and may repeat): no route
lists its own. A parameter no route declares is left unread, repeated or not. The
dashboard's routes take ``repeated`` as their own dependency, answering in a page.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence, Set
from dataclasses import dataclass
from typing import Any, get_args, get_origin

from fastapi import Request
from fastapi.dependencies.utils import get_flat_params
from fastapi.params import Query
from fastapi.routing import APIRoute

from frontdoor.errors import ApiError


def single_valued(route: APIRoute) -> frozenset[str]:
    """The query parameters ``route`` reads one value of, its dependencies' included."""
    return frozenset(
        field.alias
        for field in get_flat_params(route.dependant)
        if isinstance(field.field_info, Query) and not _many(field.field_info.annotation)
    )


def _many(annotation: Any) -> bool:
    """Whether a parameter of this type keeps every value given (``list[str]``,
    ``list[str] | None``), as FastAPI reads a sequence from a repeated parameter."""
    origin = get_origin(annotation)
    if isinstance(origin, type) and issubclass(origin, (Sequence, Set)) and origin is not str:
        return True
    return any(_many(member) for member in get_args(annotation)) if origin is not None else False


@dataclass(frozen=True)
class Repeated:
    """A query parameter read as one value, given more than once."""

    name: str
    times: int

    def __str__(self) -> str:
        return f"{self.name} given {self.times} times: give it once"


def repeated(request: Request) -> Repeated | None:
    """The first query parameter the request's route reads one value of that it gives more
    than once."""
    route = request.scope.get("route")
    # No query string, nothing to read: the chat and messages routes take none.
    if not request.scope.get("query_string") or not isinstance(route, APIRoute):
        return None
    single = single_valued(route)
    counts = Counter(name for name, _ in request.query_params.multi_items())
    return next((Repeated(n, c) for n, c in counts.items() if c > 1 and n in single), None)


async def once_each(request: Request) -> None:
    """ApiError (in the API's shape) for a parameter ``repeated`` finds given twice."""
    found = repeated(request)
    if found is not None:
        raise ApiError("invalid_request", str(found), param=found.name)


__all__ = ["Repeated", "once_each", "repeated", "single_valued"]
