"""Who is calling: the team's API key, looked up by its hash, cached for a few seconds.

A caller presents the key as ``Authorization: Bearer <key>``, ``x-api-key: <key>`` (what
the Anthropic SDK sends) or ``X-Gateway-Key: <key>``. Any team may hold keys for HTTP,
whatever its identity for the broker. The key is kept only as its SHA-256 in ``api_keys``
(``queuegate.tenancy``); here it is hashed and its row found by that hash (a unique
index). Routes take the caller as a dependency::

    @router.post("/v1/things")
    async def things(caller: Annotated[Caller, Depends(require_caller)]) -> ...:
        caller.team, caller.key_id      # caller.api_key signs the team's jobs (never logged)

Answers (a team, or unknown) are cached ``security_cache_ttl`` seconds, like the workers'
copy: a revoked key is refused within that time, and PostgreSQL is asked at most once per
key per ttl. A key that is not shaped like one of ours is refused without a lookup.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import asyncpg
from fastapi import Request

from frontdoor.errors import ApiError
from queuegate.db import DB_ERRORS, is_unreachable, reconnect
from queuegate.errors import ServiceUnavailable
from queuegate.tenancy import api_key_id, api_key_owner, hash_api_key

KEY_CACHE_SIZE = 10_000
"""Keys whose answer is remembered; the oldest is forgotten past it (random keys cannot
grow the cache without end)."""


@dataclass(frozen=True)
class Caller:
    """A team proven by one of its live API keys."""

    team: str
    key_id: str
    api_key: str = field(repr=False)
    """What the front door signs the team's jobs with; never logged or stored."""


class KeyBook:
    """Live keys by their hash, from a copy at most ``ttl`` seconds old."""

    def __init__(self, pool: asyncpg.Pool, *, ttl: float) -> None:
        self._pool = pool
        self._ttl = ttl
        self._cache: OrderedDict[str, tuple[float, Caller | None]] = OrderedDict()

    async def caller(self, key: str) -> Caller | None:
        """The team whose live key ``key`` is; None when unknown or revoked."""
        if api_key_id(key) is None:
            return None
        key_hash = hash_api_key(key)
        now = time.monotonic()
        cached = self._cache.get(key_hash)
        if cached is not None and now - cached[0] <= self._ttl:
            return cached[1]
        try:
            owner = await api_key_owner(self._pool, key_hash)
        except DB_ERRORS as exc:
            if is_unreachable(exc):
                await reconnect(self._pool)
            raise ServiceUnavailable(
                f"the team registry (PostgreSQL) is unreachable ({type(exc).__name__}); "
                "retry shortly"
            ) from exc
        caller = None if owner is None else Caller(team=owner[0], key_id=owner[1], api_key=key)
        self._cache[key_hash] = (now, caller)
        self._cache.move_to_end(key_hash)
        if len(self._cache) > KEY_CACHE_SIZE:
            self._cache.popitem(last=False)
        return caller


def presented_key(request: Request) -> str | None:
    """The key in the request's headers, if any."""
    authorization = request.headers.get("authorization")
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    for header in ("x-api-key", "x-gateway-key"):
        value = request.headers.get(header)
        if value and value.strip():
            return value.strip()
    return None


async def require_caller(request: Request) -> Caller:
    """The calling team; 401 when no key, or no live key, was presented."""
    key = presented_key(request)
    if key is None:
        raise ApiError(
            "unauthorized",
            "no API key: send your team's key as Authorization: Bearer <key>, x-api-key or "
            "X-Gateway-Key",
        )
    keys: KeyBook = request.app.state.frontdoor.keys
    caller = await keys.caller(key)
    if caller is None:
        raise ApiError(
            "unauthorized", "the API key is unknown or revoked: ask an operator for a new one"
        )
    return caller


__all__ = ["Caller", "KeyBook", "presented_key", "require_caller"]
