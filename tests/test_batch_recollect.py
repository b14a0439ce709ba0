"""A batch collected only after it ran gets every answer, though its results queue is full.

Past its bound the results queue refuses results; the jobs are served and paid all the
same, and collect asks for them again, answered from their stored outcomes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from producer import batch_status, collect, submit_batch
from producer.batch import collect_into
from producer.batch.files import ResultFiles
from queuegate.control import Counts, batch_reply_name
from queuegate.errors import BatchError
from queuegate.settings import Settings
from queuegate.topology import Topology
from tests.batch_files import openai_line, read_jsonl, write_jsonl
from tests.support import Gateway, running_gateway
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
        await channel.queue_delete(
            Topology(settings.namespace).results_queue("alpha", batch_reply_name("late"))
        )


async def test_a_batch_collected_after_it_ran_gets_every_answer_paid_once(
    settings: Settings, tmp_path: Path, alpha: TeamIdentity
) -> None:
    # Given a batch whose results take several times its results queue (4 KiB), served
    async with served(settings, tmp_path, alpha, deadline=timedelta(seconds=60)) as late:
        # When it is collected only then
        report = await collect(late.team, "late", late.out, late.errors, **FAST, **alpha.who)
        await late.ends()

    # Expect every line answered with its own result, each request called and accounted once
    late.check(report.counts)


async def test_a_batch_collected_past_its_deadline_still_gets_its_stored_answers(
    settings: Settings, tmp_path: Path, alpha: TeamIdentity
) -> None:
    # Given the same, its deadline passed since it was served
    async with served(settings, tmp_path, alpha, deadline=timedelta(seconds=8)) as late:
        status = await batch_status(late.team, "late", **alpha.who)
        # The deadline is a time, not an event: nothing announces that it passed.
        await asyncio.sleep(max(0.0, (status.deadline - datetime.now(UTC)).total_seconds()))
        # When it is collected
        report = await collect(late.team, "late", late.out, late.errors, **FAST, **alpha.who)
        await late.ends()

    # Expect the same: the broker drops no job sent again, and no worker calls one
    late.check(report.counts)


async def test_a_batch_whose_file_moved_is_collected_from_where_it_is_now(
    settings: Settings, tmp_path: Path, alpha: TeamIdentity
) -> None:
    # Given the same, its file moved since it was submitted
    async with served(settings, tmp_path, alpha, deadline=timedelta(seconds=60)) as late:
        moved = late.source.rename(tmp_path / "moved.jsonl")

        async def fetch() -> Path:
            return moved

        # When it is collected, told where the file is now (as the front door fetches it)
        with ResultFiles(late.out, late.errors) as files:
            report = await collect_into(late.team, "late", files, source=fetch, **FAST, **alpha.who)
        await late.ends()

    # Expect every answer, as from the file where submit read it
    late.check(report.counts)


async def test_a_batch_whose_file_goes_once_collect_read_it_gets_every_answer(
    settings: Settings, tmp_path: Path, alpha: TeamIdentity
) -> None:
    # Given the same, its file fetched for collect (as the front door fetches it) and
    # deleted as soon as collect had it, before the second of the many chunks it asks for
    async with served(settings, tmp_path, alpha, deadline=timedelta(seconds=60)) as late:

        async def fetch() -> Path:
            asyncio.get_running_loop().call_soon(late.source.unlink)
            return late.source

        # When it is collected
        with ResultFiles(late.out, late.errors) as files:
            report = await collect_into(late.team, "late", files, source=fetch, **FAST, **alpha.who)
        await late.ends()

    # Expect every answer: the file is read once, not again for each chunk
    late.check(report.counts)


async def test_a_batch_whose_file_is_gone_says_to_name_it(
    settings: Settings, tmp_path: Path, alpha: TeamIdentity
) -> None:
    # Given the same, its file deleted since it was submitted
    async with served(settings, tmp_path, alpha, deadline=timedelta(seconds=60)) as late:
        late.source.unlink()

        # When it is collected
        # Expect it to stop, saying how to get the answers the queue refused, rather than
        # write them expired at the deadline
        with pytest.raises(BatchError, match="collect again with --file"):
            await collect(late.team, "late", late.out, late.errors, **FAST, **alpha.who)
        assert late.gw.mock.stats.calls == LINES


FAST = {"idle": 0.2, "expiry_grace": 0.0}
"""Collect looks for refused results after 0.2 s without one, and expires nothing late."""


@dataclass
class Late:
    """A batch served before anyone collected it, its results queue refusing most results."""

    gw: Gateway
    team: Settings
    source: Path
    out: Path
    errors: Path
    rows: list[Any] = field(default_factory=list)
    calls: int = 0

    async def ends(self) -> None:
        self.calls = self.gw.mock.stats.calls
        self.rows = await self.gw.usage_rows(LINES)

    def check(self, counts: Counts) -> None:
        lines = read_jsonl(self.out)
        assert self.errors.read_bytes() == b""
        ids = sorted(f"req-{i}" for i in range(LINES))
        assert sorted(line["custom_id"] for line in lines) == ids
        for line in lines:
            n = line["custom_id"].removeprefix("req-")
            assert line["response"]["status_code"] == 200
            content = line["response"]["body"]["choices"][0]["message"]["content"]
            assert f"Question {n}" in content
        assert counts.done == LINES and counts.expired == 0
        assert self.calls == LINES
        assert len(self.rows) == LINES == len({row["job_id"] for row in self.rows})


@asynccontextmanager
async def served(
    settings: Settings, tmp_path: Path, alpha: TeamIdentity, *, deadline: timedelta
) -> AsyncIterator[Late]:
    """Results queues of 4 KiB, and alpha's batch "late" submitted and every job served."""
    bounded = {"reply_queue_max_bytes": BOUND}
    team = alpha.settings.model_copy(update=bounded)
    source = write_jsonl(tmp_path / "late.jsonl", [openai_line(i) for i in range(LINES)])
    async with running_gateway(settings.model_copy(update=bounded)) as gw:
        await submit_batch(team, source, deadline=deadline, **alpha.who)
        rows = await gw.usage_rows(LINES)
        assert any(not row["reply_delivered"] for row in rows), "the queue refused none"
        yield Late(gw, team, source, tmp_path / "out.jsonl", tmp_path / "errors.jsonl")
