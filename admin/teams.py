"""What ``queuegate teams`` does: the registry row, the team's queue, and its identity."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import aiormq.exceptions
import asyncpg
import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.exceptions import RedisError

from admin.keys import (
    end_dashboard_sessions,
    new_dashboard_generation,
    revoke_team_key,
    team_keys,
)
from queuegate.broker import connect
from queuegate.db import DB_ERRORS, connection, create_pool, worker_application_name
from queuegate.errors import ConfigError, GatewayError, ServiceUnavailable
from queuegate.keys import Keys
from queuegate.livestats import read_workers
from queuegate.management import BrokerAdmin
from queuegate.redis_client import redis_for, redis_unreachable
from queuegate.registry import (
    Change,
    Team,
    TeamConfig,
    add_team,
    check_team_name,
    disable_team,
    get_team,
    list_teams,
    sees,
    set_team_config,
    stored_config,
    team_exists,
)
from queuegate.services import REDIS_CHECK_WAIT
from queuegate.settings import Settings
from queuegate.spend import Scope, current_month, ledger_scopes, reconcile, reconciler_token
from queuegate.tenancy import (
    Capture,
    IdentityMode,
    PiiPolicy,
    TeamSecurity,
    add_api_key,
    all_security,
    broker_user,
    get_security,
    new_password,
    permissions,
    put_security,
    revoke_api_keys,
)
from queuegate.topology import CONTROL_MAX_BYTES, Bound, Topology
from queuegate.visible import clipped


@dataclass
class Storing:
    """How far a command storing a change in the registry got, for one cut short (a
    PostgreSQL that hangs) to say honestly whether the change may have landed, and how long
    Redis's part after the store may take."""

    within: float = REDIS_CHECK_WAIT
    """Seconds the steps after the store (ending sessions, bringing ledgers up to date) may
    wait for Redis."""
    sent: bool = False
    """The write that commits the change may have reached PostgreSQL: from here on a store
    cut short may or may not have landed; before, its transaction was never committed."""
    stored: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the change is committed."""


@dataclass(frozen=True)
class Credentials:
    """What a team's apps authenticate with; shown once, stored nowhere by queuegate."""

    identity: IdentityMode
    user: str | None = None
    password: str | None = None
    amqp_url: str | None = None
    """The broker URL with the team's user in it, for the apps' QUEUEGATE_AMQP_URL."""
    api_key_id: str | None = None
    api_key: str | None = None
    deleted_user: str | None = None
    """The team's broker user, deleted as it stopped being the team's identity."""


@dataclass(frozen=True)
class Added:
    """What ``add`` did: ``created`` a new team, or found it and changed no credential."""

    created: bool
    enabled_again: bool
    credentials: Credentials
    """With secrets (shown once) for a new team or an existing team's missing broker user;
    else its identity and user alone."""
    change: Change | None
    """The registry write (``in_force`` waits for it); None when the team was enabled and is
    left as it was."""


async def add(
    settings: Settings,
    name: str,
    *,
    identity: IdentityMode | None = None,
    password: str | None = None,
) -> Credentials:
    """``register`` the team; its credentials (secrets only when new, see ``Added``)."""
    added = await register(settings, name, identity=identity, password=password)
    return added.credentials


async def register(
    settings: Settings,
    name: str,
    *,
    identity: IdentityMode | None = None,
    password: str | None = None,
    storing: Storing | None = None,
) -> Added:
    """Register the team, declare its queue and give it its identity (``broker`` by default).

    Idempotent: for a team that exists it enables it, declares its queue and repairs what is
    missing (a broker user deleted by hand), but never changes a password or key that works:
    ``rotate`` does that. All or nothing for a new team: its broker user is made first, then
    the registry rows and the queue in one transaction, and the user is deleted again when a
    later step fails, so no team is ever served without its identity.
    """
    from accounting import migrate

    check_team_name(name)
    pool = await create_pool(settings)
    try:
        await migrate(pool, settings.database_schema)
        existing = await _registered(pool, name)
        storing = storing or Storing()
        if existing is not None:
            return await _ensure(settings, pool, existing, identity, password, storing=storing)
        return await _create(settings, pool, name, identity or "broker", password, storing=storing)
    finally:
        await pool.close()


async def _create(
    settings: Settings,
    pool: asyncpg.Pool,
    name: str,
    identity: IdentityMode,
    password: str | None,
    *,
    storing: Storing,
) -> Added:
    credentials = Credentials(identity)
    user = broker_user(settings.namespace, name) if identity == "broker" else None
    made = False
    # Before its queue exists, so that the queue is never unbounded; a policy left by a later
    # failure bounds no queue until the team is added, and is then put again.
    async with BrokerAdmin.of(settings) as admin:
        await put_quota(admin, settings, name, TeamConfig())
    try:
        if user is not None:
            password = password or new_password()
            async with BrokerAdmin.of(settings) as admin:
                await refuse_foreign_user(admin, user, name, recorded=None)
                await admin.put_user(user, password)
            made = True
            await create_broker_user(settings, name, user, None, TeamConfig())
            credentials = Credentials(
                "broker", user, password, with_user(settings.amqp_url, user, password)
            )
        async with pool.acquire() as conn, conn.transaction():
            change = await add_team(conn, name)
            await put_security(conn, name, TeamSecurity(identity=identity, broker_user=user))
            if identity == "api_key":
                key_id, key = await add_api_key(conn, name)
                credentials = Credentials("api_key", api_key_id=key_id, api_key=key)
            # Last before the commit: a broker that refuses the queue rolls the rows back.
            await _declare_queue(settings, name)
            # Only the commit, as the transaction ends, is left: a broker hanging above left
            # the team not stored.
            storing.sent = True
        storing.stored.set()
    except BaseException as exc:
        if made and user is not None:
            await _undo_user(settings, user, exc)
        raise
    return Added(True, False, credentials, change)


async def refuse_foreign_user(
    admin: BrokerAdmin, user: str, team: str, *, recorded: str | None
) -> None:
    """ConfigError when ``user`` exists but is not the one recorded as the team's
    (``team_security.broker_user``): its password, tags and permissions are someone else's,
    never to be replaced by the team's."""
    if user != recorded and await admin.user_exists(user):
        raise ConfigError(
            f"broker user {user} exists and is not team {team}'s: delete it "
            f"(rabbitmqctl delete_user {user}) if nothing uses it, or pick another team name"
        )


async def _undo_user(settings: Settings, user: str, cause: BaseException) -> None:
    try:
        async with BrokerAdmin.of(settings) as admin:
            await admin.delete_user(user)
    except GatewayError as exc:
        raise GatewayError(
            f"adding the team failed ({cause}) and its broker user {user} could not be "
            f"deleted again ({exc}): delete it in the management UI"
        ) from cause


async def _ensure(
    settings: Settings,
    pool: asyncpg.Pool,
    team: Team,
    identity: IdentityMode | None,
    password: str | None,
    *,
    storing: Storing,
) -> Added:
    security = await get_security(pool, team.name)
    if identity is not None and identity != security.identity:
        raise ConfigError(
            f"team {team.name} exists with identity {security.identity}: change it with "
            f"queuegate teams security {team.name} --identity {identity}"
        )
    # This version's bounds, on a queue an earlier version left without them.
    async with BrokerAdmin.of(settings) as admin:
        await put_quota(admin, settings, team.name, team.config)
    await _declare_queue(settings, team.name)
    credentials = Credentials(security.identity, user=security.broker_user)
    if security.identity == "broker":
        user = security.broker_user or broker_user(settings.namespace, team.name)
        async with BrokerAdmin.of(settings) as admin:
            await refuse_foreign_user(admin, user, team.name, recorded=security.broker_user)
            missing = not await admin.user_exists(user)
        # A working password is never replaced here (teams rotate-credentials does that).
        password = (password or new_password()) if missing else None
        if password is not None:
            credentials = Credentials(
                "broker", user, password, with_user(settings.amqp_url, user, password)
            )
        # Permissions and limits are set again (this version's); a password only when new.
        await create_broker_user(settings, team.name, user, password, team.config)
        if security.broker_user is None:
            await put_security(pool, team.name, security.model_copy(update={"broker_user": user}))
    change = None
    if not team.enabled:
        storing.sent = True  # a statement of its own: committed as PostgreSQL runs it
        change = await add_team(pool, team.name)
        storing.stored.set()
    return Added(False, not team.enabled, credentials, change)


_REFUSED_QUEUE = re.compile(r"for queue '([^']+)'")
"""The queue a PRECONDITION_FAILED declare names ("inequivalent arg ... for queue 'x' ...")."""


async def _declare_queue(settings: Settings, name: str) -> None:
    connection = await connect(settings.amqp_url, name="queuegate-teams")
    topology = Topology.of(settings)
    async with connection:
        channel = await connection.channel()
        try:
            # The namespace's dead letters too, moved off an earlier version's binding: once
            # here, not each time a worker declares a team's queue.
            await topology.declare_dead(channel)
            await topology.declare_team_queue(channel, name)
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            # The team's queue, or one of the namespace's own it declares first (dead letters,
            # the team's control queue): the broker's refusal names which.
            named = _REFUSED_QUEUE.search(str(exc))
            queue = named.group(1) if named else topology.team_queue(name)
            raise ConfigError(
                f"the broker already has queue {queue} with other arguments: delete it "
                f"(rabbitmqctl delete_queue {queue}) or pick another team name"
            ) from exc


async def rotate(settings: Settings, name: str) -> Credentials:
    """New credentials for the team's identity mode; the old password or keys stop working."""
    pool = await create_pool(settings)
    try:
        if not await team_exists(pool, name):
            raise _no_team(name)
        security = await get_security(pool, name)
        if security.identity == "queue":
            raise ConfigError(
                f"team {name} uses the queue as its identity and has no credentials: give it "
                f"one with queuegate teams security {name} --identity broker"
            )
        return await _issue(settings, pool, name, security)
    finally:
        await pool.close()


async def _issue(
    settings: Settings, pool: asyncpg.Pool, team: str, security: TeamSecurity
) -> Credentials:
    if security.identity == "broker":
        user, password = broker_user(settings.namespace, team), new_password()
        async with BrokerAdmin.of(settings) as admin:
            await refuse_foreign_user(admin, user, team, recorded=security.broker_user)
        config = await _limits_config(pool, team)
        await create_broker_user(settings, team, user, password, config)
        await put_security(pool, team, security.model_copy(update={"broker_user": user}))
        return Credentials("broker", user, password, with_user(settings.amqp_url, user, password))
    deleted = security.broker_user
    if deleted is not None:
        # No longer the team's identity: a user left behind would still reach the broker.
        async with BrokerAdmin.of(settings) as admin:
            await admin.delete_user(deleted)
        security = security.model_copy(update={"broker_user": None})
    await put_security(pool, team, security)
    if security.identity == "api_key":
        await revoke_api_keys(pool, team)
        key_id, key = await add_api_key(pool, team)
        return Credentials("api_key", api_key_id=key_id, api_key=key, deleted_user=deleted)
    return Credentials("queue", deleted_user=deleted)


async def create_broker_user(
    settings: Settings, team: str, user: str, password: str | None, config: TeamConfig
) -> None:
    """Create (or re-password) the team's user with only the permissions of ``permissions``
    and the connection and channel limits of ``config``; ``password=None`` keeps the user's.

    Connections opened with an old password are closed: apps reconnect with the new one. So
    are those opened under other permissions (an earlier version's): the broker keeps the
    rights a channel has used until the channel closes.
    """
    allowed = permissions(settings.namespace, team)
    wanted = {"configure": allowed.configure, "write": allowed.write, "read": allowed.read}
    async with BrokerAdmin.of(settings) as admin:
        if password is not None:
            await admin.put_user(user, password)
            await admin.close_connections(user, reason="queuegate: credentials rotated")
        await _put_limits(admin, settings, user, config)
        held = await admin.permissions(user)
        await admin.put_permissions(user, **wanted)
        # Only the entry exchange's: an earlier version's were for the jobs exchange.
        await admin.delete_topic_permissions(user)
        await admin.put_topic_permissions(
            user, exchange=allowed.topic_exchange, write=allowed.topic_write, read="^$"
        )
        if held is not None and held != wanted:
            await admin.close_connections(user, reason="queuegate: permissions changed")


async def set_security(
    settings: Settings,
    name: str,
    *,
    identity: IdentityMode | None = None,
    pii: PiiPolicy | None = None,
    capture: Capture | None = None,
) -> tuple[TeamSecurity, Credentials | None]:
    """Change some of the team's security settings; new credentials when the identity changes."""
    pool = await create_pool(settings)
    try:
        if not await team_exists(pool, name):
            raise ConfigError(f"no team named {name}: add it with queuegate teams add {name}")
        current = await get_security(pool, name)
        changes = {"pii": pii, "capture": capture}
        updated = TeamSecurity.model_validate(
            {**current.model_dump(), **{k: v for k, v in changes.items() if v is not None}}
        )
        if identity is not None and identity != current.identity:
            credentials = await _issue(
                settings, pool, name, updated.model_copy(update={"identity": identity})
            )
            return await get_security(pool, name), credentials
        await put_security(pool, name, updated)
        return updated, None
    finally:
        await pool.close()


async def revoke_key(settings: Settings, name: str, key_id: str) -> bool:
    async with await create_pool(settings) as pool:
        return await revoke_team_key(pool, name, key_id)


def with_user(url: str, user: str, password: str) -> str:
    """``url`` with ``user`` and ``password`` in it instead of its own credentials."""
    parts = urlsplit(url)
    hosts = parts.netloc.rpartition("@")[2] or "127.0.0.1"  # one node or several
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{hosts}"
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass(frozen=True)
class TeamListing:
    """A team as listed: its limits, budget and quota (``config``) and how it is guarded;
    never a key, password or hash."""

    name: str
    enabled: bool
    identity: IdentityMode
    pii: PiiPolicy
    capture: Capture
    config: TeamConfig


async def team_listing(pool: asyncpg.Pool) -> list[TeamListing]:
    """Every registered team, by name, enabled or not."""
    security = await all_security(pool)
    listed = []
    for team in await list_teams(pool):
        guard = security.get(team.name, TeamSecurity())
        listed.append(
            TeamListing(
                team.name, team.enabled, guard.identity, guard.pii, guard.capture, team.config
            )
        )
    return listed


async def listing(settings: Settings) -> list[TeamListing]:
    async with await create_pool(settings) as pool:
        return await team_listing(pool)


class StoredUnconfirmed(ServiceUnavailable):
    """A change stored whose effect elsewhere could not be made: the command exits as for a
    change no worker confirmed (``cli.teams.NOT_CONFIRMED``), never as one refused."""


async def disable(settings: Settings, name: str, storing: Storing | None = None) -> Change | None:
    """Stop serving the team and end its dashboard sessions; the registry write, or None when
    there is no such team."""
    pool = await create_pool(settings)
    client = redis_for(settings)
    try:
        return await disable_and_sign_out(
            pool, client, Keys(settings.redis_prefix), name, storing or Storing()
        )
    except (RedisError, OSError) as exc:
        raise StoredUnconfirmed(
            f"team {name} is disabled, but its dashboard sessions are not ended: "
            + redis_unreachable(settings, "start it and disable the team again")
        ) from exc
    finally:
        await client.aclose()
        await pool.close()


async def disable_and_sign_out(
    pool: asyncpg.Pool, client: aioredis.Redis, keys: Keys, name: str, storing: Storing
) -> Change | None:
    """Disable the team, then end the dashboard sessions of every key it has: a disabled team
    is refused at once anyway, but enabling it again must not bring its old sessions back.
    Ended once the team is disabled, when no new sign-in of it is accepted: a new generation
    of its sessions ends those being made meanwhile too (``dashboard_generation``), and the
    sessions stored are deleted."""
    storing.sent = True  # a statement of its own: committed as PostgreSQL runs it
    change = await disable_team(pool, name)
    if change is None:
        return None
    storing.stored.set()
    key_ids = [key.key_id for key in await team_keys(pool, name)]
    # Bounded: a Redis (or its Sentinels) out of reach must not hold the command.
    async with asyncio.timeout(storing.within):
        await new_dashboard_generation(client, keys, name)
        await end_dashboard_sessions(client, keys, key_ids)
    return change


def quota_policy(settings: Settings, team: str) -> str:
    return f"{settings.namespace}-quota-{team}"


def reply_policy(settings: Settings) -> str:
    """The policy bounding every team's reply and results queues of the namespace: for the
    namespace ``queuegate``, the one of ``deploy/rabbitmq/definitions.json`` (the same)."""
    return f"{settings.namespace}-reply-queues"


def control_policy(settings: Settings) -> str:
    """The policy bounding every control queue of the namespace: for the namespace
    ``queuegate``, the one of ``deploy/rabbitmq/definitions.json`` (the same)."""
    return f"{settings.namespace}-control-queues"


QUOTA_PRIORITY = 10
"""Above the default policies of ``deploy/rabbitmq/definitions.json`` (priority 0): a queue
takes the one policy of highest priority, and at equal priority the broker's pick is arbitrary."""


@dataclass(frozen=True)
class QueueQuota:
    max_length: int
    max_bytes: int


def queue_quota(settings: Settings, config: TeamConfig) -> QueueQuota:
    """The bounds of the team's job queue: its own, else the gateway's defaults."""
    return QueueQuota(
        config.max_queue_length or settings.max_queue_length,
        config.max_queue_bytes or settings.max_queue_bytes,
    )


async def put_quota(admin: BrokerAdmin, settings: Settings, team: str, config: TeamConfig) -> None:
    """Bound the team's job queue by jobs and bytes with the policy ``quota_policy``, every
    control queue of the namespace by bytes (``control_policy``), and every team's reply and
    results queue by results and bytes (``reply_policy``): a queue's own arguments cannot
    change once declared, a policy can, on queues that exist too (those an earlier version
    declared with other bounds, or none). Every team has them, so that none can park
    messages until the broker's memory alarm blocks every team's publishers.
    ``overflow: reject-publish`` repeats the queues' own argument, so that a queue declared
    without it (by hand, by an earlier version) refuses too, rather than dropping its oldest
    messages, a policy's default. (On RabbitMQ 3.10 a classic queue's own ``x-overflow``
    outranks a policy's: a client's reply queue of an earlier version, ``drop-head``, drops
    its oldest past the bytes until it expires; a quorum queue takes the policy's.)
    ``dead-letter-routing-key`` has the broker dead-letter the team's jobs under the team's key
    alone: without it a job keeps the keys of its ``CC`` header too, which no broker before
    RabbitMQ 4.0.3 checks against the team's topic permissions, and would reach other
    dead-letter queues."""
    quota = queue_quota(settings, config)
    topology = Topology.of(settings)
    await admin.put_policy(
        quota_policy(settings, team),
        pattern=f"^{re.escape(topology.team_queue(team))}$",
        definition={
            "max-length": quota.max_length,
            "max-length-bytes": quota.max_bytes,
            "overflow": "reject-publish",
            "dead-letter-routing-key": team,
        },
        priority=QUOTA_PRIORITY,
    )
    await admin.put_policy(
        control_policy(settings),
        pattern=f"^{re.escape(topology.control_queue(''))}",
        definition={"max-length-bytes": CONTROL_MAX_BYTES, "overflow": "reject-publish"},
    )
    await admin.put_policy(
        reply_policy(settings),
        pattern=topology.team_reply_queues_pattern(),
        definition=Bound.of(settings).policy(),
    )


@dataclass(frozen=True)
class UserLimits:
    max_connections: int
    max_channels: int


def user_limits(settings: Settings, config: TeamConfig) -> UserLimits:
    """The team's broker user limits: its own, else the gateway's defaults."""
    return UserLimits(
        config.max_connections or settings.team_max_connections,
        config.max_channels or settings.team_max_channels,
    )


async def _put_limits(
    admin: BrokerAdmin, settings: Settings, user: str, config: TeamConfig
) -> None:
    limits = user_limits(settings, config)
    await admin.put_user_limit(user, "max-connections", limits.max_connections)
    await admin.put_user_limit(user, "max-channels", limits.max_channels)


async def details(settings: Settings, name: str) -> tuple[Team, TeamSecurity]:
    """The team and its security settings, for ``teams show``."""
    pool = await create_pool(settings)
    try:
        team = await _registered(pool, name)
        security = await get_security(pool, name)
    finally:
        await pool.close()
    if team is None:
        raise _no_team(name)
    return team, security


def _no_team(name: str) -> ConfigError:
    return ConfigError(f"no team named {name}: list them with queuegate teams list")


async def _registered(pool: asyncpg.Pool, name: str) -> Team | None:
    """``get_team``, its refusal of a row it cannot read naming the commands that repair it."""
    try:
        return await get_team(pool, name)
    except ConfigError as exc:
        shown = clipped(name)
        raise ConfigError(
            f"{exc}: workers skip the team; set its fields again with queuegate teams set "
            f"{shown} (--unset FIELD clears one), or stop it with queuegate teams disable {shown}"
        ) from None


async def _limits_config(pool: asyncpg.Pool, name: str) -> TeamConfig:
    """The team's config for its broker user's limits: the gateway's defaults while its row
    cannot be read (``teams show`` names why) or is gone."""
    try:
        team = await get_team(pool, name)
    except ConfigError:
        return TeamConfig()
    return TeamConfig() if team is None else team.config


async def stored_models(settings: Settings, name: str) -> dict[str, Any]:
    """The team's per-model limits as stored, unchecked, for ``teams set --model`` to add to
    (``configure`` checks the result): none while its config is no JSON object."""
    async with await create_pool(settings) as pool:
        stored = await stored_config(pool, name)
    if stored is None:
        raise _no_team(name)
    models = stored.fields.get("models")
    return models if isinstance(models, dict) else {}


BROKER_FIELDS = ("max_queue_length", "max_queue_bytes", "max_connections", "max_channels")
"""The config fields the broker enforces (the queue's policy, the user's limits): only a
change of one of them needs the management API."""


@dataclass(frozen=True)
class Configured:
    config: TeamConfig
    replaced: str | None
    """What the stored config was when it was no JSON object and is replaced whole."""
    change: Change
    """The registry write (``in_force`` waits for it)."""


async def configure(
    settings: Settings, name: str, changes: dict[str, Any], storing: Storing | None = None
) -> Configured:
    """Merge ``changes`` (None clears a field) into the team's config and store it; when a
    broker-side field changes, apply the queue quota as a broker policy (a queue's own
    arguments cannot change once declared) and the user's limits first, in the transaction
    that stores the row, so that a broker refusing them leaves the team unchanged.

    Merged into the config as stored, so a row no longer valid (a bound added since it was
    written) is repaired by changing or clearing the field the error names; a stored config
    that is no JSON object (written with SQL) is replaced by what is set.
    Running workers and front doors are told the rest when it commits (``set_team_config``).
    """
    pool = await create_pool(settings)
    try:
        stored = await stored_config(pool, name)
        if stored is None:
            raise _no_team(name)
        try:
            config = TeamConfig.model_validate(stored.fields | changes)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = [str(part) for part in first["loc"]]
            if loc[0] == "models" and len(loc) > 1:
                clear = f"--model {loc[1]}:"  # that model's limits; --unset models, every one's
            else:
                clear = f"--unset {loc[0]}"
            raise ConfigError(
                f"team {name}: {'.'.join(loc)}: {first['msg']}: give another value "
                f"(or clear it: {clear})"
            ) from None
        try:
            before = ledger_scopes(name, TeamConfig.model_validate(stored.fields))
        except ValidationError:
            before = []  # workers skip an invalid row: it held no ledger
        # Ledgers a budget starts to hold the team to: while it had none, nothing kept them
        # (no reserve, no settle, no reconciliation), so they are brought up to date at once.
        fresh = [scope for scope in ledger_scopes(name, config) if scope not in before]
        broker = None
        if any(stored.fields.get(field) != getattr(config, field) for field in BROKER_FIELDS):
            user = (await get_security(pool, name)).broker_user
            broker = _BrokerSide(settings, name, user, config)
        storing = storing or Storing()

        async def committing() -> None:
            if broker is not None:
                await broker.apply()
            storing.sent = True

        try:
            change = await set_team_config(pool, name, config, before_commit=committing)
        except (OSError, asyncpg.PostgresError) as exc:
            if broker is None or not broker.applied:
                raise
            # The commit failed once the broker had its side: say which side holds what.
            raise ServiceUnavailable(
                f"team {name}: the broker applies its new queue quota and user limits, but "
                f"the registry did not store them ({exc}): run the same command again"
            ) from exc
        if change is None:
            raise _no_team(name)  # removed by hand since it was read
        storing.stored.set()
        if fresh:
            await _reconcile_ledgers(settings, pool, name, fresh, storing.within)
    finally:
        await pool.close()
    return Configured(config, stored.unreadable, change)


@dataclass
class _BrokerSide:
    """The broker's side of a team's config: its queue's quota policy, its user's limits."""

    settings: Settings
    team: str
    user: str | None
    config: TeamConfig
    applied: bool = False

    async def apply(self) -> None:
        """Raises, the registry's side rolling back with it, when the broker refuses."""
        writing = False
        try:
            async with BrokerAdmin.of(self.settings) as admin:
                # Before any write: a user who may not make them changes nothing at all.
                await admin.check_administrator()
                writing = True
                await put_quota(admin, self.settings, self.team, self.config)
                if self.user is not None:
                    await _put_limits(admin, self.settings, self.user, self.config)
        except GatewayError as exc:
            if writing:
                raise ServiceUnavailable(
                    f"team {self.team}: the registry is unchanged, but the broker may hold "
                    f"part of its new queue quota and user limits ({exc}): run the same "
                    "command again once the management API answers"
                ) from exc
            raise type(exc)(
                f"team {self.team} is unchanged: {exc} (only max queue, queue bytes, "
                "connections and channels need the management API)"
            ) from exc
        self.applied = True


async def _reconcile_ledgers(
    settings: Settings, pool: asyncpg.Pool, name: str, scopes: list[Scope], within: float
) -> None:
    """Reconcile the team's ``scopes`` ledgers with usage_log now, once the config that
    budgets them is committed (the jobs reserving from then on keep their entries): spend
    made while the team had no budget is not in them, and a budget set below it would be
    served over until accounting's next reconciliation."""
    client = redis_for(settings)
    token = reconciler_token()
    try:
        # Bounded: Redis (or an accountant's reconciliation round) must not hold the command.
        async with asyncio.timeout(within):
            keys = Keys(settings.redis_prefix)
            while True:
                done = await reconcile(client, pool, keys, scopes, current_month(), token=token)
                if done is not None:
                    return
                await asyncio.sleep(0.05)  # another reconciler's round, well under a second
    except (RedisError, OSError, TimeoutError, asyncpg.PostgresError) as exc:
        # Named by what failed: the round reads usage_log too, and a PostgreSQL that hangs
        # there ends it by the bound as a hung Redis does; a Redis that answers a PING at
        # once was not what it waited for.
        if isinstance(exc, TimeoutError) and await _answers(client):
            why = (
                f"PostgreSQL did not answer within {within:g} s; set the budget again once "
                "it answers"
            )
        elif isinstance(exc, RedisError | TimeoutError):
            why = redis_unreachable(settings, "start it and set the budget again")
        else:
            why = f"PostgreSQL could not be read ({type(exc).__name__}); set the budget again"
        raise StoredUnconfirmed(
            f"team {name}'s budget is set, but its spend ledger is not brought up to date "
            f"(accounting does within QUEUEGATE_SPEND_RECONCILE_INTERVAL): {why}"
        ) from exc
    finally:
        await client.aclose()


PING_WAIT = 0.25
"""Seconds a Redis that is up answers a PING in, asked to tell it from a PostgreSQL that hung
(well inside the half second a command may end past its bound)."""


async def _answers(client: aioredis.Redis) -> bool:
    """Whether Redis answers a PING within ``PING_WAIT``."""
    try:
        async with asyncio.timeout(PING_WAIT):
            await client.ping()
    except (RedisError, OSError, TimeoutError):
        return False
    return True


IN_FORCE_POLL = 0.05
"""Seconds between two looks at the workers' snapshots while ``in_force`` waits."""
IN_FORCE_SAY_AFTER = 0.5
"""Seconds of waiting after which ``in_force`` says it waits: workers told of a change
confirm it within milliseconds, with no progress line."""
REPORTS = 2
"""Live-stats intervals ``in_force`` looks for live workers when it finds none at first and
PostgreSQL says some of the namespace are connected (``workers_connected``).

Redis that lost its data (flushed, restarted empty) holds no live entry until each worker's
next live-stats write, ``stats_interval`` later at most, though the workers run and apply the
change at once: looking once, the command would say that none runs and confirm nothing. Two
intervals let every worker write again, a slow write included. Nothing in Redis tells a loss
from a namespace no worker runs in (the memory epoch, ``Keys.memory_epoch``, is missing after
a loss while no job comes, as where no worker ever ran), so PostgreSQL, whose sessions Redis
cannot lose, is asked which: a command run while no worker runs says so at once. Asked in
vain, it looks all the same."""


@dataclass(frozen=True)
class InForce:
    """Which live workers confirmed serving under a registry write (``in_force``)."""

    workers: list[str]
    """The workers live when the wait began (those whose live snapshot had not expired), or,
    when none was, those found live within ``reports_within``, less those that withdrew it
    since, stopping cleanly (``LiveStatsWriter.withdraw``)."""
    pending: list[str]
    """Those of them that did not confirm it within the wait: stalled, dead, cut off from
    PostgreSQL or Redis, or of an earlier version (which records no registry version)."""
    looked: float
    """Seconds it looked for live workers, none being live when it began (``REPORTS``): 0
    when there were, or when PostgreSQL said none of the namespace is connected."""
    connected: int | None = None
    """When none was live at first: the connections the namespace's workers hold in
    PostgreSQL (``workers_connected``), None when it could not tell in time. Workers
    connected that never reported (stalled, draining, cut off from Redis) leave the change
    unconfirmed, not "no worker is running"."""
    unanswered: bool = False
    """PostgreSQL, asked for ``connected``, did not answer within the wait (a hung server):
    not asked again, nor waited for past it."""


def reports_within(settings: Settings, within: float) -> float:
    """Seconds ``in_force``, waiting up to ``within``, looks for live workers when it finds
    none at first, and some may run (``REPORTS``)."""
    return min(within, REPORTS * settings.stats_interval)


async def workers_connected(settings: Settings) -> int | None:
    """How many connections to PostgreSQL the namespace's workers hold (each holds some while
    it runs, ``worker_application_name``), or None if PostgreSQL cannot be asked."""
    try:
        async with connection(settings) as conn:
            count: int = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                worker_application_name(settings.namespace),
            )
    except ServiceUnavailable:  # not answering, or refusing the credentials
        return None
    except DB_ERRORS:  # lost, or refused, mid-query
        return None
    return count


async def in_force(
    settings: Settings,
    change: Change,
    within: float,
    waiting: Callable[[int, int], None] = lambda pending, workers: None,
) -> InForce:
    """Wait up to ``within`` seconds until every live worker serves under a registry version
    that sees ``change`` (each records its version in its live snapshot, once it serves every
    team under it); ``waiting(pending, workers)`` once if some have not after
    ``IN_FORCE_SAY_AFTER`` seconds, ``waiting(0, 0)`` if none was found live by then.

    The workers are those live when the wait begins: one that stops reporting meanwhile (dead,
    or stalled and so not reading the change either) is waited for to the end and named, one
    that withdraws as it stops cleanly (it takes no job under any config) is waited for no
    more, and one started meanwhile reads the registry as it starts. When none is live but
    PostgreSQL does not say that none of the namespace is connected, those found within
    ``reports_within`` are, waited for that long at least (``REPORTS``: Redis may have lost
    their entries).
    ServiceUnavailable when Redis does not answer in time."""
    client = redis_for(settings)
    keys = Keys(settings.redis_prefix)
    workers: list[str] | None = None
    confirmed: set[str] = set()
    withdrawn: set[str] = set()
    gathering = 0.0  # until when (seconds into the wait) workers found join those awaited
    asking: asyncio.Task[int | None] | None = None
    said = False
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        async with asyncio.timeout(within):
            while True:
                live = await read_workers(client, keys)
                snapshots = live.snapshots
                waited = loop.time() - start
                if workers is None:
                    workers = sorted(snapshots)
                    # None live: Redis may have lost their entries, unless none runs (REPORTS).
                    # Asked beside the reads: a PostgreSQL that hangs must not stop them.
                    if not workers:
                        gathering = reports_within(settings, within)
                        asking = asyncio.create_task(workers_connected(settings))
                if asking is not None and asking.done() and asking.result() == 0:
                    gathering = 0.0
                if waited < gathering:
                    workers = sorted({*workers, *snapshots})
                confirmed |= {
                    name
                    for name in workers
                    if (version := snapshots.get(name, {}).get("registry")) is not None
                    and sees(version, change)
                }
                withdrawn |= {name for name in workers if name not in live.listed}
                pending = [name for name in workers if name not in confirmed | withdrawn]
                if not pending and waited >= gathering:
                    break
                if not said and waited >= IN_FORCE_SAY_AFTER and (pending or not workers):
                    said = True
                    waiting(len(pending), len(workers))
                await asyncio.sleep(IN_FORCE_POLL)
    except TimeoutError:
        if workers is None:
            raise ServiceUnavailable(
                f"the change is stored, but no worker's confirmation was read within "
                f"{within:g} s: {redis_unreachable(settings)}"
            ) from None
    except (RedisError, OSError) as exc:
        raise ServiceUnavailable(
            "the change is stored, but no worker's confirmation could be read: "
            + redis_unreachable(settings, cause=exc)
        ) from exc
    finally:
        await client.aclose()
        if asking is not None and not asking.done():
            asking.cancel()  # not answered within the wait: it cannot tell
            with contextlib.suppress(asyncio.CancelledError):
                await asking
    assert workers is not None
    unanswered = asking is not None and asking.cancelled()
    return InForce(
        [name for name in workers if name not in withdrawn],
        [name for name in workers if name not in confirmed | withdrawn],
        gathering,
        None if asking is None or unanswered else asking.result(),
        unanswered,
    )
