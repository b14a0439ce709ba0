"""``GET /v1/jobs/{id}?wait=N``: the answer of a job the front door published, by id.

For an async job (``Prefer: respond-async``, which a chat route answers with
``frontdoor.async_answers.respond_async``), a caller that disconnected, or one whose wait ran
out. Read from the outcomes the workers store (``frontdoor.outcomes``), by the caller's team:
another team's id reads as unknown. ``wait`` long-polls up to N seconds from the request's
arrival.

- 200: the job's answer with its ``_gateway`` block, in the API of the route that
  published it: a ``chat.completion``, or a ``/v1/messages`` job's Messages API message;
- an error status: the job ended in that error, in that API's error shape;
- 202 ``{"id", "object": "queuegate.job", "status": "queued"}``: not finished yet (this
  too for a job past its deadline whose worker died in its call: the next worker's sweep
  bills that call and answers it);
- 504 ``deadline_exceeded``, in that API's error shape: the job's deadline passed with no
  outcome stored, and no worker may still store one (``frontdoor.outcomes.Expired``): it
  expired in its queue uncalled; a ``wait`` ends there;
- 404 ``not_found``: no such job of this team (or its outcome has expired);
- 503 ``service_unavailable``: the store (Redis) did not answer within ``wait`` and
  ``STORE_WAIT`` more: ask again.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from frontdoor.answers import arrived, gateway_headers, note_job
from frontdoor.async_answers import error_answer, finished
from frontdoor.auth import Calling
from frontdoor.errors import ApiError, shown
from frontdoor.outcomes import Expired, Finished
from frontdoor.service import Door

router = APIRouter(tags=["Jobs"])

MAX_WAIT = 60.0
FIRST_POLL = 0.02
LAST_POLL = 0.5
"""Seconds between looks at the outcome store while long-polling: doubling from the first.
(The answer may come to any front-door process's queue: the store is what all of them see.)"""
STORE_WAIT = 5.0
"""Seconds past ``wait`` an answer may take: a hung Redis would otherwise hold the caller
for as long as it hangs."""


@router.get("/v1/jobs/{job_id}", summary="The answer of a job, by id (long-poll with wait)")
async def job(
    request: Request,
    job_id: str,
    door: Door,
    caller: Calling,
    wait: Annotated[float, Query(ge=0, le=MAX_WAIT)] = 0.0,
) -> JSONResponse:
    started = time.perf_counter()
    # Both bounds count from the request's arrival: checking its key may have taken a while.
    give_up = arrived(request) + wait
    try:
        async with asyncio.timeout(max(0.0, give_up + STORE_WAIT - time.monotonic())):
            pause = FIRST_POLL
            while True:
                state = await door.outcomes.look(caller.team, job_id)
                if state != "unknown":
                    note_job(request, job_id)
                if isinstance(state, Finished):
                    return finished(state.result, state.answer_format, started)
                if isinstance(state, Expired):
                    return error_answer(state.answer_format, _expired(job_id, state))
                if state == "unknown":
                    raise ApiError(
                        "not_found",
                        f"no job {shown(job_id)} of team {caller.team} (or its answer expired)",
                    )
                left = give_up - time.monotonic()
                if left <= 0:
                    body = {"id": job_id, "object": "queuegate.job", "status": "queued"}
                    return JSONResponse(
                        body, status_code=202, headers=gateway_headers(job_id, None, started)
                    )
                await asyncio.sleep(min(pause, left))
                pause = min(pause * 2, LAST_POLL)
    except TimeoutError:
        raise ApiError(
            "service_unavailable",
            f"the outcome store (Redis) did not answer within {wait + STORE_WAIT:g} s; "
            f"job {shown(job_id)} is unchanged by it: ask again",
        ) from None


def _expired(job_id: str, expired: Expired) -> ApiError:
    return ApiError(
        "deadline_exceeded",
        f"job {shown(job_id)} expired in its queue at its deadline "
        f"({expired.deadline.isoformat(timespec='seconds')}), uncalled: nothing was billed",
        job_id=job_id,
    )
