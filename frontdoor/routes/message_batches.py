"""Anthropic's Message Batches API: ``POST /v1/messages/batches``, ``GET /v1/messages/batches``,
``GET|DELETE /v1/messages/batches/{id}``, ``POST /v1/messages/batches/{id}/cancel`` and
``GET /v1/messages/batches/{id}/results`` (JSONL: succeeded, errored, canceled, expired).

The request is checked for what Anthropic checks at once (each request a ``custom_id``,
unique, and ``params``; no key beside ``requests``, refused by name), kept as a stored file,
and answered ``in_progress``; a runner of the front door (``frontdoor.batches.runner``)
takes it through the team's queue to its end.
As with Anthropic, ``params`` are validated as the batch runs, as ``/v1/messages`` validates
a body (``queuegate.messages_request.params_refusal``), ``stream`` refused as Anthropic
refuses it in a batch: an invalid one is an ``errored`` result naming what is wrong, not a
refused batch. Errors are answered in Anthropic's shape.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from pathlib import Path
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from frontdoor.auth import Caller, Calling
from frontdoor.batches import files, records
from frontdoor.batches.objects import anthropic_batch, anthropic_page
from frontdoor.batches.records import BatchRow
from frontdoor.batches.upload import file_chunks, over_quota, spool_body
from frontdoor.chat_request import idempotency_key
from frontdoor.errors import ApiError, shown
from frontdoor.service import Door, FrontDoor
from producer.batch.lines import BatchFile
from queuegate.errors import BatchError

router = APIRouter(tags=["Anthropic Message Batches"])

PREFIX = "/v1/messages/batches"
REQUESTS = "message_batch_requests"
RESULTS = "message_batch_results"
MAX_REQUESTS = 100_000
"""Anthropic's limit of requests per batch."""
CUSTOM_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")


@router.post(PREFIX, summary="Create a Message Batch")
async def create(request: Request, door: Door, caller: Calling) -> dict[str, Any]:
    """Under an ``Idempotency-Key``, a retry of the request is answered the batch it made,
    its body read only to be told from another request (``records.same_request``)."""
    s = door.settings
    limit = s.batch_file_max_bytes
    key = idempotency_key(request)
    # Looked up before the quota, which the batch made under the key counts in now
    made = None if key is None else await records.batch_under(door.pool, caller.team, key)
    quota = await files.storage_quota(door.pool, caller.team, s.team_file_storage_bytes)
    if made is None:
        try:  # before its body is read: a team over its quota has its batch refused at once
            await files.check_room(door.pool, caller.team, quota)
        except files.OverQuota as exc:
            raise over_quota(exc) from None
    batch_id = records.new_batch_id("anthropic")
    with tempfile.TemporaryDirectory(prefix="queuegate-batch-") as work:
        body, requests = Path(work) / "body.json", Path(work) / "requests.jsonl"
        reading = door.bodies.reader(caller)
        await spool_body(request, reading, body, limit=limit, timeout=s.batch_upload_timeout)
        total, digest = _requests(body, requests)
        bound = None if key is None else records.Bound(key, digest)
        if made is not None and bound is not None:
            made = records.same_request(made, "anthropic", bound)
            return anthropic_batch(made, _results_url(request, made))
        try:
            stored = await files.store_file(
                door.pool,
                team=caller.team,
                purpose=REQUESTS,
                filename=f"{batch_id}.jsonl",
                chunks=file_chunks(requests, files.PART_BYTES),
                max_bytes=limit,
                quota=quota,
            )
        except files.OverQuota as exc:
            raise over_quota(exc) from None
    row = None
    try:
        row = await records.create_batch(
            door.pool,
            batch_id=batch_id,
            team=caller.team,
            api="anthropic",
            key_id=caller.key_id,
            input_file_id=stored.id,
            endpoint="/v1/messages",
            metadata=None,
            total=total,
            bound=bound,
        )
    finally:
        if row is None or row.id != batch_id:
            # Another create under the key was first (its batch answers this one, or it was
            # a different request): these requests are nobody's.
            await files.delete_file(door.pool, caller.team, stored.id, purposes=(REQUESTS,))
    door.batch_runner.wake()
    return anthropic_batch(row, _results_url(request, row))


def _requests(body: Path, out: Path) -> tuple[int, str]:
    """Write the requests of a ``{"requests": [...]}`` body to ``out``, one a line (a line
    then names each request, as the runner's reports do), read one request at a time; the
    number of requests, and their fingerprint (of each request's JSON, keys sorted).
    ApiError naming the first one without a custom_id or params, or with a custom_id used
    before."""
    file = BatchFile(body)
    if not file.document:
        raise ApiError("invalid_request", 'the body must be a JSON object: {"requests": [...]}')
    seen: set[str] = set()
    digest = hashlib.sha256()
    try:
        with out.open("wb") as f:
            for index, (_, entry) in enumerate(file):
                _check(f"requests.{index}", entry, seen)
                f.write(_dumps(entry) + b"\n")
                digest.update(_dumps(entry, sort_keys=True) + b"\n")
    except BatchError as exc:
        raise ApiError("invalid_request", str(exc).replace(f"{body}: ", "")) from None
    if file.aside:
        # As Anthropic's API refuses a field its schema does not have: named, not ignored.
        raise ApiError("invalid_request", f"{shown(file.aside[0])}: Extra inputs are not permitted")
    if not seen:
        raise ApiError("invalid_request", "requests: must hold at least one request")
    return len(seen), digest.hexdigest()


def _dumps(entry: dict[str, Any], *, sort_keys: bool = False) -> bytes:
    """``entry`` as JSON, one line. One nested past what orjson writes (254 levels) is
    written by the json module, which read it: its request is then errored alone as the
    batch runs (nested past the front door's limit), not the whole create a 500."""
    try:
        return orjson.dumps(entry, option=orjson.OPT_SORT_KEYS if sort_keys else None)
    except orjson.JSONEncodeError:
        text = json.dumps(entry, ensure_ascii=False, separators=(",", ":"), sort_keys=sort_keys)
        return text.encode()


def _check(where: str, entry: Any, seen: set[str]) -> None:
    if not isinstance(entry, dict):
        raise ApiError("invalid_request", f"{where}: must be an object")
    custom_id = entry.get("custom_id")
    if not isinstance(custom_id, str) or not CUSTOM_ID.fullmatch(custom_id):
        raise ApiError(
            "invalid_request", f"{where}.custom_id: must be 1-64 letters, digits, - or _"
        )
    if custom_id in seen:
        raise ApiError("invalid_request", f"{where}.custom_id: {custom_id!r} is used twice")
    if not isinstance(entry.get("params"), dict):
        raise ApiError("invalid_request", f"{where}.params: must be an object")
    seen.add(custom_id)
    if len(seen) > MAX_REQUESTS:
        raise ApiError("invalid_request", f"requests: more than {MAX_REQUESTS:,}: split the batch")


@router.get(PREFIX, summary="The team's Message Batches, newest first")
async def list_batches(
    request: Request,
    door: Door,
    caller: Calling,
    *,
    after_id: str | None = None,
    before_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> dict[str, Any]:
    rows = await records.list_batches(
        door.pool, caller.team, "anthropic", after=after_id, before=before_id, limit=limit + 1
    )
    more = len(rows) > limit
    rows = rows[1:] if more and before_id else rows[:limit]
    return anthropic_page(
        [anthropic_batch(r, _results_url(request, r)) for r in rows], has_more=more
    )


@router.get(PREFIX + "/{batch_id}", summary="One of the team's Message Batches")
async def retrieve(batch_id: str, request: Request, door: Door, caller: Calling) -> dict[str, Any]:
    row = await _batch(door, caller, batch_id)
    return anthropic_batch(row, _results_url(request, row))


@router.post(PREFIX + "/{batch_id}/cancel", summary="Cancel a Message Batch")
async def cancel(batch_id: str, request: Request, door: Door, caller: Calling) -> dict[str, Any]:
    """``canceling`` until the requests in flight are answered, then ``ended``: requests not
    served by then are ``canceled`` in the results."""
    row = await door.batch_runner.cancel(caller.team, "anthropic", batch_id)
    if row is None:
        raise _not_found(batch_id)
    return anthropic_batch(row, _results_url(request, row))


@router.get(
    PREFIX + "/{batch_id}/results",
    name="message_batch_results",
    summary="The results of an ended Message Batch (JSONL)",
)
async def results(batch_id: str, door: Door, caller: Calling) -> StreamingResponse:
    row = await _batch(door, caller, batch_id)
    if not row.ended:
        raise ApiError(
            "invalid_request",
            f"batch {batch_id} has not ended: its results are there once processing_status "
            "is ended",
        )
    if row.output_file_id is None:
        raise ApiError("not_found", f"batch {batch_id} ended without results: see its errors")
    return StreamingResponse(
        files.read_file(door.pool, row.output_file_id), media_type="application/x-jsonl"
    )


@router.delete(PREFIX + "/{batch_id}", summary="Delete an ended Message Batch and its results")
async def delete(batch_id: str, door: Door, caller: Calling) -> dict[str, Any]:
    row = await _batch(door, caller, batch_id)
    if not await records.delete_batch(door.pool, caller.team, "anthropic", row.id):
        raise ApiError(
            "invalid_request",
            f"batch {batch_id} has not ended: cancel it and wait until it has ended",
        )
    return {"id": batch_id, "type": "message_batch_deleted"}


async def _batch(door: FrontDoor, caller: Caller, batch_id: str) -> BatchRow:
    row = await records.get_batch(door.pool, caller.team, "anthropic", batch_id)
    if row is None:
        raise _not_found(batch_id)
    return row


def _results_url(request: Request, row: BatchRow) -> str:
    return str(request.url_for("message_batch_results", batch_id=row.id))


def _not_found(batch_id: str) -> ApiError:
    return ApiError(
        "not_found",
        f"no message batch {shown(batch_id)}: GET {PREFIX} lists your team's batches",
    )
