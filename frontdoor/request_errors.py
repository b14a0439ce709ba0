"""A request body's validation error as one line a caller can act on:
``<field path>: <reason>``, the path as it is in the body they sent; OpenAI's errors also
name it as their ``param``.

The paths and reasons are ``queuegate.value_errors``', which a worker's refusals of a job's
parameters share::

    except ValidationError as exc:
        raise invalid_request(exc, body) from None
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from frontdoor.errors import ApiError
from queuegate.messages import ErrorInfo
from queuegate.value_errors import error_path, problem, tagged_by


def deepest(exc: ValidationError) -> ErrorDetails:
    """The error a client can act on: the deepest one, as the providers report one."""
    return max(exc.errors(include_url=False), key=lambda e: len(e["loc"]))


def invalid_request(exc: ValidationError, body: Any) -> ApiError:
    """The ``invalid_request`` error of ``body``'s deepest validation error, its ``param``
    the path of the field at fault."""
    where, reason = problem(deepest(exc), body)
    return ApiError("invalid_request", joined(where, reason), param=where or None)


def refusal(exc: ApiError) -> ErrorInfo:
    """A request check's ``invalid_request`` refusal as a batch answers it: the endpoint's
    message, and its ``param`` where it names one (``producer.batch.jobs.Check``)."""
    return ErrorInfo(code="invalid_request", message=exc.message, param=exc.param)


def joined(where: str, reason: str) -> str:
    return f"{where}: {reason}" if where else reason


__all__ = ["deepest", "error_path", "invalid_request", "joined", "problem", "refusal", "tagged_by"]
