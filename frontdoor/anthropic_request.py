"""``POST /v1/messages`` bodies as a team's job.

``messages_job`` checks a body as Anthropic checks it (``queuegate.messages_request``),
reads it as a canonical (OpenAI chat) request with
``queuegate.provider_formats.openai_request``, and makes it the team's job as an OpenAI
request is made one (``frontdoor.chat_request.check_canonical`` and ``chat_job``: catalog,
limits, job id, deadline).
``count_tokens_job`` does the same for a ``/v1/messages/count_tokens`` body, whose job is
only counted. Any refusal: ``ApiError``.
"""

from __future__ import annotations

from typing import Any

from frontdoor.chat_request import RequestOptions, chat_job, check_canonical
from frontdoor.errors import ApiError, refusing
from queuegate.messages import ChatJob
from queuegate.messages_request import count_tokens_request, messages_request
from queuegate.provider_formats import openai_request
from queuegate.request_limits import Limits


def messages_job(
    body: dict[str, Any], team: str, options: RequestOptions, limits: Limits
) -> ChatJob:
    """The team's job for a ``/v1/messages`` body; ApiError saying what is wrong, in
    Anthropic's wording (``max_tokens: Field required``), when it is invalid."""
    with refusing():
        request = messages_request(body)
    return _job(request.model_dump(exclude_none=True), team, options, limits, request.stream)


def count_tokens_job(
    body: dict[str, Any], team: str, options: RequestOptions, limits: Limits
) -> ChatJob:
    """The job a ``/v1/messages/count_tokens`` body would make, for its prompt to be counted
    (never published); ApiError as ``messages_job``'s when it is invalid."""
    with refusing():
        request = count_tokens_request(body)
    # The canonical form needs a max_tokens; the prompt it counts does not depend on it.
    fields = request.model_dump(exclude_none=True) | {"max_tokens": 1}
    return _job(fields, team, options, limits, stream=False)


def _job(
    fields: dict[str, Any], team: str, options: RequestOptions, limits: Limits, stream: bool
) -> ChatJob:
    try:
        messages, params = openai_request(fields, where="")
    except ValueError as exc:
        raise ApiError("invalid_request", str(exc)) from None
    canonical = {"model": fields["model"], "messages": messages, **params}
    checked = check_canonical(canonical, limits)
    return chat_job(
        canonical, checked, team, options, limits, stream=stream, answer_format="anthropic"
    )


__all__ = ["count_tokens_job", "messages_job"]
