"""A batch collected only after it ran gets every answer, though its results queue is full.

Past its bound the results queue refuses results; the jobs are served and paid all the
same, and collect asks for them again, answered from their stored outcomes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import aio_pika
import pytest

from producer import collect, submit_batch
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
    # Given results queues of 4 KiB, and a batch whose results take several times that
    bounded = {"reply_queue_max_bytes": BOUND}
    settings = settings.model_copy(update=bounded)
    team = alpha.settings.model_copy(update=bounded)
    source = write_jsonl(tmp_path / "late.jsonl", [openai_line(i) for i in range(LINES)])
    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    async with running_gateway(settings) as gw:
        # When it is submitted, and collected only once every job was served
        await submit_batch(team, source, deadline=timedelta(seconds=60), **alpha.who)
        await gw.usage_rows(LINES)
        refused = LINES - sum(1 for row in await gw.usage_rows(LINES) if row["reply_delivered"])
        report = await collect(team, "late", out, errors, idle=0.2, **alpha.who)
        calls = gw.mock.stats.calls
        rows = await gw.usage_rows(LINES)

    # Expect the queue to have refused results, and yet every line answered with its own
    # result, each request called once and accounted once
    assert refused > 0
    lines = read_jsonl(out)
    assert errors.read_bytes() == b""
    assert sorted(line["custom_id"] for line in lines) == sorted(f"req-{i}" for i in range(LINES))
    for line in lines:
        n = line["custom_id"].removeprefix("req-")
        assert line["response"]["status_code"] == 200
        assert f"Question {n}" in line["response"]["body"]["choices"][0]["message"]["content"]
    assert report.counts.done == LINES and report.counts.expired == 0
    assert calls == LINES
    assert sorted(row["job_id"] for row in rows) == sorted({row["job_id"] for row in rows})
    assert len(rows) == LINES
