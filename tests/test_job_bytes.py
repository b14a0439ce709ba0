"""A worker takes a job by the size of its request (model, messages, parameters), as the
front door and a batch measure it (``QUEUEGATE_MAX_JOB_BYTES``), whatever the job's own
fields add around it (its id, metadata, deadline), up to ``JOB_OWN_BYTES`` of them."""

from __future__ import annotations

from typing import Any

from queuegate.messages import ChatJob
from queuegate.request_limits import JOB_OWN_BYTES
from queuegate.settings import Settings
from tests.support import running_gateway, sized

JOB_BYTES = 4096
MODEL = "gpt-4o-mini"


async def test_a_worker_serves_a_request_at_the_limit_and_refuses_one_past_it(
    settings: Settings,
) -> None:
    settings = settings.model_copy(update={"max_job_bytes": JOB_BYTES})
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        # Given jobs of the longest id and a producer's metadata: one whose request is
        # exactly the limit, one a byte past it, and one whose own fields are past theirs
        own = {"job_id": "j" * 128, "metadata": {"note": "m" * 1000}}

        def job(size: int, **more: Any) -> ChatJob:
            messages = [{"role": "user", "content": sized(size, MODEL)}]
            return client.job(MODEL, messages).model_copy(update={**own, **more})

        at = job(JOB_BYTES)
        over = job(JOB_BYTES + 1, job_id="k" * 128)
        fat = job(100, job_id="f" * 128, metadata={"note": "m" * (JOB_BYTES + JOB_OWN_BYTES)})
        # When each is published and answered
        results = [await (await client.submit(j)).result(10) for j in (at, over, fat)]

    # Expect the one at the limit served, the others refused saying what is over
    assert [r.status for r in results] == ["ok", "error", "error"]
    assert results[1].error is not None and results[1].error.message == (
        f"job's request is {JOB_BYTES + 1} bytes; the limit is {JOB_BYTES}"
    )
    assert results[2].error is not None and results[2].error.message.endswith(
        f"the limit is {JOB_BYTES + JOB_OWN_BYTES} ({JOB_BYTES} of its request)"
    )
    assert gw.mock.stats.calls == 1
