"""Who is calling: a team's API key or an administrator's, looked up by its hash, cached
for a few seconds.

A caller presents the key as ``Authorization: Bearer <key>``, ``x-api-key: <key>`` (what
the Anthropic SDK sends) or ``X-Gateway-Key: <key>``. Any team may hold keys for HTTP,
whatever its identity for the broker; administrators hold ``qga_`` keys. Whose a key is
comes from ``admin.keys.lookup_key`` (a team's live key while the team is enabled, or a live
administrator key), the one lookup the command line shares. Routes take the caller as a
dependency, as ``Calling`` or ``Owner``::

    @router.post("/v1/things")
    async def things(caller: Calling) -> ...:
        caller.team, caller.key_id      # caller.api_key signs the team's jobs (never logged)

    @router.get("/admin/things")
    async def admin_things(owner: Owner) -> ...:
        owner.team                      # None for an administrator: every team

Team routes refuse an administrator key (403): it acts for no team, so it can sign no job.
Once proven, the request counts as one of its team's in progress (``frontdoor.held``), all
the team's keys together, and is refused 429 past the team's share.
Answers (an owner, or unknown) are cached ``security_cache_ttl`` seconds, like the workers'
copy: a revoked key or a disabled team is refused within that time, and PostgreSQL is asked
at most once per key per ttl. A key that is not shaped like one of ours is refused without
a lookup. A client that presented ``failed_key_limit`` wrong keys is refused 429 for the rest
of the window (``frontdoor.failed_keys``), before any lookup, for every key but those found
live before: one attacker behind a shared address cannot lock its other teams out. A
disabled team's live key is refused as such (``TeamDisabled``) and is not a wrong key:
whoever holds it guessed nothing, and its answer is cached like any other, so repeating it
costs PostgreSQL nothing more.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import partial
from typing import Annotated

import asyncpg
from fastapi import Depends, Request

from admin.keys import DisabledTeamKey, KeyOwner, lookup_key
from frontdoor.errors import ApiError
from frontdoor.failed_keys import FailedKeys, Throttled, client_of
from queuegate.db import DB_ERRORS, is_unreachable, reconnect
from queuegate.errors import ServiceUnavailable
from queuegate.single_flight import SingleFlight
from queuegate.tenancy import hash_api_key, key_shape

KEY_CACHE_SIZE = 10_000
"""Keys whose answer is remembered; the oldest is forgotten past it (random keys cannot
grow the cache without end)."""


class TeamDisabled(Exception):
    """The key is a live key of ``team``, which is disabled."""

    def __init__(self, team: str) -> None:
        super().__init__(f"team {team} is disabled")
        self.team = team


@dataclass(frozen=True)
class Caller:
    """A team proven by one of its live API keys."""

    team: str
    key_id: str
    api_key: str = field(repr=False)
    """What the front door signs the team's jobs with; never logged or stored."""


KEY_WAIT = 5.0
"""Seconds a request waits for its key's row when the process's copy lacks it."""


class KeyBook:
    """Whose live keys are, by their hash, from a copy at most ``ttl`` seconds old; the wrong
    ones counted against the client that presented them (``failures``)."""

    def __init__(self, pool: asyncpg.Pool, failures: FailedKeys, *, ttl: float) -> None:
        self._pool = pool
        self._failures = failures
        self._ttl = ttl
        self._cache: OrderedDict[str, tuple[float, KeyOwner | DisabledTeamKey | None]] = (
            OrderedDict()
        )
        self._asking: SingleFlight[str, KeyOwner | DisabledTeamKey | None] = SingleFlight()

    async def owner(self, key: str, client: str) -> KeyOwner | None:
        """Whose live key ``key`` is; None when unknown or revoked (counted against
        ``client``). Throttled when ``client`` has presented too many wrong keys of late and
        ``key`` was never found live; TeamDisabled for a live key of a disabled team (not
        counted)."""
        key_hash = hash_api_key(key) if key_shape(key) is not None else None
        now = time.monotonic()
        cached = self._cache.get(key_hash) if key_hash is not None else None
        if cached is not None and now - cached[0] > self._ttl:
            cached = None
        if cached is not None and isinstance(cached[1], KeyOwner):
            return cached[1]  # a live key asks nothing of Redis
        async with self._failures.looking_up(client, key_hash):
            if key_hash is None:
                found = None  # not shaped like a key
            elif cached is not None:
                found = cached[1]  # known wrong, or its team disabled, within the ttl
            else:
                found = await self._lookup(key, key_hash, now)
            if found is None:
                await self._failures.failed(client, key_hash)
        if isinstance(found, DisabledTeamKey):
            raise TeamDisabled(found.team)
        return found

    async def _lookup(
        self, key: str, key_hash: str, now: float
    ) -> KeyOwner | DisabledTeamKey | None:
        """The key's row, asked for once however many requests present it at once (a live
        key's burst, or one wrong key sent many times, costs PostgreSQL one lookup); waited
        for ``KEY_WAIT`` at most (ServiceUnavailable: nothing published, retried)."""
        # Bounded: unbounded, a key not in the copy held its request for as long as
        # PostgreSQL hung (150 s seen, no answer). SingleFlight shields the lookup, so it runs
        # on for the requests after (its connection let go only once the server answers) and
        # its failure is retrieved there; this one is answered.
        try:
            async with asyncio.timeout(KEY_WAIT):
                return await self._asking(key_hash, partial(self._ask, key, key_hash, now))
        except TimeoutError as exc:
            # The lookup's own timeouts are ServiceUnavailable already (``_ask``).
            raise ServiceUnavailable(
                f"the team registry (PostgreSQL) did not answer within {KEY_WAIT:g} s; "
                "nothing was published: retry shortly"
            ) from exc

    async def _ask(self, key: str, key_hash: str, now: float) -> KeyOwner | DisabledTeamKey | None:
        try:
            owner = await lookup_key(self._pool, key)
        except DB_ERRORS as exc:
            if is_unreachable(exc):
                await reconnect(self._pool)
            raise ServiceUnavailable(
                f"the team registry (PostgreSQL) is unreachable ({type(exc).__name__}); "
                "retry shortly"
            ) from exc
        if isinstance(owner, KeyOwner):
            self._failures.proven(key_hash)  # once per lookup, however many asked for it
        self._cache[key_hash] = (now, owner)
        self._cache.move_to_end(key_hash)
        if len(self._cache) > KEY_CACHE_SIZE:
            self._cache.popitem(last=False)
        return owner


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


async def require_key_owner(request: Request) -> KeyOwner:
    """Whose live key the request presents, a team's or an administrator's; 401 when none."""
    owner, _ = await _presented_owner(request)
    return owner


async def require_caller(request: Request) -> Caller:
    """The calling team; 401 when no live key was presented, 403 for an administrator's."""
    owner, key = await _presented_owner(request)
    if owner.team is None:
        raise ApiError(
            "forbidden", "admin keys serve /admin only: call this route with a team's API key"
        )
    return Caller(team=owner.team, key_id=owner.key_id, api_key=key)


async def _presented_owner(request: Request) -> tuple[KeyOwner, str]:
    try:
        owner, key = await _owner_of(request)
    except ApiError:
        # Its connection is among the first closed when the process is full, whatever it
        # sends next: a client pipelining wrong keys is never idle, yet serves no one.
        request.app.state.held.unproven(request.scope)
        raise
    # The request is its team's from here, all the team's keys together (``frontdoor.held``):
    # 429 when the team has as many in progress as it may.
    request.app.state.held.prove(request.scope, owner)
    return owner, key


async def _owner_of(request: Request) -> tuple[KeyOwner, str]:
    key = presented_key(request)
    if key is None:
        raise ApiError(
            "unauthorized",
            "no API key: send your team's key as Authorization: Bearer <key>, x-api-key or "
            "X-Gateway-Key",
        )
    keys: KeyBook = request.app.state.frontdoor.keys
    try:
        owner = await keys.owner(key, client_of(request))
    except Throttled as exc:
        raise ApiError(
            "too_many_requests",
            "too many wrong API keys from this address: wait for Retry-After, then retry "
            "with a live key",
            retry_after_s=exc.retry_after,
        ) from exc
    except TeamDisabled as exc:
        raise ApiError(
            "unauthorized",
            f"the API key is live but its team is disabled: ask an operator to enable team "
            f"{exc.team} again (queuegate teams add {exc.team})",
        ) from exc
    if owner is None:
        raise ApiError(
            "unauthorized",
            "the API key is unknown or revoked, or its team is disabled: ask an operator for "
            "a new one",
        )
    return owner, key


Calling = Annotated[Caller, Depends(require_caller)]
"""A team route's parameter for its caller."""
Owner = Annotated[KeyOwner, Depends(require_key_owner)]
"""An admin route's parameter for whose key it was called with."""

__all__ = [
    "Caller",
    "Calling",
    "KeyBook",
    "Owner",
    "TeamDisabled",
    "presented_key",
    "require_caller",
    "require_key_owner",
]
