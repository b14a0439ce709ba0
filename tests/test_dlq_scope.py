"""A team's flood of dead letters slows no command about another team: a command scoped to a
team (``--team``) reads only the queues that can hold its letters, a list stops once it has
its ``--limit``, and each queue has its own lock, so commands about different teams do not
wait on each other."""

from __future__ import annotations

import asyncio
import logging

import pytest
from aio_pika.abc import AbstractChannel

from queuegate import dlq
from queuegate.settings import Settings
from queuegate.topology import Topology
from tests.support import dlq_cli, publish_dead_letters

FLOOD = 3000


async def returns(channel: AbstractChannel, queue: str, count: int) -> list[int]:
    """How often each of the queue's first ``count`` letters was returned to it (a quorum
    queue's ``x-delivery-count``), left there in their order."""
    source = await channel.get_queue(queue)
    taken = [await source.get(no_ack=False) for _ in range(count)]
    for message in taken:
        await message.nack(requeue=True)
    return [int((message.headers or {}).get("x-delivery-count", 0)) for message in taken]


async def test_commands_about_one_team_read_none_of_another_teams_flood(
    settings: Settings, direct: AbstractChannel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given alpha's dead letters flooded with 3,000 letters, and five of beta's
    topology = Topology.of(settings)
    flood = await publish_dead_letters(settings, direct, "alpha", FLOOD)
    beta = await publish_dead_letters(settings, direct, "beta", 5)

    # When the operator lists three of beta's letters
    listed, _ = await dlq_cli(settings, "list", "--team", "beta", "--limit", "3")

    # Expect them listed, having read beta's first three letters alone: none of alpha's
    # taken and returned, nor beta's last two
    assert [line.split()[0] for line in listed.splitlines() if "beta-" in line] == beta[:3]
    assert await returns(direct, topology.team_dead_queue("alpha"), 1) == [0]
    assert await returns(direct, topology.team_dead_queue("beta"), 5) == [1, 1, 1, 0, 0]

    # When another command reads alpha's letters meanwhile (it holds alpha's queue), and the
    # operator shows and drops one of beta's, and lists beta's, waiting at most half a second
    monkeypatch.setenv("QUEUEGATE_DLQ_LOCK_WAIT", "0.5")
    async with (
        dlq._reading(settings) as reader,
        dlq._held(reader, topology.team_dead_queue("alpha"), limit=1),
    ):
        shown, _ = await dlq_cli(settings, "show", beta[1], "--team", "beta")
        dropped, _ = await dlq_cli(settings, "drop", beta[3], "--team", "beta")
        after = await dlq.peek(settings.model_copy(update={"dlq_lock_wait": 0.5}), team="beta")

    # Expect each served at once, and every letter of alpha's there, in its order
    assert shown.startswith(f"{beta[1]}  reason: unknown_model")
    assert f"dropped {beta[3]} (unknown_model, from beta)" in dropped
    assert [x.message_id for x in after[0]] == [x for x in beta if x != beta[3]]
    assert [x.message_id for x in (await dlq.peek(settings, team="alpha"))[0]] == flood


class _Waits(logging.Handler):
    """Sets ``event`` once a dlq command logs that it waits for the lock ``lock`` (its first
    attempt refused)."""

    def __init__(self, lock: str) -> None:
        super().__init__(logging.DEBUG)
        self.awaited, self.event = lock, asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.args and record.args[0] == self.awaited:
            self.event.set()


async def test_a_drop_by_id_alone_holds_no_lock_of_its_letters_team_while_reading_another(
    settings: Settings,
    direct: AbstractChannel,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given five letters of alpha, and beta's queue flooded (it sorts after alpha's, so a
    # drop without --team reads it after alpha's)
    topology = Topology.of(settings)
    alpha = await publish_dead_letters(settings, direct, "alpha", 5)
    flood = await publish_dead_letters(settings, direct, "beta", FLOOD // 10)
    beta_lock = topology.dead_lock_queue(topology.team_dead_queue("beta"))
    waits = _Waits(beta_lock)
    logger = logging.getLogger(dlq.__name__)
    caplog.set_level(logging.DEBUG, logger=logger.name)  # clears the loggers' cached levels
    monkeypatch.setattr(logger, "handlers", [*logger.handlers, waits])

    # When the operator drops one of alpha's by its id alone while another command reads
    # beta's letters (the drop waits for them, as for a flood read), and meanwhile lists and
    # shows alpha's letters, waiting at most half a second
    monkeypatch.setenv("QUEUEGATE_DLQ_LOCK_WAIT", "0.5")
    # The drop ended (cancelled, should the test fail) before the namespace is deleted.
    async with (
        asyncio.TaskGroup() as tasks,
        dlq._reading(settings) as reader,
        dlq._held(reader, topology.team_dead_queue("beta"), limit=1),
    ):
        dropping = tasks.create_task(
            dlq.drop(settings.model_copy(update={"dlq_lock_wait": 30.0}), alpha[2])
        )
        await asyncio.wait_for(waits.event.wait(), timeout=20)
        listed, _ = await dlq_cli(settings, "list", "--team", "alpha")
        shown, _ = await dlq_cli(settings, "show", alpha[1], "--team", "alpha")
    dropped = dropping.result()

    # Expect each served at once, all five listed as the drop waited; then the letter
    # dropped once beta's queue was read, the others of both teams there in their order
    assert [line.split()[0] for line in listed.splitlines() if "alpha-" in line] == alpha
    assert shown.startswith(f"{alpha[1]}  reason: unknown_model")
    assert [(x.message_id, x.team) for x in dropped] == [(alpha[2], "alpha")]
    left = (await dlq.peek(settings))[0]
    assert [x.message_id for x in left] == [x for x in alpha if x != alpha[2]] + flood
