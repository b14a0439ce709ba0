"""Who published a job, proven, and whether that publisher may act for the queue's team.

The team's ``identity`` setting (queuegate.tenancy) says what counts as proof:

- ``queue``: the queue itself (whoever can publish to it acts for the team);
- ``broker``: ``user_id``, which RabbitMQ has checked against the connection's user, must be
  the team's broker user;
- ``api_key``: the ``x-queuegate-api-key`` header must be a live key of the team.

With a proven identity, ``reply_to`` must also be one of the team's reply queues, or a team
could have results (even error results) delivered into another team's queue.

Settings and keys come from the registry and are cached in process for ``ttl`` seconds: a
revoked key or a changed setting takes effect within that time, and PostgreSQL is read at
most once per ``ttl`` per key, not once per job.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass

import asyncpg
from aio_pika.abc import AbstractIncomingMessage

from queuegate.errors import ServiceUnavailable, Unauthorized
from queuegate.tenancy import (
    API_KEY_HEADER,
    TeamSecurity,
    all_security,
    hash_api_key,
    looks_like_api_key,
    reply_queue_pattern,
    team_of_api_key,
)

log = logging.getLogger(__name__)

KEY_CACHE_SIZE = 10_000
MISSING_TEAM_RECHECK = 0.5
"""Seconds between registry reads while a team has no security row."""
_DB_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


@dataclass(frozen=True)
class Proof:
    """Who a job is from: ``queue``, ``broker:<user>`` or ``api_key:<key id>``."""

    identity: str
    security: TeamSecurity


class Identities:
    def __init__(self, pool: asyncpg.Pool, *, namespace: str, ttl: float) -> None:
        self._pool = pool
        self._namespace = namespace
        self._ttl = ttl
        self._security: dict[str, TeamSecurity] = {}
        self._loaded_at: float | None = None
        self._lock = asyncio.Lock()
        self._keys: OrderedDict[str, tuple[float, tuple[str, str] | None]] = OrderedDict()
        self._patterns: dict[str, re.Pattern[str]] = {}
        self._down = False

    async def security(self, team: str) -> TeamSecurity:
        """The team's settings; the defaults for a team without a row."""
        # A team missing from the copy may have just been added with a stricter identity:
        # look again soon rather than serve it with the defaults for a whole ttl.
        max_age = self._ttl if team in self._security else min(self._ttl, MISSING_TEAM_RECHECK)
        if self._stale(max_age):
            async with self._lock:
                if self._stale(max_age):
                    await self._reload()
        return self._security.get(team, TeamSecurity())

    def _stale(self, max_age: float) -> bool:
        return self._loaded_at is None or time.monotonic() - self._loaded_at > max_age

    async def prove(
        self, message: AbstractIncomingMessage, team: str, *, check_reply_to: bool = True
    ) -> Proof:
        """The job's proven identity; raises Unauthorized when it may not act for ``team``.

        ``check_reply_to=False`` for a control request: its answer goes by direct reply-to,
        which only the requesting channel can read, so it reaches no other team's queue.
        """
        security = await self.security(team)
        if security.identity == "queue":
            return Proof("queue", security)
        if security.identity == "broker":
            user = message.user_id
            if not user:
                raise Unauthorized(
                    f"team {team!r} accepts only jobs from its broker user: "
                    "the message has no user_id"
                )
            if user != security.broker_user:
                raise Unauthorized(f"broker user {user!r} may not publish for team {team!r}")
            identity = f"broker:{user}"
        else:
            identity = await self._prove_key(message, team)
        if check_reply_to and not self.may_reply(team, message.reply_to):
            raise Unauthorized(f"reply_to {message.reply_to!r} is not a reply queue of {team!r}")
        return Proof(identity, security)

    def may_reply(self, team: str, reply_to: str | None) -> bool:
        """Whether ``reply_to`` is one of the team's reply queues (or absent)."""
        if reply_to is None:
            return True
        pattern = self._patterns.get(team)
        if pattern is None:
            pattern = self._patterns[team] = re.compile(reply_queue_pattern(self._namespace, team))
        return bool(pattern.match(reply_to))

    async def _prove_key(self, message: AbstractIncomingMessage, team: str) -> str:
        key = (message.headers or {}).get(API_KEY_HEADER)
        if isinstance(key, bytes):
            key = key.decode(errors="replace")
        if not isinstance(key, str) or not looks_like_api_key(key):
            raise Unauthorized(f"team {team!r} requires an API key in {API_KEY_HEADER}")
        owner = await self._key_owner(key)
        if owner is None:
            raise Unauthorized("the API key is unknown or revoked")
        if owner[0] != team:
            raise Unauthorized(f"API key {owner[1]} may not publish for team {team!r}")
        return f"api_key:{owner[1]}"

    async def _key_owner(self, key: str) -> tuple[str, str] | None:
        digest = hash_api_key(key)  # the cache holds hashes, never keys
        cached = self._keys.get(digest)
        now = time.monotonic()
        if cached is not None and now - cached[0] <= self._ttl:
            return cached[1]
        try:
            owner = await team_of_api_key(self._pool, key)
        except _DB_ERRORS as exc:
            raise ServiceUnavailable("the team registry (PostgreSQL) is unreachable") from exc
        self._keys[digest] = (now, owner)
        self._keys.move_to_end(digest)
        if len(self._keys) > KEY_CACHE_SIZE:
            self._keys.popitem(last=False)
        return owner

    async def _reload(self) -> None:
        try:
            self._security = await all_security(self._pool)
        except asyncpg.UndefinedTableError:
            # Not migrated yet: no team can have settings, so every team has the defaults.
            if not self._down:
                log.warning("no team_security table (run queuegate migrate): defaults for all")
            self._down = True
            self._security, self._loaded_at = {}, time.monotonic()
            return
        except _DB_ERRORS as exc:
            if self._loaded_at is None:
                raise ServiceUnavailable("the team registry (PostgreSQL) is unreachable") from exc
            if not self._down:
                log.warning("team registry unreadable (%s); keeping the settings I have", exc)
            self._down = True
            self._loaded_at = time.monotonic()  # try again after ttl, not on every job
            return
        self._down = False
        self._loaded_at = time.monotonic()
