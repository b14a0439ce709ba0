"""An OpenAI chat request as a team's ChatJob, checked before anything is published.

What a route needs of a request besides its body comes from headers, read here once::

    options = RequestOptions.of(request)           # timeout, Idempotency-Key, Prefer
    checked = check_chat(body, limits)             # ApiError 400/404 when invalid
    stream, usage = wants_stream(body)
    job = chat_job(body, checked, caller.team, options, limits, stream=stream)

A canonical request made of another API's body (``/v1/messages``) is checked by
``check_canonical`` instead of ``check_chat``.

- The job id is a fresh one, or derived from ``Idempotency-Key`` (team-scoped: the workers
  key every claim and outcome by team), so a retry is the same job and never a second call.
- The job's deadline follows the caller's wait: ``x-queuegate-timeout`` (seconds), else the
  timeout the OpenAI and Anthropic SDKs announce (``x-stainless-read-timeout``; past
  ``MAX_WAIT``, ``MAX_WAIT``), else ``DEFAULT_WAIT``, counted from the request's arrival (its
  key's check included), less ``ANSWER_MARGIN``: the caller reads its answer, a 504 included,
  before its own timer fires. A job nobody waits for any more expires in its queue instead
  of being served.
- An SDK's timeout is its HTTP client's read timeout: the wait for each next byte, not for
  the whole answer. A plain answer is one piece (nothing is sent before it is whole), so it
  is the whole job's deadline; a stream's deadline bounds its first chunk, and its job's
  ``chunk_wait`` (the same wait) each next one, so a stream longer than the timeout runs
  while its chunks keep coming. ``x-queuegate-timeout`` is the caller's bound on the whole.
"""

from __future__ import annotations

import hashlib
import math
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import Request
from pydantic import ValidationError

from frontdoor.answers import arrived
from frontdoor.errors import ApiError, refusing, shown
from queuegate.errors import IdempotencyConflict
from queuegate.messages import AnswerFormat, ChatJob, ChatParams
from queuegate.openai_request import check_chat_body
from queuegate.request_errors import job_refusal
from queuegate.request_limits import (
    Limits,
    check_job_size,
    check_nesting,
    check_output_tokens,
    checked_messages,
)

DEFAULT_WAIT = 600.0
"""Seconds a request waits for its answer when the caller names no timeout (the OpenAI
SDK's own default)."""
MAX_WAIT = 3600.0
ANSWER_MARGIN = 0.25
"""Seconds before the caller's timeout that its answer leaves at the latest (a tenth of the
timeout when that is less). An SDK times a request from its own side of the wire, so a 504
sent as the timeout passes here reached it 2 to 8 ms after its own timer fired: it read a
timeout of its own, and retried the request as a new job, called and billed again."""
MAX_IDEMPOTENCY_KEY = 255
OWNED = frozenset({"model", "messages", "stream", "stream_options", "fallbacks"})
"""Body fields the job carries itself; every other one is a parameter for the provider."""


@dataclass(frozen=True)
class RequestOptions:
    timeout: float
    """Seconds the caller waits for the answer; the job's deadline."""
    timeout_named: bool
    """Whether the caller said so (an async job without it has no deadline)."""
    idempotency_key: str | None
    respond_async: bool
    read_timeout: bool = False
    """Whether ``timeout`` is an SDK's read timeout, the wait for each next byte (see the
    module's docstring), not ``x-queuegate-timeout``'s bound on the whole answer."""
    arrived: float = field(default_factory=time.monotonic)
    """When the request arrived (``time.monotonic()``): ``timeout`` counts from there."""

    @classmethod
    def of(cls, request: Request) -> RequestOptions:
        headers = request.headers
        ours = headers.get("x-queuegate-timeout")
        announced = headers.get("x-stainless-read-timeout")
        named = ours or announced
        if ours is not None:
            timeout = _seconds(ours)
        elif announced is not None:
            timeout = _announced(announced)
        else:
            timeout = DEFAULT_WAIT
        prefer = {p.strip().lower() for p in headers.get("prefer", "").split(",")}
        return cls(
            timeout=timeout,
            timeout_named=named is not None,
            read_timeout=ours is None and announced is not None,
            idempotency_key=idempotency_key(request),
            respond_async="respond-async" in prefer,
            arrived=arrived(request),
        )

    def left(self) -> float:
        """Seconds until the caller's answer must leave (``ANSWER_MARGIN``)."""
        return max(0.0, self.arrived + self._within() - time.monotonic())

    def chunk_wait(self) -> float | None:
        """The longest a stream's caller waits for each next chunk, to the chunk's leaving
        (``ChatJob.chunk_wait``): an SDK's read timeout; None for a bound on the whole."""
        return self._within() if self.read_timeout else None

    def _within(self) -> float:
        """The caller's timeout, less the time its answer needs to reach it first."""
        return self.timeout - min(ANSWER_MARGIN, self.timeout / 10)

    def job_id(self, team: str) -> str:
        if self.idempotency_key is None:
            return uuid.uuid4().hex
        # The team is part of the id: a process's replies are matched by job id across all
        # teams, so two teams using one key at once must never wait on the same id.
        scoped = f"{team}\0{self.idempotency_key}".encode()
        return "idem-" + hashlib.sha256(scoped).hexdigest()[:40]

    def deadline(self) -> datetime | None:
        if self.respond_async and not self.timeout_named:
            return None
        return datetime.now(UTC) + timedelta(seconds=self.left())


def idempotency_key(request: Request) -> str | None:
    """The request's ``Idempotency-Key``, if it names one; ApiError 400 for one that is empty,
    too long or not printable (so it never holds what PostgreSQL or a log line would not)."""
    key = request.headers.get("idempotency-key")
    if key is not None and not (0 < len(key) <= MAX_IDEMPOTENCY_KEY and key.isprintable()):
        raise ApiError(
            "invalid_request",
            f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable characters",
        )
    return key


def key_conflict() -> IdempotencyConflict:
    """The refusal of a request under an Idempotency-Key bound to a different one (a chat
    job's, a batch's): 422 ``idempotency_conflict``, nothing done."""
    return IdempotencyConflict(
        "this Idempotency-Key was used for a different request: use a new key for a new request"
    )


def _announced(text: str) -> float:
    """The timeout an SDK announces: the caller set it on its client, not for the gateway,
    so one past ``MAX_WAIT`` is served within ``MAX_WAIT``, and one that is no number (no SDK
    sends it) leaves the default."""
    try:
        value = float(text)
    except ValueError:
        return DEFAULT_WAIT
    return min(value, MAX_WAIT) if value > 0 else DEFAULT_WAIT


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (0 < value <= MAX_WAIT):
        raise ApiError(
            "invalid_request",
            f"x-queuegate-timeout must be a number of seconds above 0 and at most {MAX_WAIT:g}",
        )
    return value


def wants_stream(body: dict[str, Any]) -> tuple[bool, bool]:
    """Whether the answer is streamed, and whether its last chunk carries the usage, of a body
    ``check_chat`` took (which types both as a worker does)."""
    options = body.get("stream_options") or {}
    return body.get("stream") is True, options.get("include_usage") is True


@dataclass(frozen=True)
class Checked:
    """What the checks of a canonical request's body found, for ``chat_job``."""

    model: str
    """One of the catalog's (``served_model``)."""
    messages: list[Any]
    """Counted (``checked_messages``)."""


def check_chat(body: dict[str, Any], limits: Limits) -> Checked:
    """Refuse what OpenAI's chat completions refuse (ApiError 400, or 404 for a model the
    catalog does not serve, the request's own fallbacks' included), and what the gateway
    takes of no request (its nesting), before the job is made (``queuegate.openai_request``)."""
    model = served_model(body, limits)
    with refusing():
        messages = check_chat_body(body, model, limits)
        check_nesting(body)
    served_fallbacks(body, limits)
    return Checked(model, messages)


def check_canonical(body: dict[str, Any], limits: Limits) -> Checked:
    """The checks of a canonical request made of another API's body, which checked it as
    that API does (``/v1/messages``): its nesting, model, messages and fallbacks; ApiError."""
    with refusing():
        check_nesting(body)
        model = served_model(body, limits)
        messages = checked_messages(body, limits.max_messages)
    served_fallbacks(body, limits)
    return Checked(model, messages)


def served_model(body: dict[str, Any], limits: Limits) -> str:
    """The request's model, one of the catalog's; ApiError 400, or 404 for another."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(
            "invalid_request", "model must be a non-empty string: GET /v1/models", param="model"
        )
    if model not in limits.models:
        raise unknown_model(model)
    return model


def served_fallbacks(body: dict[str, Any], limits: Limits) -> None:
    """ApiError 404 naming the first of the request's own ``fallbacks`` the catalog does not
    serve (``fallbacks.1``), as one for its model: the worker would refuse the job for it
    (``Router.check``). Of a body its API's checks typed (``RequestFallbacks``)."""
    for index, alias in enumerate(body.get("fallbacks") or ()):
        if alias not in limits.models:
            raise unknown_model(alias, f"fallbacks.{index}")


def unknown_model(name: str, param: str | None = None) -> ApiError:
    """The 404 of a model the catalog does not serve, named where the request named it when
    that is not its ``model`` (Anthropic's errors name no field but in their message)."""
    where = f"{param}: " if param else ""
    return ApiError(
        "unknown_model",
        f"{where}model {shown(name)!r} is not served here: GET /v1/models lists them",
        param=param,
    )


def chat_job(
    body: dict[str, Any],
    checked: Checked,
    team: str,
    options: RequestOptions,
    limits: Limits,
    *,
    stream: bool,
    answer_format: AnswerFormat = "openai",
) -> ChatJob:
    """The job of a canonical (OpenAI chat) request, ``checked`` (``check_chat`` or
    ``check_canonical``), its answer read in ``answer_format``; ApiError saying what is
    wrong when it is invalid."""
    with refusing():
        params = {k: v for k, v in body.items() if k not in OWNED}
        check_output_tokens(params)
        try:
            job = ChatJob(
                job_id=options.job_id(team),
                team=team,
                model=checked.model,
                messages=checked.messages,
                params=ChatParams.model_validate(params),
                fallbacks=body.get("fallbacks"),
                deadline=options.deadline(),
                stream=stream,
                chunk_wait=options.chunk_wait() if stream else None,
                answer_format=answer_format,
            )
        except ValidationError as exc:
            raise job_refusal(exc) from None
        check_job_size(job, limits.max_job_bytes)
    return job


__all__ = [
    "Checked",
    "RequestOptions",
    "chat_job",
    "check_canonical",
    "check_chat",
    "idempotency_key",
    "key_conflict",
    "served_model",
    "unknown_model",
    "wants_stream",
]
