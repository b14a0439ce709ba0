"""OpenAI's Files API, for batch input and output: ``POST /v1/files`` (``purpose=batch``),
``GET /v1/files``, ``GET /v1/files/{id}``, ``GET /v1/files/{id}/content``,
``DELETE /v1/files/{id}``. Files are the team's own: another team's id is not found.
Storage: ``frontdoor.batches.files``."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from starlette.datastructures import UploadFile

from frontdoor.auth import Caller, Calling
from frontdoor.batches import files, records
from frontdoor.batches.objects import file_object, openai_page
from frontdoor.batches.upload import chunks, over_quota, read_upload, too_large
from frontdoor.errors import ApiError, shown
from frontdoor.service import Door, FrontDoor
from queuegate.messages import storable_problem

router = APIRouter(tags=["OpenAI Files"])


@router.post("/v1/files", summary="Upload a batch input file (multipart, purpose=batch)")
async def upload(request: Request, door: Door, caller: Calling) -> dict[str, Any]:
    s = door.settings
    limit = s.batch_file_max_bytes
    quota = await files.storage_quota(door.pool, caller.team, s.team_file_storage_bytes)
    reading = door.bodies.reader(caller)
    async with read_upload(request, reading, limit=limit, timeout=s.batch_upload_timeout) as form:
        purpose, upload = form.get("purpose"), form.get("file")
        if purpose != files.UPLOADED:
            raise ApiError(
                "invalid_request",
                f"purpose {shown(str(purpose))!r} is not served: upload batch input with "
                "purpose=batch",
            )
        if not isinstance(upload, UploadFile):
            raise ApiError("invalid_request", "no file: send it as the multipart field `file`")
        filename = upload.filename or "upload.jsonl"
        if (problem := storable_problem(filename)) is not None:  # PostgreSQL's text cannot
            raise ApiError("invalid_request", f"file: its filename: {problem}", param="file")
        try:
            stored = await files.store_file(
                door.pool,
                team=caller.team,
                purpose=purpose,
                filename=filename,
                chunks=chunks(upload, files.PART_BYTES),
                max_bytes=limit,
                quota=quota,
            )
        except files.TooLarge:
            raise too_large(limit) from None
        except files.OverQuota as exc:
            raise over_quota(exc) from None
    return file_object(stored)


@router.get("/v1/files", summary="The team's batch files, newest first")
async def list_files(
    door: Door,
    caller: Calling,
    *,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Literal["asc", "desc"] = "desc",
    purpose: str | None = None,
) -> dict[str, Any]:
    found = await files.list_files(
        door.pool,
        caller.team,
        purpose=purpose,
        after=after,
        limit=limit + 1,
        newest_first=order == "desc",
    )
    return openai_page([file_object(f) for f in found[:limit]], has_more=len(found) > limit)


@router.get("/v1/files/{file_id}", summary="One of the team's files")
async def get_file(file_id: str, door: Door, caller: Calling) -> dict[str, Any]:
    return file_object(await _file(door, caller, file_id))


@router.get("/v1/files/{file_id}/content", summary="A file's bytes (batch output: JSONL)")
async def content(file_id: str, door: Door, caller: Calling) -> StreamingResponse:
    found = await _file(door, caller, file_id)
    return StreamingResponse(
        files.read_file(door.pool, found.id),
        media_type="application/octet-stream",
        headers={"content-length": str(found.bytes)},
    )


@router.delete("/v1/files/{file_id}", summary="Delete one of the team's files")
async def delete_file(file_id: str, door: Door, caller: Calling) -> dict[str, Any]:
    running = await records.running_with(door.pool, caller.team, file_id)
    if running is not None:
        raise ApiError(
            "invalid_request",
            f"file {file_id} is the input of batch {running}, which has not ended: "
            "cancel the batch or wait for it to end",
        )
    if not await files.delete_file(door.pool, caller.team, file_id):
        raise _not_found(file_id)
    return {"id": file_id, "object": "file", "deleted": True}


async def _file(door: FrontDoor, caller: Caller, file_id: str) -> files.StoredFile:
    found = await files.get_file(door.pool, caller.team, file_id)
    if found is None:
        raise _not_found(file_id)
    return found


def _not_found(file_id: str) -> ApiError:
    return ApiError("not_found", f"no file {shown(file_id)}: GET /v1/files lists your team's files")
