"""Names matched whole where they enter; a bad registry row never stops a worker."""

from __future__ import annotations

import pytest

from producer.batch.jobs import check_batch_name
from queuegate.db import create_pool
from queuegate.errors import BatchError, ConfigError
from queuegate.registry import TeamConfig, check_team_name
from queuegate.settings import Settings
from queuegate.topology import Topology
from tests.support import running_gateway, wait_until
from tests.teams import register

HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.mark.parametrize("name", ["evil\n", "evil\r\n", "Evil", "", "-evil", "a" * 65])
def test_a_team_name_is_matched_whole(name: str) -> None:
    with pytest.raises(ConfigError, match="is invalid"):
        check_team_name(name)


def test_a_batch_name_is_matched_whole() -> None:
    with pytest.raises(BatchError, match="is not valid"):
        check_batch_name("nightly\n")


@pytest.mark.parametrize("name", ["nightly\n", "night.ly", "night ly", ""])
def test_a_reply_queue_name_is_matched_whole(name: str) -> None:
    with pytest.raises(ConfigError, match="reply queue name"):
        Topology("ns").results_queue("alpha", name)


async def test_a_worker_serving_every_team_skips_bad_registry_rows_and_serves_the_rest(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a good team, and rows written around `teams add`: a name with a trailing newline,
    # one of the gateway's own names, a team whose config no version accepts, and one whose
    # config nests 3,000 arrays (6 KB: before, its read failed every registry read, and no
    # worker of any team served)
    await register(settings, "alpha", TeamConfig())
    deep = '{"x": ' + "[" * 3000 + "]" * 3000 + "}"
    pool = await create_pool(settings)
    try:
        for name in ("evil\n", "dead"):
            await pool.execute("INSERT INTO teams (name) VALUES ($1)", name)
        await pool.execute(
            "INSERT INTO teams (name, config) VALUES ('beta', '{\"rpm\": -1}'::jsonb)"
        )
        await pool.execute(
            "INSERT INTO teams (name, config) VALUES ('gamma', $1::text::jsonb)", deep
        )
    finally:
        await pool.close()
    # When a worker serving every team in the registry starts
    async with running_gateway(settings, teams=()) as gw, gw.client("alpha") as client:
        await wait_until(lambda: gw.worker.teams == ["alpha"])
        # Expect the good team served, and each bad row named in the log
        result = await client.chat("gpt-4o-mini", HELLO, timeout=10)
        assert result.status == "ok", result.error
    skipped = [r.getMessage() for r in caplog.records if "is not served" in r.getMessage()]
    for name in ("'evil\\n'", "'dead'", "'beta'", "'gamma'"):
        assert any(name in line for line in skipped), (name, skipped)
    assert any("JSON nested too deep to read" in line for line in skipped), skipped
    # and the row under the gateway's own name with how to remove it, which no `teams`
    # command takes (before: "pick another", and `queuegate status` sent the operator to
    # `teams show dead`, which refused the name)
    assert any("DELETE FROM teams WHERE name = 'dead'" in line for line in skipped), skipped
