"""A dead letter whose refusal reached no one (its reply queue gone) is reported as that, never
as answered: ``dlq replay`` and ``dlq show`` say it was replayed and refused to no one, and
what is left of it; it is not sent again, nor ever called."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from aio_pika.abc import AbstractChannel

from queuegate import dlq
from queuegate.messages import ChatJob
from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from queuegate.topology import Topology
from tests.support import dead_letters, dlq_cli, running_gateway
from tests.teams import register

HELLO = [{"role": "user", "content": "Hello there"}]


async def replayed_back(settings: Settings) -> dlq.DeadLetter:
    """The one dead letter, once a replay of it is dead-lettered again (the broker announces
    no dead-lettering)."""
    async with asyncio.timeout(10):
        while True:
            letters, _ = await dlq.peek(settings)
            if letters and letters[0].then is not None:
                return letters[0]
            await asyncio.sleep(0.02)


async def test_a_replay_refused_for_its_gone_reply_queue_is_not_reported_answered(
    settings: Settings, direct: AbstractChannel
) -> None:
    # Given a job of alpha's that expired in its queue while no worker served alpha (one
    # serving gamma runs), whose reply queue is gone
    await register(settings, "alpha", TeamConfig())
    await Topology(settings.namespace).declare_team_queue(direct, "alpha")
    job = ChatJob(job_id="gone-1", team="alpha", model="gpt-4o-mini", messages=HELLO)
    async with running_gateway(settings, teams=("gamma",)) as gw:
        await gw.publish(
            job.model_dump_json().encode(),
            message_id=job.job_id,
            reply_to=f"{settings.namespace}.nobody",
            expiration=timedelta(milliseconds=1),
        )
        [expired] = await dead_letters(settings, 1)
        assert expired.reason == "expired"
    async with running_gateway(settings) as alpha:
        # ... replayed once the workers serve alpha: refused invalid_request, to no one
        replayed, _ = await dlq.replay(settings, {job.job_id})
        assert [x.message_id for x in replayed] == [job.job_id]
        [row] = await alpha.usage_rows(1)
        letter = await replayed_back(settings)

        # When the operator replays it again, and shows it
        stdout, stderr = await dlq_cli(settings, "replay", job.job_id, exit_code=1)
        shown, _ = await dlq_cli(settings, "show", job.job_id)

        # Expect it refused invalid_request as it died, but not called answered: its
        # refusal reached no one
        told = (
            f"not replayed {job.job_id}: replayed, then refused invalid_request, an answer "
            "that reached no one (its reply queue gone, full or never named): its outcome "
            "is kept only as its usage row (and its stored result, where it was called), "
            f"under its job id; remove the letter with queuegate dlq drop {job.job_id}"
        )
        assert "replayed 0 dead letters" in stdout
        assert " ".join(stderr.split()) == told
        assert "answered" not in stderr
        assert f"not replayable: {told.split(': ', 1)[1]}" in " ".join(shown.split())
        assert letter.reason == "expired" and letter.refused == "invalid_request"
        assert letter.unanswered and letter.answered is None
        # ... its refusal its one usage row, undelivered; never called, never sent again
        assert row["job_id"].startswith(f"{job.job_id}/refused/")
        assert row["error_code"] == "invalid_request" and not row["reply_delivered"]
        assert [x.message_id for x in (await dlq.peek(settings))[0]] == [job.job_id]
        assert len(await alpha.usage_rows(1)) == 1
        assert alpha.mock.stats.calls == 0
