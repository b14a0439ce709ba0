"""The objects the APIs answer with, from the stored rows: OpenAI's ``file`` and ``batch``
(openai/types/file_object.py, batch.py) and Anthropic's ``message_batch``
(anthropic/types/messages/message_batch.py), field for field."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from frontdoor.batches.files import StoredFile
from frontdoor.batches.records import BatchRow


def file_object(file: StoredFile) -> dict[str, Any]:
    return {
        "id": file.id,
        "object": "file",
        "bytes": file.bytes,
        "created_at": _unix(file.created_at),
        "filename": file.filename,
        "purpose": file.purpose,
        "status": "processed",
        "expires_at": None,
        "status_details": None,
    }


def openai_batch(row: BatchRow) -> dict[str, Any]:
    """An OpenAI ``batch``; its output and error files only once it has ended."""
    errors = None if not row.errors else {"object": "list", "data": row.errors}
    return {
        "id": row.id,
        "object": "batch",
        "endpoint": row.endpoint,
        "errors": errors,
        "input_file_id": row.input_file_id,
        "completion_window": row.completion_window,
        "status": row.status,
        "output_file_id": row.output_file_id if row.ended else None,
        "error_file_id": row.error_file_id if row.ended else None,
        "created_at": _unix(row.created_at),
        "in_progress_at": _unix(row.in_progress_at),
        "expires_at": _unix(row.expires_at),
        "finalizing_at": _unix(row.finalizing_at),
        "completed_at": _unix(row.completed_at),
        "failed_at": _unix(row.failed_at),
        "expired_at": _unix(row.expired_at),
        "cancelling_at": _unix(row.cancelling_at),
        "cancelled_at": _unix(row.cancelled_at),
        "request_counts": {
            "total": row.total,
            "completed": row.done,
            # Every request with a line in the error file: failed, expired, canceled or
            # refused (its endpoint would have answered it 400).
            "failed": row.failed + row.expired + row.canceled + row.refused,
        },
        "metadata": row.metadata,
    }


def anthropic_batch(row: BatchRow, results_url: str) -> dict[str, Any]:
    """An Anthropic ``message_batch``: in progress, canceling, or ended with its results."""
    if row.ended:
        status = "ended"
    elif row.status == "cancelling":
        status = "canceling"
    else:
        status = "in_progress"
    counts = {
        "succeeded": row.done,
        "errored": row.failed + row.refused,
        "canceled": row.canceled,
        "expired": row.expired,
    }
    counts["processing"] = max(0, row.total - sum(counts.values()))
    return {
        "id": row.id,
        "type": "message_batch",
        "processing_status": status,
        "request_counts": counts,
        "ended_at": _iso(row.ended_at),
        "created_at": _iso(row.created_at),
        "expires_at": _iso(row.expires_at),
        "archived_at": None,
        "cancel_initiated_at": _iso(row.cancelling_at),
        "results_url": results_url if row.ended else None,
    }


def openai_page(data: list[dict[str, Any]], *, has_more: bool) -> dict[str, Any]:
    """An OpenAI list page: the SDK pages on with ``after=<last id>`` while ``has_more``."""
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


def anthropic_page(data: list[dict[str, Any]], *, has_more: bool) -> dict[str, Any]:
    """An Anthropic list page: the SDK pages on with ``after_id=last_id`` while
    ``has_more`` (``before_id=first_id`` going back)."""
    return {
        "data": data,
        "has_more": has_more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


def _unix(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp())


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")
