"""Who published a job, proven, and whether that publisher may act for the queue's team.

The team's ``identity`` setting (queuegate.tenancy) says what counts as proof:

- ``queue``: the queue itself (whoever can publish to it acts for the team);
- ``broker``: ``user_id``, which RabbitMQ has checked against the connection's user, must be
  the team's broker user;
- ``api_key``: the job must carry a live key's id and its proof for this very job
  (``queuegate.signing``), verified against the key's stored hash.

Whatever the setting, a job whose ``user_id`` is the HTTP front door's
(``Settings.frontdoor``) and that carries a key proof is proven by that key alone, recorded
``frontdoor:<user>/api_key:<key id>``: the front door holds the key the caller presented and
signs each job as ``GatewayClient(api_key=...)`` does, so it can act for no team whose key
it was not given, and no other broker user can pass for it. This comes before the operator
rule: a front-door user that is also an operator is still held to the proof it sends. Its
results may go to a front-door reply queue (``<ns>.frontdoor.<id>``); no one else's may.

Otherwise, a job whose ``user_id`` is an operator's (``Settings.operators``: the
gateway's own broker user unless configured) is accepted for the team whose queue it is on:
teams cannot forge ``user_id``. ``dlq replay`` re-publishes that way, naming in a header the
user the job was first published under; such a replay must still prove that first publisher
(the team's broker user, or the job's key proof), so an operator's replay never turns a
refused forgery into a served job.

With a proven identity, ``reply_to`` must also be one of the team's reply queues, or a team
could have results (even error results) delivered into another team's queue.

Settings and keys come from the registry and are cached in process for ``ttl`` seconds: a
revoked key or a changed setting takes effect within that time, and PostgreSQL is read at
most once per ``ttl`` per key, not once per job.

While PostgreSQL is unreachable, teams are served with the settings last read; a lookup with
nothing to fall back on (a key not seen within ``ttl``, the first settings) holds its job and
asks again with backoff for up to ``wait`` seconds, rather than give the job back to its
queue at once (it would come straight back, over and over, until dead-lettered).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import asyncpg
from aio_pika.abc import AbstractIncomingMessage

from queuegate.db import DB_ERRORS, RETRY_CAP, RETRY_FIRST, is_unreachable, reconnect
from queuegate.errors import ServiceUnavailable, Unauthorized
from queuegate.outage import OutageLog
from queuegate.signing import KEY_ID_HEADER, PASS_API_KEY, PROOF_HEADER, proof_matches
from queuegate.tenancy import (
    TeamSecurity,
    all_security,
    frontdoor_queue_pattern,
    live_api_key,
    reply_queue_pattern,
)
from queuegate.topology import HEADER_REPLAY_OF, header_text
from queuegate.visible import clipped

log = logging.getLogger(__name__)

KEY_CACHE_SIZE = 10_000
_KEY_ID = re.compile(r"[0-9a-f]{12}")
MISSING_TEAM_RECHECK = 0.5
"""Seconds between registry reads while a team has no security row."""

T = TypeVar("T")


@dataclass(frozen=True)
class Proof:
    """Who a job is from: ``queue``, ``broker:<user>``, ``api_key:<key id>``,
    ``frontdoor:<user>/api_key:<key id>``, ``operator:<user>`` or
    ``operator:<user>(replay of <first publisher>)``."""

    identity: str
    security: TeamSecurity


_DEFAULTS = TeamSecurity()
"""A team without a row's settings: one instance (frozen) rather than one per job, which
holds it until its end (about 700 bytes, thousands of jobs)."""


class Identities:
    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        namespace: str,
        ttl: float,
        wait: float,
        operators: frozenset[str] = frozenset(),
        frontdoor: frozenset[str] = frozenset(),
    ) -> None:
        self._pool = pool
        self._operators = operators
        self._frontdoor = frontdoor
        self._frontdoor_replies = re.compile(frontdoor_queue_pattern(namespace))
        self._namespace = namespace
        self._ttl = ttl
        self._wait = wait
        self._outage = OutageLog(
            log,
            "PostgreSQL (team registry)",
            "teams keep the settings last read; jobs needing a lookup wait for it",
        )
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
        return self._security.get(team, _DEFAULTS)

    def _stale(self, max_age: float) -> bool:
        return self._loaded_at is None or time.monotonic() - self._loaded_at > max_age

    def is_operator(self, message: AbstractIncomingMessage) -> bool:
        """Whether the broker-validated publisher of ``message`` is an operator."""
        return bool(message.user_id) and message.user_id in self._operators

    async def prove(
        self,
        message: AbstractIncomingMessage,
        team: str,
        job_id: str,
        *,
        check_reply_to: bool = True,
    ) -> Proof:
        """The job's proven identity; raises Unauthorized when it may not act for ``team``.

        ``job_id``: what the API-key proof is bound to (a control request's id for one).
        ``check_reply_to=False`` for a control request: its answer goes by direct reply-to,
        which only the requesting channel can read, so it reaches no other team's queue.
        """
        security = await self.security(team)
        if self.published_by_frontdoor(message) and _has_proof(message):
            identity = f"frontdoor:{message.user_id}/{await self._prove_key(message, team, job_id)}"
        elif security.identity == "queue":
            return Proof("queue", security)
        elif self.is_operator(message):
            identity = await self._prove_operator(message, team, job_id, security)
        elif security.identity == "broker":
            identity = self._prove_user(message.user_id, team, security)
        else:
            identity = await self._prove_key(message, team, job_id)
        if check_reply_to and not self.may_reply(team, message):
            raise Unauthorized(
                f"reply_to {clipped(message.reply_to or '')!r} is not a reply queue of {team!r}"
            )
        return Proof(identity, security)

    def _replay_of(self, message: AbstractIncomingMessage) -> str | None:
        """The first publisher an operator's replay names; None for any other job."""
        if not self.is_operator(message):
            return None
        return header_text((message.headers or {}).get(HEADER_REPLAY_OF))

    def published_by_frontdoor(self, message: AbstractIncomingMessage) -> bool:
        """Whether the front door itself published the job (not an operator's replay, which
        a front-door user that is also an operator may publish)."""
        return message.user_id in self._frontdoor and self._replay_of(message) is None

    def _from_frontdoor(self, message: AbstractIncomingMessage) -> bool:
        """Whether the front door published the job, or first published the one an operator
        replays."""
        return self.published_by_frontdoor(message) or self._replay_of(message) in self._frontdoor

    def _prove_user(self, user: str | None, team: str, security: TeamSecurity) -> str:
        if not user:
            raise Unauthorized(
                f"team {team!r} accepts only jobs from its broker user: the message has no user_id"
            )
        if user != security.broker_user:
            raise Unauthorized(f"broker user {user!r} may not publish for team {team!r}")
        return f"broker:{user}"

    async def _prove_operator(
        self, message: AbstractIncomingMessage, team: str, job_id: str, security: TeamSecurity
    ) -> str:
        operator = f"operator:{message.user_id}"
        first = header_text((message.headers or {}).get(HEADER_REPLAY_OF))
        if first is None:
            return operator  # the operator's own job (e.g. `queuegate submit`)
        if first in self._frontdoor and _has_proof(message):
            proven = f"frontdoor:{first}/{await self._prove_key(message, team, job_id)}"
        elif first in self._operators:
            proven = f"operator:{first}"
        elif security.identity == "broker":
            proven = self._prove_user(first, team, security)
        else:
            proven = await self._prove_key(message, team, job_id)
        return f"{operator}(replay of {proven})"

    def may_reply(self, team: str, message: AbstractIncomingMessage) -> bool:
        """Whether the job's ``reply_to`` is one of the team's reply queues (or absent), or a
        front-door reply queue for a job of the front door."""
        reply_to = message.reply_to
        if reply_to is None:
            return True
        if self._frontdoor_replies.fullmatch(reply_to):
            return self._from_frontdoor(message)
        pattern = self._patterns.get(team)
        if pattern is None:
            pattern = self._patterns[team] = re.compile(reply_queue_pattern(self._namespace, team))
        return bool(pattern.fullmatch(reply_to))

    async def _prove_key(self, message: AbstractIncomingMessage, team: str, job_id: str) -> str:
        """``api_key:<key id>`` when the job carries a proof of a live key of ``team``."""
        headers = message.headers or {}
        key_id = header_text(headers.get(KEY_ID_HEADER))
        proof = header_text(headers.get(PROOF_HEADER))
        if key_id is None or proof is None:
            raise Unauthorized(
                f"team {team!r} requires an API key: {PASS_API_KEY} "
                f"(api_key= to the client, which sends its id and a proof in {KEY_ID_HEADER} "
                f"and {PROOF_HEADER})"
            )
        if not _KEY_ID.fullmatch(key_id):
            raise Unauthorized("the API key is unknown or revoked")
        key = await self._live_key(key_id)
        if key is None:
            raise Unauthorized("the API key is unknown or revoked")
        owner, key_hash = key
        if owner != team:
            raise Unauthorized(f"API key {key_id} may not publish for team {team!r}")
        if not proof_matches(key_hash, proof, job_id=job_id, team=team, body=message.body):
            raise Unauthorized(f"the proof of API key {key_id} does not match this job")
        return f"api_key:{key_id}"

    async def _live_key(self, key_id: str) -> tuple[str, str] | None:
        """The team and stored hash of a live key, from a copy at most ``ttl`` old."""
        cached = self._keys.get(key_id)
        now = time.monotonic()
        if cached is not None and now - cached[0] <= self._ttl:
            return cached[1]
        key = await self._read(lambda: live_api_key(self._pool, key_id), hold=True)
        self._keys[key_id] = (now, key)
        self._keys.move_to_end(key_id)
        if len(self._keys) > KEY_CACHE_SIZE:
            self._keys.popitem(last=False)
        return key

    async def _reload(self) -> None:
        try:
            # Held only when there is no copy to serve from.
            security = await self._read(
                lambda: all_security(self._pool), hold=self._loaded_at is None
            )
        except asyncpg.UndefinedTableError:
            # Not migrated yet: no team can have settings, so every team has the defaults.
            if not self._down:
                log.warning("no team_security table (run queuegate migrate): defaults for all")
            self._down = True
            self._security, self._loaded_at = {}, time.monotonic()
            return
        except ServiceUnavailable:
            if self._loaded_at is None:
                raise
            self._loaded_at = time.monotonic()  # try again after ttl, not on every job
            return
        self._security = security
        self._down = False
        self._loaded_at = time.monotonic()

    async def _read(self, call: Callable[[], Awaitable[T]], *, hold: bool) -> T:
        """``call()``'s answer; while PostgreSQL is unreachable asked again with backoff for up
        to ``wait`` seconds when ``hold``, else ServiceUnavailable at once."""
        give_up = time.monotonic() + (self._wait if hold else 0.0)
        delay = RETRY_FIRST
        while True:
            try:
                answer = await call()
            except asyncpg.UndefinedTableError:
                raise
            except DB_ERRORS as exc:
                self._outage.failed(exc)
                if is_unreachable(exc):
                    await reconnect(self._pool)
                left = give_up - time.monotonic()
                if not is_unreachable(exc) or left <= 0:
                    raise ServiceUnavailable(
                        f"the team registry (PostgreSQL) is unreachable ({type(exc).__name__})"
                    ) from exc
                await asyncio.sleep(min(delay, left))
                delay = min(2 * delay, RETRY_CAP)
                continue
            self._outage.recovered()
            return answer


def _has_proof(message: AbstractIncomingMessage) -> bool:
    headers = message.headers or {}
    return KEY_ID_HEADER in headers or PROOF_HEADER in headers
