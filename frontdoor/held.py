"""How many requests a front-door process serves at once, per team and without a key.

A request holds its connection from its headers until its answer has left: a chat waiting
for its job, a long-poll of ``/v1/jobs/{id}``, a stream, or an answer its client does not
read. The connection cap (``frontdoor.connections``) closes idle connections only, so
without a bound on these one team, or keyless clients from many addresses, could hold every
connection and the process would answer everyone else 503.

``HeldRequests`` (an ASGI middleware) holds each request while the app serves it:

- a request to the APIs (``/v1/``, ``/admin/``) that presents a key, as one of that key's
  as presented, then, once the route has proven the key (``Held.prove``, from
  ``frontdoor.auth``), as one of its team's, all the team's keys together
  (``frontdoor.whose``): past ``per_team`` of either, 429 at once, before any body is read
  or job published. Counted per team, since a team may hold any number of keys; a key that
  is not live is answered 401 within milliseconds, so wrong keys hold nothing long. A
  connection that keeps requests pipelined always has one in progress, so a team past its
  share could hold connections with requests it is refused: ``Held.refuses`` tells
  ``frontdoor.connections`` which requests will be, and their connections are the first
  closed when the process needs room. Likewise a request whose key is refused (``auth``
  and the dashboard's sign-in call ``Held.unproven``): a connection pipelining wrong keys
  is never idle either, and goes next;
- any other request (``/healthz``, ``/metrics``, ``/openapi.json``, the dashboard), with a
  key or without, as one of the process's keyless ones: past ``keyless`` of them, from every
  address together, 429 at once with ``connection: close``, so that a client pipelining
  requests it never reads loses its connection. A dashboard page that presents a session
  cookie is that session's, and its team's once the session is proven (``Held.prove``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from frontdoor.auth import presented_key
from frontdoor.dashboard.session import COOKIE as SESSION_COOKIE
from frontdoor.errors import ApiError, ErrorShapes
from frontdoor.whose import Keyed, less, sharer, whose
from queuegate.settings import Settings

RETRY_AFTER = 1.0
"""Seconds a refused caller is told to wait: most requests take well under that."""
KEYED_PATHS = ("/v1/", "/admin/")
"""Where every route proves the key presented before it does anything else."""
PRESENTED = "key "
"""The prefix under which an API request counts until its key is proven."""
SESSION = "session "
"""The prefix under which a dashboard session's requests count until it is proven."""
PROVEN_KEPT = 10_000
"""Keys and sessions whose share ``Held.refuses`` remembers (a few MB at most)."""
SCOPE_KEY = "queuegate.held"
"""Where a request's ``Hold`` is kept in its ASGI scope."""
HOLDER_KEY = "queuegate.holder"
"""Where ``holder_of`` keeps whose a request is as presented, in its ASGI scope."""
ON_REFUSED = "queuegate.on_refused"
"""Where the server may put, in a request's ASGI scope, what to call when the request is
refused for a share (``frontdoor.connections`` marks its connection the first to close)."""
ON_UNPROVEN = "queuegate.on_unproven"
"""Where the server may put what to call when the request's key is refused
(``frontdoor.connections`` marks its connection among the first to close until a request of
it is served)."""


def holder_of(scope: Scope) -> str | None:
    """Whose an HTTP request is as presented: its key's, its dashboard session's, or None.

    Kept in the scope: the connection asks as the request starts (``Held.refuses``), then
    the middleware as it admits it, and the headers are read once."""
    if HOLDER_KEY not in scope:
        scope[HOLDER_KEY] = _presented_holder(Request(scope))
    holder: str | None = scope[HOLDER_KEY]
    return holder


def _presented_holder(request: Request) -> str | None:
    if request.scope["path"].startswith(KEYED_PATHS):
        key = presented_key(request)
        return None if key is None else f"{PRESENTED}{key}"
    # A signed-in person's pages count as their session's, as presented (an unknown one is
    # sent to sign in within milliseconds), so that keyless floods leave the people already
    # signed in served.
    session = request.cookies.get(SESSION_COOKIE)
    return f"{SESSION}{session}" if session else None


@dataclass
class Hold:
    """Whose one request is: a key as presented or a session (until proven), a team's or an
    administrator key's share once proven (``frontdoor.whose``), or None for a keyless one."""

    holder: str | None = None
    refused: bool = False
    """Refused 429 once proven, its team's share full."""
    unproven: bool = False
    """Refused for its key: none, unknown or revoked, its team disabled, or too many wrong
    keys from its address (``Held.unproven``)."""


class Held:
    """The requests this process serves: at most ``per_team`` of one team (or of one key
    until it is proven), at most ``keyless`` others."""

    def __init__(self, *, per_team: int, keyless: int) -> None:
        self._per_team = per_team
        self._keyless_cap = keyless
        self._keyless = 0
        self._keyed: Counter[str] = Counter()
        self._proven: dict[str, str] = {}
        """The share each key or session as presented was last proven to be, for ``refuses``;
        the ``PROVEN_KEPT`` proven last."""

    @classmethod
    def of(cls, settings: Settings) -> Held:
        return cls(per_team=settings.requests_per_team, keyless=settings.keyless_requests)

    def admit(self, holder: str | None) -> Hold:
        """A new request of ``holder`` (None: keyless) held; ApiError 429 when one too many."""
        if holder is not None:
            self._check(holder)
            self._keyed[holder] += 1
            return Hold(holder)
        if self._keyless >= self._keyless_cap:
            raise ApiError(
                "too_many_requests",
                "this front-door process serves as many requests without an API key as it "
                "may: retry shortly",
                retry_after_s=RETRY_AFTER,
            )
        self._keyless += 1
        return Hold()

    def refuses(self, scope: Scope) -> bool:
        """Whether the request of ``scope``, not yet admitted, would be refused now: its key's
        (or session's) share full, or the share it was last proven to be full."""
        holder = holder_of(scope)
        if holder is None:
            return self._keyless >= self._keyless_cap
        share = self._proven.get(holder)
        return self._keyed[holder] >= self._per_team or (
            share is not None and self._keyed[share] >= self._per_team
        )

    def prove(self, scope: Scope, caller: Keyed) -> None:
        """The request of ``scope`` is ``caller``'s from now, its key (or dashboard session)
        proven: it counts as one of its team's requests, all its keys together. ApiError 429
        when that team has ``per_team`` requests held already."""
        hold: Hold | None = scope.get(SCOPE_KEY)
        share = whose(caller)
        if hold is None or hold.holder == share:
            return
        if hold.holder is not None:
            self._proven.pop(hold.holder, None)
            self._proven[hold.holder] = share
            if len(self._proven) > PROVEN_KEPT:
                del self._proven[next(iter(self._proven))]
        try:
            self._check(share)
        except ApiError:
            hold.refused = True
            _tell_refused(scope)
            raise
        self.release(hold)
        hold.holder = share
        self._keyed[share] += 1

    @staticmethod
    def unproven(scope: Scope) -> None:
        """The request of ``scope`` is refused for the key it presented (or the dashboard's
        sign-in for the key typed): no share of anyone's, and its connection serves no one."""
        hold: Hold | None = scope.get(SCOPE_KEY)
        if hold is not None:
            hold.unproven = True
        told: Callable[[], None] | None = scope.get(ON_UNPROVEN)
        if told is not None:
            told()

    def release(self, hold: Hold) -> None:
        if hold.holder is None:
            self._keyless -= 1
            return
        less(self._keyed, hold.holder, 1)

    def _check(self, holder: str) -> None:
        if self._keyed[holder] < self._per_team:
            return
        whom, together = sharer(holder)
        raise ApiError(
            "too_many_requests",
            f"{whom} has {self._per_team} requests in progress at this front-door process "
            f"already{together}: send the next once one is answered",
            retry_after_s=RETRY_AFTER,
        )


def _tell_refused(scope: Scope) -> None:
    told: Callable[[], None] | None = scope.get(ON_REFUSED)
    if told is not None:
        told()


class HeldRequests:
    """Holds each HTTP request in ``held`` while the app serves it; answers 429 in the shape
    of the API called when it would be one too many."""

    def __init__(self, app: ASGIApp, *, held: Held, shapes: ErrorShapes) -> None:
        self._app = app
        self._held = held
        self._shapes = shapes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        holder = holder_of(scope)
        try:
            hold = self._held.admit(holder)
        except ApiError as error:
            _tell_refused(scope)
            answer = self._shapes.response(scope["path"], error)
            if holder is None:
                answer.headers["connection"] = "close"
            await answer(scope, receive, send)
            return
        scope[SCOPE_KEY] = hold
        try:
            await self._app(scope, receive, send)
        finally:
            self._held.release(hold)


__all__ = ["ON_REFUSED", "ON_UNPROVEN", "SCOPE_KEY", "Held", "HeldRequests", "Hold", "holder_of"]
