"""What both batch formats share: a request read from a line, an answer to write back."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Literal

from queuegate.messages import ChatResult, ErrorInfo
from queuegate.numbers import plain_decimal

Category = Literal["done", "failed", "expired", "canceled"]
CATEGORIES: tuple[Category, ...] = ("done", "failed", "expired", "canceled")


@dataclass(frozen=True)
class Request:
    """One request of a batch file, in canonical (OpenAI chat) form, not yet validated."""

    custom_id: str
    model: str | None
    messages: Any
    params: dict[str, Any]


@dataclass(frozen=True)
class Answer:
    """How one request ended; ``result`` is None when the gateway never answered it, and
    ``error`` then says why a ``failed`` one was not served."""

    custom_id: str
    job_id: str
    category: Category
    result: ChatResult | None = None
    error: ErrorInfo | None = None

    @property
    def digest(self) -> str:
        """The job's id as the ids of its line carry it: a digest, since a batch's job id
        holds the batch's name and the caller's custom_id; the same on every collect."""
        return hashlib.sha256(self.job_id.encode()).hexdigest()[:24]

    @property
    def failure(self) -> ErrorInfo:
        """The error a ``failed`` answer is written with: the gateway's, or why it gave none."""
        error = self.result.error if self.result is not None else self.error
        assert error is not None, f"{self.custom_id} failed without an error"
        return error


def custom_id_of(jobs: str, job: str) -> str | None:
    prefix = f"{jobs}:"
    return job[len(prefix) :] if job.startswith(prefix) else None


def category_of(result: ChatResult) -> Category:
    if result.status == "ok":
        return "done"
    code = result.error.code if result.error else None
    if code == "deadline_exceeded":
        return "expired"
    if code == "canceled":
        return "canceled"
    return "failed"


def gateway_block(answer: Answer) -> dict[str, Any]:
    """How the gateway served it: model used, fallback, cost; added to every output line.

    The cost is text in positional notation, as the result's own JSON and the front door
    write it (``"0.00000039"``): a JSON number would be written ``3.9e-07``.
    """
    result = answer.result
    if result is None:
        return {"job_id": answer.job_id, "cost_usd": "0"}
    g = result.gateway
    return {
        "job_id": answer.job_id,
        "model_requested": g.model_requested,
        "model_used": g.model_used,
        "provider": g.provider,
        "fallback_used": g.fallback_used,
        "cost_usd": plain_decimal(g.cost_usd),
        "latency_ms": round(g.latency_ms, 1),
        "attempts": len(g.attempts),
    }
