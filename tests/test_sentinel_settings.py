"""Redis behind Sentinel, set wrong or out of reach: said in one line, within a bound, and
never answered by another Redis than the one the deployment meant."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator

import pytest
from pydantic import ValidationError

from queuegate.errors import ServiceUnavailable
from queuegate.registry import TeamConfig
from queuegate.services import REDIS_CHECK_WAIT, check_redis
from queuegate.settings import Settings
from tests.teams import register

REFUSING = "127.0.0.1:18701,127.0.0.1:18702,127.0.0.1:18703"
"""Sentinels nobody listens for (ports of this file's own)."""
GUARD = REDIS_CHECK_WAIT + 50
"""Past this the answer is not coming: a correctness guard, not a target (a hang is endless;
a CLI's start on two cores busy with a loaded suite took more than 20 s beside the wait)."""


@pytest.fixture
async def silent_sentinel() -> AsyncIterator[str]:
    """A Sentinel that accepts connections and never answers (a stopped process)."""
    held: list[asyncio.StreamWriter] = []

    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    # Any free port: a fixed one is taken while another run of this module holds it
    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def failed_cli(env: dict[str, str], *args: str, code: int = 1) -> tuple[str, bytes]:
    """The one line a CLI command that must fail (exit ``code``) wrote to stderr, and its
    stdout."""
    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", *args,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(cli.communicate(), timeout=GUARD)
    assert cli.returncode == code
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1, stderr.decode()
    return lines[0], stdout


@pytest.mark.parametrize("listed", [" ", " , "])
def test_sentinels_set_but_empty_are_refused_rather_than_redis_url_used(
    monkeypatch: pytest.MonkeyPatch, listed: str
) -> None:
    # Given QUEUEGATE_REDIS_SENTINELS set by a template that filled in nothing
    monkeypatch.setenv("QUEUEGATE_REDIS_SENTINELS", listed)
    # Expect the settings refused, saying what to do, rather than QUEUEGATE_REDIS_URL used
    with pytest.raises(ValidationError, match="QUEUEGATE_REDIS_SENTINELS is set but names no"):
        Settings()


def test_sentinels_set_to_nothing_at_all_are_refused_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUEUEGATE_REDIS_SENTINELS", "")
    with pytest.raises(ValidationError, match="or unset it to use QUEUEGATE_REDIS_URL"):
        Settings()


def test_sentinels_unset_mean_redis_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QUEUEGATE_REDIS_SENTINELS", raising=False)
    assert Settings().sentinel_addresses == []


async def test_an_empty_sentinel_list_stops_a_command_in_one_line() -> None:
    # When an operator command starts with the Sentinels set to nothing
    env = {**os.environ, "QUEUEGATE_REDIS_SENTINELS": ""}
    # Expect it to stop before asking any Redis, in one line naming the setting
    line, stdout = await failed_cli(env, "deployments")
    assert "QUEUEGATE_REDIS_SENTINELS is set but names no Sentinel" in line
    assert stdout == b""


@pytest.mark.parametrize("case", ["refusing", "silent"])
async def test_sentinels_out_of_reach_are_reported_within_the_check_bound(
    silent_sentinel: str, case: str
) -> None:
    # Given Sentinels that refuse connections, or one that accepts and never answers
    listed = REFUSING if case == "refusing" else silent_sentinel
    settings = Settings(redis_sentinels=listed)
    # When a process checks that Redis answers, within a second (REDIS_CHECK_WAIT, the
    # processes' bound, is 10 s: the silent Sentinel would hold the test for all of it)
    with pytest.raises(ServiceUnavailable) as unreachable:
        async with asyncio.timeout(GUARD):
            await check_redis(settings, within=1.0)
    # Expect the one line naming the Sentinels and what to do
    said = str(unreachable.value)
    assert f"through the Sentinels at {listed}: start them" in said
    assert "QUEUEGATE_REDIS_SENTINELS" in said


async def test_deployments_with_silent_sentinels_fails_in_one_line(silent_sentinel: str) -> None:
    # When an operator reads the deployments' health through a Sentinel that never answers
    env = {**os.environ, "QUEUEGATE_REDIS_SENTINELS": silent_sentinel}
    # Expect a failure in one line naming the Sentinel, not a wait as long as it hangs
    line, stdout = await failed_cli(env, "deployments")
    assert f"through the Sentinels at {silent_sentinel}" in line
    assert stdout == b""


async def test_disabling_a_team_with_silent_sentinels_fails_in_one_line(
    settings: Settings, silent_sentinel: str
) -> None:
    # Given a registered team
    await register(settings, "alpha", TeamConfig())
    env = {
        **os.environ,
        "QUEUEGATE_NAMESPACE": settings.namespace,
        "QUEUEGATE_DATABASE_SCHEMA": settings.database_schema,
        "QUEUEGATE_REDIS_SENTINELS": silent_sentinel,
    }
    # When an operator disables it while its Sentinel never answers
    # Expect the team disabled and one line saying its sessions are not ended, and why, with
    # the exit status of a change stored but not confirmed (3), not of one refused (1)
    line, _ = await failed_cli(env, "teams", "disable", "alpha", code=3)
    assert "team alpha is disabled, but its dashboard sessions are not ended" in line
    assert f"through the Sentinels at {silent_sentinel}" in line
