"""A batch collected only after it ran gets every answer, though its results queue is full.

Past its bound the results queue refuses results; the jobs are served and paid all the
same, and collect asks for them again, answered from their stored outcomes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aio_pika
import pytest

from producer import batch_status, collect, submit_batch
from queuegate.settings import Settings
from queuegate.topology import Topology
from tests.batch_files import openai_line, read_jsonl, write_jsonl
from tests.support import running_gateway
from tests.teams import TeamIdentity, team_identities

LINES = 40
BOUND = 4096
"""Bytes of the results queue: a dozen results, well under the batch's."""


@pytest.fixture
async def alpha(settings: Settings) -> AsyncIterator[TeamIdentity]:
    """A team added the default way (its own broker user); its results queue deleted after."""
    async with team_identities(settings) as identities:
        yield identities["alpha"]
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(Topology(settings.namespace).results_queue("alpha", "late"))


async def test_a_batch_collected_after_it_ran_gets_every_answer_paid_once(
    settings: Settings, tmp_path: Path, alpha: TeamIdentity
) -> None:
    # Given a batch whose results take several times its results queue (4 KiB)
    # When it is collected only once every job was served
    # Expect every line answered with its own result, each request called and accounted once
    await collected_late(settings, tmp_path, alpha, deadline=timedelta(seconds=60))


async def test_a_batch_collected_past_its_deadline_still_gets_its_stored_answers(
    settings: Settings, tmp_path: Path, alpha: TeamIdentity
) -> None:
    # Given the same, collected once every job was served and its deadline passed
    # Expect the same: the broker drops no job sent again, and no worker calls one
    await collected_late(settings, tmp_path, alpha, deadline=timedelta(seconds=8), past=True)


async def collected_late(
    settings: Settings,
    tmp_path: Path,
    alpha: TeamIdentity,
    *,
    deadline: timedelta,
    past: bool = False,
) -> None:
    bounded = {"reply_queue_max_bytes": BOUND}
    settings = settings.model_copy(update=bounded)
    team = alpha.settings.model_copy(update=bounded)
    source = write_jsonl(tmp_path / "late.jsonl", [openai_line(i) for i in range(LINES)])
    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    async with running_gateway(settings) as gw:
        await submit_batch(team, source, deadline=deadline, **alpha.who)
        rows = await gw.usage_rows(LINES)
        refused = sum(1 for row in rows if not row["reply_delivered"])
        if past:
            # The deadline is a time, not an event: nothing announces that it passed.
            status = await batch_status(team, "late", **alpha.who)
            await asyncio.sleep(max(0.0, (status.deadline - datetime.now(UTC)).total_seconds()))
        report = await collect(team, "late", out, errors, idle=0.2, expiry_grace=0, **alpha.who)
        calls = gw.mock.stats.calls
        rows = await gw.usage_rows(LINES)

    assert refused > 0, "the results queue refused none: the batch does not test it"
    lines = read_jsonl(out)
    assert errors.read_bytes() == b""
    assert sorted(line["custom_id"] for line in lines) == sorted(f"req-{i}" for i in range(LINES))
    for line in lines:
        n = line["custom_id"].removeprefix("req-")
        assert line["response"]["status_code"] == 200
        assert f"Question {n}" in line["response"]["body"]["choices"][0]["message"]["content"]
    assert report.counts.done == LINES and report.counts.expired == 0
    assert calls == LINES
    assert len(rows) == LINES == len({row["job_id"] for row in rows})
