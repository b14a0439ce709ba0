"""Dashboard sign-ins: a random session id in a cookie, the session itself in Redis.

A person pastes a key into the sign-in form; the key is checked once (``KeyBook``) and
forgotten. The session holds whose key it was (team, or none for an administrator), the
key's id and a CSRF token, and expires ``SESSION_TTL`` seconds after sign-in; each request
also finds the key still live (one lookup by its id), so revoking it, or disabling its team,
ends its sessions at once; disabling a team also deletes its keys' sessions
(``admin.teams.disable_and_sign_out``), so enabling it again brings none back.

The cookie is HttpOnly (no script reads it), SameSite=Strict (no other site's page sends
it) and Secure when the page was served over TLS. Every POST carries the session's CSRF
token in a form field, compared in constant time.

The sign-in form, posted before any session exists, is bound the same way to a pre-session:
the form's id in a cookie, its CSRF token in Redis for ``SIGN_IN_TTL`` seconds, taken (and
forgotten) by the one post that may use it. A cookie planted by another site (a sibling
domain can set one) names no form this dashboard handed out, whatever token comes with it.

Each read of Redis or PostgreSQL here is bounded (``outage.bounded``): with either away the
person is shown which one, within seconds.
"""

from __future__ import annotations

import contextlib
import hmac
import secrets
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from fastapi import Request
from fastapi.responses import Response

from admin.keys import KeyOwner, live_key_owner
from frontdoor.dashboard.outage import bounded
from frontdoor.service import FrontDoor
from queuegate.db import database_unreachable
from queuegate.keys import Keys
from queuegate.redis_client import redis_unreachable, text

COOKIE = "queuegate_session"
SIGN_IN_COOKIE = "queuegate_sign_in"
"""The id of the sign-in form handed out; its CSRF token stays in Redis."""
SIGN_IN_TTL = 20 * 60
"""Seconds a sign-in form may wait to be posted; a later post is shown a fresh form."""
SESSION_TTL = 8 * 3600
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

    @property
    def is_admin(self) -> bool:
        return self.team is None

    def may_read(self, team: str) -> bool:
        return self.team is None or self.team == team


class SignInNeeded(Exception):
    """The request has no live session: the person is sent to the sign-in page."""


class BadCsrf(Exception):
    """A POST without its session's CSRF token."""


async def start(door: FrontDoor, owner: KeyOwner) -> Session:
    """A new session of the key's owner; past ``SESSIONS_PER_KEY``, the key's oldest ends."""
    session = Session(secrets.token_urlsafe(32), owner.team, owner.key_id, new_token())
    key = _key(door, session.session_id)
    opened = _keys(door).dashboard_sessions(owner.key_id)
    async with _redis(door), door.redis.pipeline(transaction=True) as pipe:
        pipe.hset(
            key,
            mapping={"team": owner.team or "", "key_id": owner.key_id, "csrf": session.csrf},
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
    if session is None:
        raise SignInNeeded
    async with bounded(database_unreachable(door.settings)):
        live = await _key_live(door, session)
    if not live:
        raise SignInNeeded
    return session


async def check_csrf(request: Request, session: Session) -> None:
    """BadCsrf unless the form posted carries the session's token."""
    form = await request.form()
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
    return Session(session_id, data["team"] or None, data["key_id"], data["csrf"])


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
