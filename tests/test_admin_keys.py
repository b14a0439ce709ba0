"""API keys for any team and admin keys: shown once, stored hashed, found by their hash."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import asyncpg
import pytest
from typer.testing import CliRunner

from accounting import migrate
from admin.keys import (
    DisabledTeamKey,
    add_team_key,
    admin_keys,
    issue_admin_key,
    lookup_key,
    revoke_admin_key,
    revoke_team_key,
    team_keys,
)
from cli.main import app
from queuegate.db import create_pool
from queuegate.errors import ConfigError
from queuegate.registry import add_team, disable_team
from queuegate.settings import Settings
from queuegate.tenancy import TeamSecurity, hash_api_key, new_api_key, put_security

runner = CliRunner()


@pytest.fixture
async def pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(settings)
    await migrate(pool, settings.database_schema)
    await add_team(pool, "alpha")
    await put_security(pool, "alpha", TeamSecurity(identity="broker", broker_user="qg.alpha"))
    await add_team(pool, "beta")
    yield pool
    await pool.close()


async def test_a_broker_identity_team_gets_keys_that_lookup_finds_until_revoked(
    pool: asyncpg.Pool,
) -> None:
    # Given two keys issued to alpha, whose jobs prove themselves by broker user
    first = await add_team_key(pool, "alpha")
    second = await add_team_key(pool, "alpha")

    # When each is presented, then the first is revoked
    found = await lookup_key(pool, first.key)
    revoked = await revoke_team_key(pool, "alpha", first.key_id)

    # Expect each found as alpha's, by its hash; the revoked one no longer, the other still
    assert found is not None and not found.is_admin
    assert (found.team, found.key_id, found.key_hash) == (
        "alpha",
        first.key_id,
        hash_api_key(first.key),
    )
    assert revoked and await lookup_key(pool, first.key) is None
    still = await lookup_key(pool, second.key)
    assert still is not None and still.team == "alpha" and still.key_id == second.key_id
    # ... and listed with when they were made and revoked
    listed = await team_keys(pool, "alpha")
    assert [k.key_id for k in listed] == [first.key_id, second.key_id]
    assert listed[0].revoked_at is not None and listed[1].revoked_at is None
    assert await team_keys(pool, "beta") == []


async def test_one_teams_key_revokes_nothing_of_another_team(pool: asyncpg.Pool) -> None:
    alpha = await add_team_key(pool, "alpha")
    assert not await revoke_team_key(pool, "beta", alpha.key_id)
    assert await lookup_key(pool, alpha.key) is not None


async def test_admin_keys_are_found_as_admin_until_revoked(pool: asyncpg.Pool) -> None:
    issued = await issue_admin_key(pool, "ops dashboard")
    owner = await lookup_key(pool, issued.key)

    assert issued.key.startswith(f"qga_{issued.key_id}_")
    assert owner is not None and owner.is_admin and owner.team is None
    assert (owner.key_id, owner.key_hash) == (issued.key_id, hash_api_key(issued.key))
    [listed] = await admin_keys(pool)
    assert (listed.key_id, listed.label, listed.revoked_at) == (
        issued.key_id,
        "ops dashboard",
        None,
    )

    assert await revoke_admin_key(pool, issued.key_id)
    assert await lookup_key(pool, issued.key) is None
    assert not await revoke_admin_key(pool, issued.key_id)
    [listed] = await admin_keys(pool)
    assert listed.revoked_at is not None


async def test_unknown_keys_are_not_found_and_a_disabled_teams_key_is_told_apart(
    pool: asyncpg.Pool,
) -> None:
    beta = await add_team_key(pool, "beta")
    await disable_team(pool, "beta")

    # A real key whose team is disabled serves nothing, and is not a wrong key
    assert await lookup_key(pool, beta.key) == DisabledTeamKey(team="beta")
    assert await lookup_key(pool, new_api_key()[1]) is None
    assert await lookup_key(pool, "") is None


async def test_keys_of_unknown_teams_and_long_labels_are_refused(pool: asyncpg.Pool) -> None:
    with pytest.raises(ConfigError, match="no team named nobody"):
        await add_team_key(pool, "nobody")
    with pytest.raises(ConfigError, match="no team named nobody"):
        await team_keys(pool, "nobody")
    with pytest.raises(ConfigError, match="keep it to 200"):
        await issue_admin_key(pool, "x" * 201)


async def test_no_key_is_stored_only_its_hash(pool: asyncpg.Pool) -> None:
    keys = [(await add_team_key(pool, "alpha")).key, (await issue_admin_key(pool)).key]
    tables = [
        str([dict(row) for row in await pool.fetch(f"SELECT * FROM {table}")])
        for table in ("api_keys", "admin_keys")
    ]
    for key in keys:
        assert not any(key in text or key.split("_", 2)[2] in text for text in tables)
        assert any(hash_api_key(key) in text for text in tables)


def test_key_commands_show_a_key_once_and_list_only_ids(settings: Settings) -> None:
    env = {
        "QUEUEGATE_NAMESPACE": settings.namespace,
        "QUEUEGATE_DATABASE_SCHEMA": settings.database_schema,
    }
    added = runner.invoke(app, ["teams", "add", "alpha", "--identity", "queue"], env=env)
    assert added.exit_code == 0, added.output

    # A team key: printed once, then listed by id alone, then revoked
    issued = runner.invoke(app, ["teams", "add-key", "alpha"], env=env)
    assert issued.exit_code == 0, issued.output
    [(key_id, key)] = re.findall(r"\((\w{12})\): (qg_\w{12}_\S+)", issued.output)
    assert "shown once" in issued.output
    listed = runner.invoke(app, ["teams", "keys", "alpha"], env=env)
    assert key_id in listed.output and key not in listed.output
    revoked = runner.invoke(app, ["teams", "revoke-key", "alpha", key_id], env=env)
    assert revoked.exit_code == 0 and f"key {key_id} of team alpha is revoked" in revoked.output

    # An admin key: the same, with its label
    issued = runner.invoke(app, ["admin-key", "issue", "--label", "ops"], env=env)
    assert issued.exit_code == 0, issued.output
    [(admin_id, admin_key)] = re.findall(r"\((\w{12})\): (qga_\w{12}_\S+)", issued.output)
    listed = runner.invoke(app, ["admin-key", "list"], env=env)
    assert admin_id in listed.output and "ops" in listed.output
    assert admin_key not in listed.output
    assert runner.invoke(app, ["admin-key", "revoke", admin_id], env=env).exit_code == 0
    again = runner.invoke(app, ["admin-key", "revoke", admin_id], env=env)
    assert again.exit_code == 1 and f"no live admin key {admin_id}" in str(again.exception)
    unknown = runner.invoke(app, ["teams", "add-key", "gamma"], env=env)
    # (the runner calls the app, not main(), which would print it in one line)
    assert isinstance(unknown.exception, ConfigError)
    assert "no team named gamma" in str(unknown.exception)
