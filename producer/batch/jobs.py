"""Turning entries of a batch file into chat jobs, the same way in every pass over the file."""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from producer.batch.formats import FORMATS, FormatName, detect
from queuegate.control import MAX_CUSTOM_ID, BatchMeta, job_id
from queuegate.errors import BatchError, InvalidRequest
from queuegate.messages import ChatJob, ChatParams, ErrorInfo, storable_problem
from queuegate.request_errors import job_refusal, refusal
from queuegate.request_limits import check_job_size, check_nesting, checked_messages
from queuegate.visible import clipped

ANTHROPIC_ONLY = ("top_k", "thinking", "service_tier")
"""Parameters only Anthropic's API takes; another provider would refuse or ignore them."""

Check = Callable[[dict[str, Any]], ErrorInfo | None]
"""Why a request (a line's body: ``Format.body``) is refused, or None: its API's own
validation, which the caller brings (the front door and the CLI check a batch's requests as
the front door's synchronous endpoints check a body: ``producer.batch.checks``). The error
is the endpoint's own, its ``param`` naming the field at fault where the endpoint does."""


class Refused(ValueError):
    """A request of its format the gateway refuses: its format's ``Check`` refused it, or,
    with checks brought, it makes no valid job (no model, a parameter the job refuses:
    ``max_tokens`` beside ``max_completion_tokens``, a ``seed`` past 64 bits), or one past
    the front door's limits (nested deeper than ``MAX_NESTING``, more messages than
    ``max_messages``, a request past ``max_bytes``: ``request_too_large``), as its endpoint
    refuses them. It is answered as a failed line of its own, never published, while the
    batch's other requests are served (a line that is no request at all may fail the whole
    batch instead)."""

    def __init__(self, error: ErrorInfo) -> None:
        super().__init__(error.message)
        self.error = error


NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,47}")
"""A batch name: part of queue names, Redis keys and every job id (matched whole)."""


def check_batch_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise BatchError(
            f"batch name {clipped(name)!r} is not valid: use 1-48 lowercase letters, digits, "
            "- and _, starting with a letter or digit"
        )
    return name


def default_name(path: Path) -> str:
    """The file's stem, made a valid batch name."""
    stem = re.sub(r"[^a-z0-9_-]+", "-", path.stem.lower()).strip("-_")
    return (stem or "batch")[:48]


class JobReader:
    """Builds the job of each entry, or raises ValueError saying what is wrong with it.

    The first valid entry fixes the batch's format; entries of the other format are refused.
    """

    def __init__(
        self,
        *,
        batch: str,
        jobs: str,
        team: str,
        model: str | None,
        deadline: datetime | None,
        format: FormatName | None = None,
        models: Collection[str] | None = None,
        anthropic_models: Collection[str] | None = None,
        checks: Mapping[FormatName, Check] | None = None,
        max_bytes: int | None = None,
        max_messages: int | None = None,
    ) -> None:
        self._batch = batch
        self._jobs = jobs
        self._team = team
        self._model = model
        self.deadline = deadline
        self.format = format
        self._models = models
        self._anthropic_models = anthropic_models
        self._checks = checks
        """None: the caller answers no refused request, so one is a problem of the file."""
        self._max_bytes = max_bytes
        """The gateway's ``max_job_bytes``: a job whose request is larger is refused (None:
        not checked)."""
        self._max_messages = max_messages
        """The gateway's ``max_job_messages``: a job with more is refused (None: not checked)."""

    @classmethod
    def for_meta(
        cls,
        meta: BatchMeta,
        *,
        models: Collection[str] | None = None,
        anthropic_models: Collection[str] | None = None,
        checks: Mapping[FormatName, Check] | None = None,
        max_bytes: int | None = None,
        max_messages: int | None = None,
    ) -> JobReader:
        """The reader of a recorded batch: its jobs as its first submit built them, whether
        a re-run of submit or collect asking again builds them (same job ids, model,
        deadline and format)."""
        return cls(
            batch=meta.name,
            jobs=meta.jobs,
            team=meta.team,
            model=meta.model,
            deadline=meta.deadline,
            format=meta.format,
            models=models,
            anthropic_models=anthropic_models,
            checks=checks,
            max_bytes=max_bytes,
            max_messages=max_messages,
        )

    def job(self, entry: Any) -> ChatJob:
        if isinstance(entry, ValueError):
            raise entry
        if not isinstance(entry, dict):
            raise ValueError("not a JSON object")
        custom_id = entry.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id.strip():
            raise ValueError("custom_id must be a non-empty string")
        if len(custom_id) > MAX_CUSTOM_ID:
            raise ValueError(f"custom_id is longer than {MAX_CUSTOM_ID} characters")
        # Checked here, not by the job it would be part of: a line naming no id it can be
        # answered under is no request, whereas a request the job refuses is answered failed.
        if (unstorable := storable_problem(custom_id)) is not None:
            raise ValueError(f"custom_id: {unstorable}")
        kind = detect(entry)
        if self.format is None:
            self.format = kind
        elif kind != self.format:
            raise ValueError(f"an {kind} request in an {self.format} batch")
        fmt = FORMATS[kind]
        body = fmt.body(entry)
        check = (self._checks or {}).get(kind)
        if check is not None and (error := check(body)) is not None:
            raise Refused(error)
        try:
            request = fmt.parse(custom_id, body)
        except ValueError as exc:  # what the canonical form cannot carry, as the endpoint says
            raise self._refused(InvalidRequest(str(exc))) from None
        try:
            # Of the canonical request, as the endpoint checks the job it makes of it.
            check_nesting({"messages": request.messages, **request.params})
            if self._max_messages is not None:
                checked_messages({"messages": request.messages}, self._max_messages)
        except InvalidRequest as exc:
            raise self._refused(exc) from None
        model = self._model or request.model
        if not model:
            raise self._refused(InvalidRequest("model must be a non-empty string", param="model"))
        # The request's own fallbacks are its job's (typed by its format's check), never a
        # parameter: both formats' canonical params carry them as the request named them.
        params = dict(request.params)
        fallbacks = params.pop("fallbacks", None)
        self._check_served(model, fallbacks, params)
        try:
            job = ChatJob(
                job_id=job_id(self._jobs, custom_id),
                team=self._team,
                model=model,
                messages=request.messages,
                params=ChatParams.model_validate(params),
                fallbacks=fallbacks,
                metadata={"batch": self._batch, "custom_id": custom_id},
                deadline=self.deadline,
                answer_format=kind,
            )
        except ValidationError as exc:
            # The job's own refusal, named as the endpoint names it (its parameters are the
            # request's top-level fields): this request fails, not its batch.
            raise self._refused(job_refusal(exc)) from None
        if self._max_bytes is not None:
            # Here, not by the caller: collect reads the file again to answer it, as submit
            # refused it, and a line past it fails alone rather than its OpenAI batch.
            try:
                check_job_size(job, self._max_bytes)
            except InvalidRequest as exc:
                raise self._refused(exc) from None
        return job

    def _check_served(self, model: str, fallbacks: Any, params: dict[str, Any]) -> None:
        """ValueError, a problem of the file, for a model or fallback the catalog lacks
        (``models``), or an Anthropic-only parameter where another provider may serve."""
        # Only the aliases a job would take: without checks, a malformed list is its refusal.
        named = {
            f"fallbacks.{index}": alias
            for index, alias in enumerate(fallbacks if isinstance(fallbacks, list) else ())
            if isinstance(alias, str)
        }
        if self._models is not None:
            if model not in self._models:
                raise ValueError(
                    f"model {clipped(model)!r} is not in the catalog: pass --model ALIAS"
                )
            for where, alias in named.items():
                if alias not in self._models:
                    raise ValueError(f"{where}: model {clipped(alias)!r} is not in the catalog")
        anthropic = self._anthropic_models
        if anthropic is None or all(a in anthropic for a in (model, *named.values())):
            return
        for key in ANTHROPIC_ONLY:
            if key in params:
                raise ValueError(
                    f"{key} is Anthropic's alone and model {clipped(model)!r} or a fallback it "
                    "names may be served by another provider: remove it, or pick models served "
                    "only by Anthropic"
                )

    def _refused(self, exc: InvalidRequest) -> ValueError:
        """A request of its format the gateway refuses: ``Refused``, answered as a line of
        its own, where the caller answers refused requests (it brings the checks, which
        collect reads the file again with); else a problem of the file, as any other."""
        return ValueError(exc.message) if self._checks is None else Refused(refusal(exc))
