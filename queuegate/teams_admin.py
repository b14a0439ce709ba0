"""What ``queuegate teams`` does: the registry row, the team's queue, and its identity."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
from pydantic import ValidationError

from queuegate.broker import connect
from queuegate.db import create_pool
from queuegate.errors import ConfigError
from queuegate.management import BrokerAdmin
from queuegate.registry import (
    Team,
    TeamConfig,
    add_team,
    check_team_name,
    disable_team,
    get_team,
    list_teams,
    set_team_config,
)
from queuegate.settings import Settings
from queuegate.tenancy import (
    Capture,
    IdentityMode,
    PiiPolicy,
    TeamSecurity,
    add_api_key,
    broker_user,
    get_security,
    new_password,
    permissions,
    put_security,
    revoke_api_keys,
)
from queuegate.topology import Topology


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


async def add(settings: Settings, name: str, *, identity: IdentityMode = "broker") -> Credentials:
    """Register the team, declare its queue, and give it its identity (returned once)."""
    from accounting import migrate

    check_team_name(name)
    pool = await create_pool(settings)
    try:
        await migrate(pool, settings.database_schema)
        await add_team(pool, name)
        connection = await connect(settings.amqp_url, name="queuegate-teams")
        async with connection:
            channel = await connection.channel()
            await Topology(settings.namespace, settings.delivery_limit).declare_team_queue(
                channel, name
            )
        security = (await get_security(pool, name)).model_copy(update={"identity": identity})
        return await _issue(settings, pool, name, security)
    finally:
        await pool.close()


async def rotate(settings: Settings, name: str) -> Credentials:
    """New credentials for the team's identity mode; the old password or keys stop working."""
    pool = await create_pool(settings)
    try:
        teams = {team.name for team in await list_teams(pool)}
        if name not in teams:
            raise ConfigError(f"no team named {name}: list them with queuegate teams list")
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
        await create_broker_user(settings, team, user, password)
        await put_security(pool, team, security.model_copy(update={"broker_user": user}))
        return Credentials("broker", user, password, _with_user(settings.amqp_url, user, password))
    if security.broker_user is not None:
        # No longer the team's identity: a user left behind would still reach the broker.
        async with BrokerAdmin(settings.management_url) as admin:
            await admin.delete_user(security.broker_user)
        security = security.model_copy(update={"broker_user": None})
    await put_security(pool, team, security)
    if security.identity == "api_key":
        await revoke_api_keys(pool, team)
        key_id, key = await add_api_key(pool, team)
        return Credentials("api_key", api_key_id=key_id, api_key=key)
    return Credentials("queue")


async def create_broker_user(settings: Settings, team: str, user: str, password: str) -> None:
    """Create (or re-password) the team's user with only the permissions of ``permissions``.

    Connections opened with the old password are closed: apps reconnect with the new one.
    """
    allowed = permissions(settings.namespace, team)
    async with BrokerAdmin(settings.management_url) as admin:
        await admin.put_user(user, password)
        await admin.close_connections(user, reason="queuegate: credentials rotated")
        await admin.put_permissions(
            user, configure=allowed.configure, write=allowed.write, read=allowed.read
        )
        await admin.put_topic_permissions(
            user, exchange=allowed.topic_exchange, write=allowed.topic_write, read="^$"
        )


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
        if name not in {team.name for team in await list_teams(pool)}:
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
    pool = await create_pool(settings)
    try:
        return await revoke_api_keys(pool, name, key_id=key_id) == 1
    finally:
        await pool.close()


def _with_user(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    if parts.port:
        host = f"{host}:{parts.port}"
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


async def listing(settings: Settings) -> list[Team]:
    pool = await create_pool(settings)
    try:
        return await list_teams(pool)
    finally:
        await pool.close()


async def disable(settings: Settings, name: str) -> bool:
    pool = await create_pool(settings)
    try:
        return await disable_team(pool, name)
    finally:
        await pool.close()


def quota_policy(settings: Settings, team: str) -> str:
    return f"{settings.namespace}-quota-{team}"


async def show(settings: Settings, name: str) -> Team:
    pool = await create_pool(settings)
    try:
        team = await get_team(pool, name)
    finally:
        await pool.close()
    if team is None:
        raise ConfigError(f"no team named {name}: list them with queuegate teams list")
    return team


async def configure(settings: Settings, name: str, changes: dict[str, Any]) -> TeamConfig:
    """Merge ``changes`` (None clears a field) into the team's config, store it, and apply its
    queue quota as a broker policy (a queue's own arguments cannot change once declared).

    Workers pick the rest up at their next registry read.
    """
    team = await show(settings, name)
    merged = team.config.model_dump() | changes
    try:
        config = TeamConfig.model_validate(merged)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        raise ConfigError(f"team {name}: {field}: {first['msg']}") from None
    pool = await create_pool(settings)
    try:
        await set_team_config(pool, name, config)
    finally:
        await pool.close()
    topology = Topology(settings.namespace, settings.delivery_limit)
    async with BrokerAdmin(settings.management_url) as admin:
        if config.max_queue_length is None:
            await admin.delete_policy(quota_policy(settings, name))
        else:
            await admin.put_policy(
                quota_policy(settings, name),
                pattern=f"^{re.escape(topology.team_queue(name))}$",
                definition={"max-length": config.max_queue_length},
            )
    return config
