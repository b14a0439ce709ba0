"""Who may act for a team, and how its jobs are guarded: a team's security settings.

Kept apart from the team's limits and budgets (``teams.config``), in ``team_security``:

- ``identity``: how a worker knows a job comes from the team.
  ``queue`` trusts whoever can publish to the team's queue (one trusted broker user for all
  apps: development, single tenant); ``broker``: the team's own RabbitMQ user, proven by the
  broker through ``user_id``; ``api_key``: each job carries a proof of one of the team's keys
  (``queuegate.signing``: the key's id and an HMAC bound to the job, never the key), for
  deployments that cannot give each team its own broker user.
- ``pii``: ``off``, ``warn`` (flag the audit row), ``redact`` (before the provider sees it),
  ``block`` (answer ``invalid_request``).
- ``capture``: prompts and responses kept in ``audit_content``: ``none``, ``redacted``, ``full``.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from typing import Any, Literal

import asyncpg
from pydantic import BaseModel, ConfigDict

from queuegate.topology import Topology

IdentityMode = Literal["queue", "broker", "api_key"]
PiiPolicy = Literal["off", "warn", "redact", "block"]
Capture = Literal["none", "redacted", "full"]

TEAM_KEY_PREFIX = "qg"
ADMIN_KEY_PREFIX = "qga"
_KEY = re.compile(r"(qga?)_([0-9a-f]{12})_[A-Za-z0-9_-]{43}")


class TeamSecurity(BaseModel):
    """A team's security settings; the defaults are what a team without a row gets."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    identity: IdentityMode = "queue"
    pii: PiiPolicy = "off"
    capture: Capture = "none"
    broker_user: str | None = None


def broker_user(namespace: str, team: str) -> str:
    """The team's RabbitMQ user, under the namespace so environments never share one."""
    return f"{namespace}.{team}"


def reply_queue_pattern(namespace: str, team: str) -> str:
    """The reply queues a team may read and have results sent to, as a regex.

    The gateway declares them (``open_reply_queue`` on the control plane), never the team."""
    ns, t = re.escape(namespace), re.escape(team)
    return rf"^{ns}\.(replies|results)\.{t}\.[^.]+$"


def frontdoor_queue_pattern(namespace: str) -> str:
    """The reply queues of the HTTP front door's processes (``<ns>.frontdoor.<id>``), as a
    regex: results go there only for jobs a front-door user published."""
    return rf"^{re.escape(namespace)}\.frontdoor\.[^.]+$"


@dataclass(frozen=True)
class BrokerPermissions:
    """What a team's broker user may do; see ``permissions``."""

    configure: str
    write: str
    read: str
    topic_exchange: str
    topic_write: str


def permissions(namespace: str, team: str) -> BrokerPermissions:
    """Read its own reply queues; publish only to its own entry exchange (``<ns>.in.<team>``),
    under its two keys.

    Not to the shared jobs exchange: RabbitMQ before 4.0.3 routes a message by the keys of
    its ``CC`` and ``BCC`` headers too, unchecked against topic permissions, so a team could
    copy its jobs into any team's queue there. Its entry exchange has the team's own queues
    alone bound to it. The write regex is anchored both ends: the broker finds a match
    anywhere in a name, and a team's name may begin another's. No configure at all: a team
    that could declare a queue could give it dead-letter arguments
    (``x-dead-letter-exchange=<ns>.jobs``, a routing key of another team) and have the
    broker, which skips permissions when it dead-letters, move every result into another
    team's job queue; nor may it declare or bind exchanges (alternate exchanges,
    exchange-to-exchange bindings). Its reply queues are declared by the gateway, with the
    gateway's arguments, on a control request (routing key ``<team>.control``). No write on
    ``amq.default`` (it would let the team publish into any queue by name).
    """
    entry = Topology(namespace).entry_exchange(team)
    return BrokerPermissions(
        configure="^$",
        write=f"^{re.escape(entry)}$",
        read=reply_queue_pattern(namespace, team),
        topic_exchange=entry,
        topic_write=rf"^{re.escape(team)}(\.control)?$",
    )


def new_password() -> str:
    return secrets.token_urlsafe(32)


def new_api_key(prefix: str = TEAM_KEY_PREFIX) -> tuple[str, str]:
    """A new key and its id; the key is shown once and only its hash is stored.

    ``prefix`` tells kinds of keys apart at a glance (and to secret scanners): ``qg`` a
    team's, ``qga`` an administrator's."""
    key_id = secrets.token_hex(6)
    return key_id, f"{prefix}_{key_id}_{secrets.token_urlsafe(32)}"


def hash_api_key(key: str) -> str:
    """SHA-256, not bcrypt: the key is 256 random bits, so nobody can guess it from the hash
    however fast the hash is, and a deterministic hash is looked up by an index in one query."""
    return hashlib.sha256(key.encode()).hexdigest()


def key_shape(key: str) -> tuple[str, str] | None:
    """The prefix (``qg`` a team's, ``qga`` an administrator's) and id a key carries in its
    text; None when it is not shaped like one of ours."""
    match = _KEY.fullmatch(key)
    return None if match is None else (match.group(1), match.group(2))


def api_key_id(key: str) -> str | None:
    """The id a team's key carries in its text; None for any other text."""
    shape = key_shape(key)
    return shape[1] if shape is not None and shape[0] == TEAM_KEY_PREFIX else None


async def get_security(pool: asyncpg.Pool, team: str) -> TeamSecurity:
    row = await pool.fetchrow(
        "SELECT identity, pii, capture, broker_user FROM team_security WHERE team = $1", team
    )
    return TeamSecurity() if row is None else TeamSecurity(**dict(row))


async def all_security(pool: asyncpg.Pool) -> dict[str, TeamSecurity]:
    rows: list[Any] = await pool.fetch(
        "SELECT team, identity, pii, capture, broker_user FROM team_security"
    )
    return {
        row["team"]: TeamSecurity(
            identity=row["identity"],
            pii=row["pii"],
            capture=row["capture"],
            broker_user=row["broker_user"],
        )
        for row in rows
    }


async def put_security(pool: asyncpg.Pool, team: str, security: TeamSecurity) -> None:
    await pool.execute(
        "INSERT INTO team_security (team, identity, pii, capture, broker_user)"
        " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (team) DO UPDATE SET"
        " identity = $2, pii = $3, capture = $4, broker_user = $5, updated_at = now()",
        team,
        security.identity,
        security.pii,
        security.capture,
        security.broker_user,
    )


async def add_api_key(pool: asyncpg.Pool, team: str) -> tuple[str, str]:
    """Store a new key's hash for the team; return its id and the key (shown once)."""
    key_id, key = new_api_key()
    await pool.execute(
        "INSERT INTO api_keys (id, team, key_hash) VALUES ($1, $2, $3)",
        key_id,
        team,
        hash_api_key(key),
    )
    return key_id, key


async def revoke_api_keys(pool: asyncpg.Pool, team: str, *, key_id: str | None = None) -> int:
    """Revoke one key of the team, or all of them; return how many were live."""
    status: str = await pool.execute(
        "UPDATE api_keys SET revoked_at = now()"
        " WHERE team = $1 AND revoked_at IS NULL AND (id = $2 OR $2 IS NULL)",
        team,
        key_id,
    )
    return int(status.rsplit(" ", 1)[1])


async def live_api_key(pool: asyncpg.Pool, key_id: str) -> tuple[str, str] | None:
    """The team and stored hash of a live key, by its id; None when unknown or revoked."""
    row = await pool.fetchrow(
        "SELECT team, key_hash FROM api_keys WHERE id = $1 AND revoked_at IS NULL", key_id
    )
    return None if row is None else (row["team"], row["key_hash"])
