"""OpenAI's Batch API: ``POST /v1/batches``, ``GET /v1/batches``, ``GET /v1/batches/{id}``,
``POST /v1/batches/{id}/cancel``, over an input file uploaded with ``POST /v1/files``.

A batch is recorded and answered ``validating`` at once; a runner of the front door
(``frontdoor.batches.runner``) takes it through the team's queue to its end, whatever
process or request ends meanwhile. Its results are two files: ``output_file_id``
(requests answered 200) and ``error_file_id`` (the rest), read with
``GET /v1/files/{id}/content`` in OpenAI's batch output format. A line whose ``body``
``/v1/chat/completions`` would refuse (``queuegate.openai_request.body_refusal``), or that
makes no valid job (``producer.batch.jobs.Refused``), is answered 400 there, never sent;
lines that are no request fail the batch, listed in its ``errors``. A create
request's fields are OpenAI's (``BatchCreateParams``): another is refused by name, as the
chat endpoint refuses an unknown parameter, not left out unread.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from frontdoor.auth import Calling
from frontdoor.batches import files, records
from frontdoor.batches.objects import openai_batch, openai_page
from frontdoor.batches.upload import over_quota
from frontdoor.chat_request import idempotency_key
from frontdoor.errors import ApiError, shown
from frontdoor.service import Door
from producer.batch.openai import URL
from queuegate.messages import StoredText
from queuegate.openai_request import unrecognized
from queuegate.request_errors import invalid_request

router = APIRouter(tags=["OpenAI Batches"])


REQUEST_BYTES = 64 * 1024
"""A batch's own request is small: its lines are in the input file."""


UNSUPPORTED = frozenset({"output_expires_after"})
"""Fields of OpenAI's batch create the gateway does not carry: its result files do not
expire on a caller's policy."""


class BatchCreate(BaseModel):
    """The body of ``POST /v1/batches``: the openai SDK's ``BatchCreateParams``, as far as
    the gateway serves it (``UNSUPPORTED`` and unknown fields are refused by ``_asked``)."""

    model_config = ConfigDict(extra="forbid")

    # Stored text: PostgreSQL holds no NUL, so one is the caller's 400, not our 500.
    input_file_id: StoredText
    endpoint: str
    completion_window: str
    metadata: (
        dict[
            Annotated[StoredText, StringConstraints(max_length=64)],
            Annotated[StoredText, StringConstraints(max_length=512)],
        ]
        | None
    ) = Field(default=None, max_length=16)


@router.post("/v1/batches", summary="Create a batch from an uploaded file")
async def create(request: Request, door: Door, caller: Calling) -> dict[str, Any]:
    """Under an ``Idempotency-Key``, a retry of the request is answered the batch it made
    (``records.same_request``), before any check a batch made since could change (the quota
    it counts in, its input file deleted once it ended)."""
    key = idempotency_key(request)
    body = await door.bodies.read_json(request, caller, limit=REQUEST_BYTES)
    asked = _asked(body)
    bound = None
    if key is not None:
        canonical = orjson.dumps(asked.model_dump(), option=orjson.OPT_SORT_KEYS)
        bound = records.Bound(key, hashlib.sha256(canonical).hexdigest())
        made = await records.batch_under(door.pool, caller.team, key)
        if made is not None:
            return openai_batch(records.same_request(made, "openai", bound))
    if asked.endpoint != URL:
        raise ApiError(
            "invalid_request", f"endpoint {shown(asked.endpoint)!r} is not served: use {URL}"
        )
    if asked.completion_window != records.WINDOW:
        raise ApiError(
            "invalid_request",
            f"completion_window {shown(asked.completion_window)!r} is not served: "
            f"use {records.WINDOW!r}",
        )
    if await files.get_file(door.pool, caller.team, asked.input_file_id, ("batch",)) is None:
        raise ApiError(
            "not_found",
            f"no batch file {shown(asked.input_file_id)}: upload one with POST /v1/files, "
            "purpose=batch",
        )
    quota = await files.storage_quota(door.pool, caller.team, door.settings.team_file_storage_bytes)
    try:
        await files.check_room(door.pool, caller.team, quota)
    except files.OverQuota as exc:
        raise over_quota(exc) from None
    row = await records.create_batch(
        door.pool,
        batch_id=records.new_batch_id("openai"),
        team=caller.team,
        api="openai",
        key_id=caller.key_id,
        input_file_id=asked.input_file_id,
        endpoint=asked.endpoint,
        metadata=asked.metadata,
        bound=bound,
    )
    door.batch_runner.wake()
    return openai_batch(row)


def _asked(body: dict[str, Any]) -> BatchCreate:
    """``body`` as a BatchCreate; ApiError 400 naming the fields it does not take, all at
    once, or the first one invalid."""
    unsupported = sorted(UNSUPPORTED & body.keys())
    if unsupported:
        name = unsupported[0]
        raise ApiError("invalid_request", f"{name}: not supported by this gateway", param=name)
    unknown = sorted(body.keys() - BatchCreate.model_fields.keys())
    if unknown:
        raise unrecognized(unknown, "not parameters of OpenAI's batch create")
    try:
        return BatchCreate.model_validate(body)
    except ValidationError as exc:
        raise invalid_request(exc, body) from None


@router.get("/v1/batches", summary="The team's batches, newest first")
async def list_batches(
    door: Door,
    caller: Calling,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict[str, Any]:
    rows = await records.list_batches(
        door.pool, caller.team, "openai", after=after, limit=limit + 1
    )
    return openai_page([openai_batch(r) for r in rows[:limit]], has_more=len(rows) > limit)


@router.get("/v1/batches/{batch_id}", summary="One of the team's batches")
async def retrieve(batch_id: str, door: Door, caller: Calling) -> dict[str, Any]:
    row = await records.get_batch(door.pool, caller.team, "openai", batch_id)
    if row is None:
        raise _not_found(batch_id)
    return openai_batch(row)


@router.post("/v1/batches/{batch_id}/cancel", summary="Cancel a batch")
async def cancel(batch_id: str, door: Door, caller: Calling) -> dict[str, Any]:
    """``cancelling`` until the requests in flight are answered, then ``cancelled``; the
    answers written so far stay in its files. A batch that has ended is left as it is."""
    row = await door.batch_runner.cancel(caller.team, "openai", batch_id)
    if row is None:
        raise _not_found(batch_id)
    return openai_batch(row)


def _not_found(batch_id: str) -> ApiError:
    return ApiError("not_found", f"no batch {shown(batch_id)}: GET /v1/batches lists your team's")
