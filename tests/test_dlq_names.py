"""``queuegate dlq`` checks the names it is given and creates nothing: a namespace without
dead-letter queues (a typo), an unknown team or reason is refused in one line, saying what
to do, rather than answered "(none)"."""

from __future__ import annotations

import asyncpg
from aio_pika.abc import AbstractChannel

from queuegate.management import BrokerAdmin
from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from queuegate.topology import Topology
from tests.support import dlq_cli, publish_dead_letters
from tests.teams import register


async def test_a_namespace_without_dead_letter_queues_is_refused_and_nothing_created(
    settings: Settings,
) -> None:
    # Given a namespace the broker has nothing of (a misspelled one)
    topology = Topology.of(settings)

    # When the operator lists, purges and drops its dead letters
    listed = await dlq_cli(settings, "list", exit_code=1)
    purged = await dlq_cli(settings, "purge", "--yes", exit_code=1)
    dropped = await dlq_cli(settings, "drop", "some-job", exit_code=1)

    # Expect each refused in one line naming the namespace and what to do, and no queue nor
    # exchange of the namespace on the broker
    expected = [
        f"error: namespace {settings.namespace!r} (QUEUEGATE_NAMESPACE) has no dead-letter "
        "queues: check its spelling, or start a worker or run queuegate teams add TEAM, "
        "which declare them"
    ]
    assert [x[1].splitlines() for x in (listed, purged, dropped)] == [expected] * 3
    assert all(x[0] == "" for x in (listed, purged, dropped))
    async with BrokerAdmin.of(settings) as admin:
        assert [q for q in await admin.queues() if q.startswith(f"{settings.namespace}.")] == []
        assert await admin.bound_queues(topology.dead_teams_exchange) == []
        assert await admin.queue(topology.dead_queue) is None


async def test_an_unknown_team_or_reason_is_refused_and_a_registered_team_listed_empty(
    settings: Settings, direct: AbstractChannel
) -> None:
    # Given a namespace with alpha's dead letters, and beta registered with none
    await publish_dead_letters(settings, direct, "alpha", 2)
    await register(settings, "beta", TeamConfig())

    # When the operator lists those of a team that does not exist, of beta, and for a
    # reason that does not exist
    unknown = await dlq_cli(settings, "list", "--team", "nosuchteam", exit_code=1)
    beta, _ = await dlq_cli(settings, "list", "--team", "beta")
    bogus = await dlq_cli(settings, "list", "--reason", "bogus", exit_code=1)

    # Expect the unknown team and reason refused in one line each, saying what is valid, and
    # beta's letters listed: none
    assert unknown[1].splitlines() == [
        "error: no team 'nosuchteam' has dead letters or is registered: list the teams with "
        "queuegate teams list"
    ]
    assert "(none)" in beta
    assert bogus[1].splitlines() == [
        "error: no dead letter is listed for the reason 'bogus': give one of "
        "delivery_limit, expired, idempotency_conflict, invalid_request, maxlen, rejected, "
        "unauthorized, unknown, unknown_model"
    ]


async def test_an_unknown_team_is_looked_up_without_creating_the_schema(
    settings: Settings, direct: AbstractChannel
) -> None:
    # Given a namespace with alpha's dead letters, whose schema was never migrated (created)
    await publish_dead_letters(settings, direct, "alpha", 2)

    # When the operator lists those of a team that does not exist
    _, stderr = await dlq_cli(settings, "list", "--team", "nosuchteam", exit_code=1)

    # Expect it refused as no team's, and still no schema: the registry was only read
    assert stderr.startswith("error: no team 'nosuchteam' has dead letters or is registered")
    conn = await asyncpg.connect(settings.database_url)
    try:
        found = await conn.fetchval(
            "SELECT count(*) FROM pg_namespace WHERE nspname = $1", settings.database_schema
        )
    finally:
        await conn.close()
    assert found == 0
