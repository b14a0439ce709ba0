"""A request body's validation error as one line a caller can act on:
``<field path>: <reason>``, the path as it is in the body they sent; OpenAI's errors also
name it as their ``param``.

The checks of a request (``queuegate.openai_request``, ``queuegate.messages_request``)
raise ``InvalidRequest``, which the front door answers 400 in the shape of the API called
and a batch answers as the failed line of that request (``refusal``)::

    except ValidationError as exc:
        raise invalid_request(exc, body) from None

The paths and reasons are ``queuegate.value_errors``', which a worker's refusals of a job's
parameters share.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from queuegate.errors import InvalidRequest
from queuegate.messages import ErrorInfo
from queuegate.openai_params import refused_param
from queuegate.value_errors import bounded, problem


def deepest(exc: ValidationError) -> ErrorDetails:
    """The error a client can act on: the deepest one, as the providers report one."""
    return max(exc.errors(include_url=False), key=lambda e: len(e["loc"]))


def invalid_request(exc: ValidationError, body: Any) -> InvalidRequest:
    """The refusal of ``body``'s deepest validation error, its ``param`` the path of the
    field at fault."""
    where, reason = problem(deepest(exc), body)
    return InvalidRequest(joined(where, reason), param=where or None)


def job_refusal(exc: ValidationError) -> InvalidRequest:
    """The refusal of a request whose job (a ``ChatJob``, its ``ChatParams`` validated
    apart) is invalid, named by the path of the field from the top of the body, where the
    caller sent it: the job's parameters are the body's top-level fields."""
    first = exc.errors(include_input=False, include_url=False)[0]
    refused = refused_param(first)
    if refused is not None:
        return InvalidRequest(str(refused), param=refused.param)
    where = ".".join(str(part) for part in first["loc"])
    return InvalidRequest(f"{where or 'request'}: {first['msg']}", param=where or None)


def refusal(exc: InvalidRequest) -> ErrorInfo:
    """A request's refusal as a batch answers it: the endpoint's code (``request_too_large``
    for one past the size limit) and message, and its ``param`` where it names one
    (``producer.batch.jobs.Check``)."""
    return ErrorInfo(code=exc.code, message=bounded(exc.message), param=exc.param)


def joined(where: str, reason: str) -> str:
    return f"{where}: {reason}" if where else reason


__all__ = ["deepest", "invalid_request", "job_refusal", "joined", "refusal"]
