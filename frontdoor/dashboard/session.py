"""Dashboard sign-ins: a random session id in a cookie, the session itself in Redis.

A person pastes a key into the sign-in form; the key is checked (``KeyBook``) and
forgotten. The session holds whose key it was (team, or none for an administrator), the
key's id, a CSRF token and, for a team, the generation of its sessions, and expires
``SESSION_TTL`` seconds after sign-in; each request also finds the key still live (one
lookup by its id), so revoking it, or disabling its team, ends its sessions at once.

Enabling a disabled team again must bring none of them back, not even one whose sign-in
raced the disable (``KeyBook``'s copy of the key may be seconds old): a team's session
takes the team's current generation, then finds the key live in PostgreSQL itself, then is
stored; disabling the team draws a new generation once it is disabled
(``admin.teams.disable_and_sign_out``), and a session whose generation is not the current
one is dead. Either the sign-in found the team disabled, or it took its generation before
the disable drew the new one.

The cookie is HttpOnly (no script reads it), SameSite=Strict (no other site's page sends
it) and Secure when the page was served over TLS. Every POST carries the session's CSRF
token in a form field, compared in constant time.

The sign-in form, posted before any session exists, is bound the same way to a pre-session:
the form's id in a cookie, its CSRF token in Redis for ``SIGN_IN_TTL`` seconds, taken (and
forgotten) by the one post that may use it. A cookie planted by another site (a sibling
domain can set one) names no form this dashboard handed out, whatever token comes with it.

A form's body is read as an API's is (``read_form``), in size, in time and in number at once:
a signed-in session's as one of its key's bodies, its bytes its team's; the sign-in's, which
comes before any key is known, per client address and as one of the process's few keyless
bodies (``Bodies.read_keyless``), so that a slow one costs no more than its own connection,
for no longer than ``http_body_timeout``, and slow ones from many addresses never hold the
connections the APIs' callers need.

Each read of Redis or PostgreSQL here is bounded (``outage.bounded``): with either away the
person is shown which one, within seconds.
"""

from __future__ import annotations

import contextlib
import hmac
import secrets
import time
from dataclasses import dataclass
from urllib.parse import parse_qsl

import redis.asyncio as aioredis
from fastapi import Request
from fastapi.responses import Response

from admin.keys import DASHBOARD_SESSION_TTL, KeyOwner, dashboard_generation, live_key_owner
from frontdoor.dashboard.outage import bounded
from frontdoor.failed_keys import client_of
from frontdoor.service import FrontDoor
from queuegate.db import database_unreachable
from queuegate.keys import Keys
from queuegate.redis_client import redis_unreachable, text

COOKIE = "queuegate_session"
SIGN_IN_COOKIE = "queuegate_sign_in"
"""The id of the sign-in form handed out; its CSRF token stays in Redis."""
SIGN_IN_TTL = 20 * 60
"""Seconds a sign-in form may wait to be posted; a later post is shown a fresh form."""
SESSION_TTL = DASHBOARD_SESSION_TTL
SESSIONS_PER_KEY = 20
"""Sessions one key may hold at once; signing in again ends its oldest. Without a bound a
team could fill the shared Redis with sessions by signing in in a loop."""


@dataclass(frozen=True)
class Session:
    session_id: str
    team: str | None
    """None for an administrator: every team."""
    key_id: str
    csrf: str
    generation: str = ""
    """The team's generation of sessions it was made in (``admin.keys.dashboard_generation``);
    empty for an administrator's."""

    @property
    def is_admin(self) -> bool:
        return self.team is None

    def may_read(self, team: str) -> bool:
        return self.team is None or self.team == team


class SignInNeeded(Exception):
    """The request has no live session: the person is sent to the sign-in page."""


class BadCsrf(Exception):
    """A POST without its session's CSRF token."""


async def start(door: FrontDoor, owner: KeyOwner) -> Session | None:
    """A new session of the key's owner; None when the key is no longer live (revoked, or
    its team disabled, since ``KeyBook`` read it). Past ``SESSIONS_PER_KEY``, the key's
    oldest session ends."""
    generation = ""
    if owner.team is not None:
        # Taken before the key is found live: see the module's docstring.
        async with _redis(door):
            generation = await dashboard_generation(door.redis, _keys(door), owner.team)
    async with bounded(database_unreachable(door.settings)):
        live = await live_key_owner(door.pool, owner.key_id)
    if live is None or live.team != owner.team:
        return None
    session = Session(secrets.token_urlsafe(32), owner.team, owner.key_id, new_token(), generation)
    key = _key(door, session.session_id)
    opened = _keys(door).dashboard_sessions(owner.key_id)
    async with _redis(door), door.redis.pipeline(transaction=True) as pipe:
        pipe.hset(
            key,
            mapping={
                "team": owner.team or "",
                "key_id": owner.key_id,
                "csrf": session.csrf,
                "generation": generation,
            },
        )
        pipe.expire(key, SESSION_TTL)
        pipe.zadd(opened, {session.session_id: time.time()})
        pipe.expire(opened, SESSION_TTL)
        pipe.zrange(opened, 0, -(SESSIONS_PER_KEY + 1))
        *_, oldest = await pipe.execute()
    if oldest:
        ids = [text(old) for old in oldest]
        async with _redis(door), door.redis.pipeline(transaction=True) as pipe:
            pipe.delete(*(_key(door, old) for old in ids))
            pipe.zrem(opened, *ids)
            await pipe.execute()
    return session


async def end(door: FrontDoor, session: Session) -> None:
    async with _redis(door), door.redis.pipeline(transaction=True) as pipe:
        pipe.delete(_key(door, session.session_id))
        pipe.zrem(_keys(door).dashboard_sessions(session.key_id), session.session_id)
        await pipe.execute()


async def current(request: Request) -> Session:
    """The request's live session; SignInNeeded when there is none, its key was revoked or
    its team disabled; Unavailable when Redis or PostgreSQL cannot tell."""
    door: FrontDoor = request.app.state.frontdoor
    session_id = request.cookies.get(COOKIE)
    if not session_id:
        raise SignInNeeded
    async with _redis(door):
        session = await _load(door.redis, _key(door, session_id), session_id)
        if session is not None and session.team is not None:
            generation = await door.redis.get(_keys(door).dashboard_generation(session.team))
            if generation is None or text(generation) != session.generation:
                session = None
    if session is None:
        raise SignInNeeded
    async with bounded(database_unreachable(door.settings)):
        live = await _key_live(door, session)
    if not live:
        raise SignInNeeded
    # A signed-in page, or its live view, is its team's request from here (``frontdoor.held``).
    request.app.state.held.prove(request.scope, session)
    return session


FORM_BYTES = 16 * 1024
"""A dashboard form's body at most: a key and a token are a few hundred bytes."""


async def read_form(request: Request, session: Session | None = None) -> dict[str, str]:
    """The fields of the form posted (URL-encoded), read through the process's ``Bodies``:
    as one of ``session``'s bodies, or, with no session yet (the sign-in), as a keyless
    body of its client's address. 408, 413 or 429 as an API's."""
    door: FrontDoor = request.app.state.frontdoor
    if session is None:
        raw = await door.bodies.read_keyless(request, client_of(request), limit=FORM_BYTES)
    else:
        raw = await door.bodies.read(request, session, limit=FORM_BYTES)
    return dict(parse_qsl(raw.decode(errors="replace")))


async def check_csrf(request: Request, session: Session) -> None:
    """BadCsrf unless the form posted carries the session's token."""
    form = await read_form(request, session)
    token = form.get("csrf")
    if not isinstance(token, str) or not same_token(session.csrf, token):
        raise BadCsrf


async def sign_in_form(door: FrontDoor, form_id: str | None) -> tuple[str, str]:
    """The id and CSRF token of a sign-in form: the one ``form_id`` names while it waits to
    be posted (a reload hands out no second one), else a new one."""
    async with _redis(door):
        if form_id:
            token = await door.redis.get(_keys(door).dashboard_sign_in(form_id))
            if token is not None:
                return form_id, text(token)
        form_id, token = secrets.token_urlsafe(32), new_token()
        await door.redis.set(_keys(door).dashboard_sign_in(form_id), token, ex=SIGN_IN_TTL)
    return form_id, token


async def take_sign_in_token(door: FrontDoor, form_id: str | None) -> str | None:
    """The CSRF token of the sign-in form ``form_id``, given once: None for a form this
    dashboard did not hand out, that expired, or that was posted already."""
    if not form_id:
        return None
    async with _redis(door):
        token = await door.redis.getdel(_keys(door).dashboard_sign_in(form_id))
    return None if token is None else text(token)


def new_token() -> str:
    return secrets.token_hex(16)


def same_token(expected: str | None, given: str | None) -> bool:
    return bool(expected) and bool(given) and hmac.compare_digest(str(expected), str(given))


def set_cookie(request: Request, response: Response, name: str, value: str, ttl: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=ttl,
        path="/dashboard",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


async def _load(client: aioredis.Redis, key: str, session_id: str) -> Session | None:
    raw = await client.hgetall(key)
    if not raw:
        return None
    data = {text(k): text(v) for k, v in raw.items()}
    return Session(
        session_id, data["team"] or None, data["key_id"], data["csrf"], data.get("generation", "")
    )


async def _key_live(door: FrontDoor, session: Session) -> bool:
    owner = await live_key_owner(door.pool, session.key_id)
    return owner is not None and owner.team == session.team


def _redis(door: FrontDoor) -> contextlib.AbstractAsyncContextManager[None]:
    """The bound on a read of the sessions' Redis."""
    return bounded(redis_unreachable(door.settings))


def _keys(door: FrontDoor) -> Keys:
    return Keys(door.settings.redis_prefix)


def _key(door: FrontDoor, session_id: str) -> str:
    return _keys(door).dashboard_session(session_id)
