"""The wire contract: every body that crosses the broker, as pydantic v2 models.

Bodies are JSON (``content_type=application/json``) and carry ``v``, the schema version.
Unknown fields are ignored on read, so a newer producer never breaks an older worker.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

import orjson
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from queuegate.numbers import Money
from queuegate.openai_messages import check_message, unanswered_tool_calls
from queuegate.openai_params import MAX_CHOICES, ParamError, check_params
from queuegate.visible import clipped

SCHEMA_VERSION = 1
CONTENT_TYPE = "application/json"

ErrorCode = Literal[
    "unauthorized",
    "budget_exhausted",
    "invalid_request",
    "request_too_large",
    "unknown_model",
    "rate_limited",
    "deadline_exceeded",
    "provider_error",
    "all_providers_failed",
    "queue_full",
    "canceled",
    "context_length_exceeded",
    "idempotency_conflict",
    "already_answered",
    "internal_error",
]

HTTP_STATUS: dict[str, int] = {
    "unauthorized": 401,
    "budget_exhausted": 402,
    "invalid_request": 400,
    "request_too_large": 413,
    "unknown_model": 404,
    "rate_limited": 429,
    "deadline_exceeded": 504,
    "provider_error": 502,
    "all_providers_failed": 502,
    "queue_full": 429,
    "canceled": 409,
    "context_length_exceeded": 400,
    "idempotency_conflict": 422,
    "already_answered": 409,
    "internal_error": 500,
}
"""The HTTP status each error code is answered with: by the HTTP front door (every API it
speaks) and in batch output lines. ``queue_full`` is a 429 (retry later, as the SDKs do),
``unknown_model`` a 404 (as OpenAI answers a model it does not have)."""


JobStatus = Literal["ok", "error"]
"""How a job ended: answered, or with an error (``ErrorInfo``)."""

AnswerFormat = Literal["openai", "anthropic"]
"""The API a job's caller reads its answer in: OpenAI's chat completions, or Anthropic's
Messages API (``/v1/messages``, a Message Batch)."""

UnsupportedParams = Literal["refuse", "drop"]
"""What the gateway does with a job parameter a provider cannot take as asked: ``refuse`` it
on that deployment (the job goes on to the next one, and fails ``invalid_request`` naming the
parameter when none can take it), or ``drop`` it (or change it) and list it on the result."""


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
"""What PostgreSQL text (and jsonb) cannot hold: the NUL character, and a lone UTF-16
surrogate, which has no UTF-8 form."""

INT64 = (-(2**63), 2**63 - 1)
"""The integers a job may carry anywhere: a larger one has no JSON form the workers' encoder
(orjson) or a provider takes."""

MAX_OUTPUT_TOKENS = 1_000_000
"""More output tokens than any model writes: a larger ``max_tokens`` is a mistake, refused
before it is priced against the team's budget."""


def storable_problem(text: str) -> str | None:
    """Why PostgreSQL could not store ``text``; None when it can."""
    found = _UNSTORABLE.search(text)
    if found is None:
        return None
    if found.group() == "\x00":
        return "a NUL byte is not allowed"
    return f"a lone surrogate (U+{ord(found.group()):04X}) is not allowed"


def storable(text: str) -> str:
    """``text`` with what PostgreSQL cannot store replaced by U+FFFD: for a value that must be
    recorded whatever it holds (the id a refused job came under)."""
    return _UNSTORABLE.sub("\ufffd", text)


def _stored_text(text: str) -> str:
    problem = storable_problem(text)
    if problem is not None:
        raise ValueError(problem)
    return text


StoredText = Annotated[str, AfterValidator(_stored_text)]
"""A string that reaches PostgreSQL (usage_log, audit, batches): refused when it could not be
stored there, so that the job it came in is refused as bad input before it is called, never
called and then left unaccounted."""

MAX_FALLBACKS = 8
"""Aliases a request's own ``fallbacks`` names at most: each one failing costs its retries and
its timeout before the next is tried, so a longer chain outlives any caller's wait."""

RequestFallbacks = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=128), AfterValidator(_stored_text)]],
    Field(max_length=MAX_FALLBACKS),
]
"""A job's own ``fallbacks``, whichever door it came in by (a queued job, ``/v1/chat/
completions``, ``/v1/messages``, a batch's request; strict at the front door, as its API's
other fields are: ``"x"`` is no list): up to ``MAX_FALLBACKS`` aliases, each as a job's
``model`` is, ``[]`` for none (not the catalog's either). Never a parameter; whether the
catalog serves them is asked where its ``model`` is."""

REFUSED_MARK = "/refused/"
"""What the usage row of a refused job has in its id, ``<job id>/refused/<digest of body>``
(``workers.outcome.refused``), and no job id may: a job sent under a refusal's id, which its
producer can work out from what it sent, was called and billed, its cost dropped against the
refusal's row of no cost."""
AGAIN_MARK = "/again/"
"""What the usage row of a job's calls made under a second claim has in its id, ``<job
id>/again/<claim>`` (``accounting.store``): calls made again once Redis had lost the first
claim's outcome, billed on a row of their own. No job id may hold it either."""
LATE_MARK = "/late/"
"""What the usage row of a stalled owner's calls has in its id, ``<job id>/late/<claim>``
(``workers.outcome.outcome_of_late``): another delivery billed them as lost, at their
estimates, while the owner was stalled; this row bills what they really cost past that
(less, when they cost less), with their tokens past the estimated ones that row counts. No
job id may hold it either."""


def _job_id(text: str) -> str:
    for mark in (REFUSED_MARK, AGAIN_MARK, LATE_MARK):
        if mark in text:
            raise ValueError(f"a job id may not contain {mark!r} (the ids of accounting's rows)")
    return text


JobId = Annotated[str, AfterValidator(_stored_text), AfterValidator(_job_id)]
"""A producer's job id: stored text, never one a refusal's usage row can have."""


def _check_values(where: str, value: object) -> None:
    """Refuse, anywhere in a JSON value, a string PostgreSQL cannot store or an integer
    outside ``INT64``."""
    if isinstance(value, str):
        problem = storable_problem(value)
        if problem is not None:
            raise ValueError(f"{clipped(where)}: {problem}")
    elif isinstance(value, int) and not isinstance(value, bool):
        if not INT64[0] <= value <= INT64[1]:
            raise ValueError(
                f"{clipped(where)}: {clipped(str(value))} is out of range (a 64-bit integer)"
            )
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_values(f"a key in {where}", key)
            _check_values(f"{where}.{key}", item)
    elif isinstance(value, list):
        for item in value:
            _check_values(where, item)


FIELD_SETS_SHARED = 256
"""Distinct sets of given fields ``shared_fields`` shares at most: a message's and the
parameters' extras count among their fields, and a team chooses those."""

_FIELD_SETS: dict[frozenset[str], set[str]] = {}

M = TypeVar("M", bound=BaseModel)


def shared_fields(model: M) -> M:
    """``model``, its set of the fields it was given (pydantic's, one per instance) shared with
    every model given the same fields, and so for each frozen model in it; returned for
    chaining.

    For models held by the thousand, and only those: a worker holds thousands of jobs while
    they wait for Redis, a connection or a confirm, and pydantic's sets of a job, its
    messages, its parameters, its calls and its outcome are 216-1,752 bytes each (a
    UsageEvent's the largest), 1.2-3 KB a job. Sharing costs 2-3 us a usage event, which a
    model read and let go at once (accounting's events) would only lose. A frozen model never
    changes its own set (``model_copy`` gives the copy a set of its own), so sharing is safe;
    a model that is not frozen keeps its own.
    """
    if not model.model_config.get("frozen"):
        return model
    given = model.__pydantic_fields_set__
    key = frozenset(given)
    shared = _FIELD_SETS.get(key)
    if shared is None and len(_FIELD_SETS) < FIELD_SETS_SHARED:
        shared = _FIELD_SETS[key] = given
    if shared is not None:
        object.__setattr__(model, "__pydantic_fields_set__", shared)
    values = model.__dict__
    for name in _nesting(type(model)):
        value = values[name]
        if isinstance(value, BaseModel):
            shared_fields(value)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, BaseModel):
                    shared_fields(item)
    return model


_NESTING: dict[type[BaseModel], tuple[str, ...]] = {}


def _nesting(cls: type[BaseModel]) -> tuple[str, ...]:
    """The fields of ``cls`` whose value may be a model or a list (``shared_fields`` looks
    in no other): a UsageEvent has 2 of 33, and the look at each costs as much as its set."""
    names = _NESTING.get(cls)
    if names is None:
        fields = cls.model_fields.items()
        names = _NESTING[cls] = tuple(n for n, f in fields if _may_nest(f.annotation))
    return names


def _may_nest(annotation: object) -> bool:
    if annotation is Any or annotation is list or get_origin(annotation) is list:
        return True
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return True
    return any(_may_nest(arg) for arg in get_args(annotation))


class WireModel(BaseModel):
    """A body, or part of one, that crosses the broker.

    Strict, as OpenAI's API is: ``"5"`` is no integer, ``"yes"`` or ``1`` no boolean, ``"0.5"``
    no number (an integer is taken for a float), and a job sent so is refused ``invalid_request``
    naming the field, not run with a value its sender did not write. From JSON, a datetime is
    ISO 8601 text, a ``Money`` amount text or a number; from Python, their own types. Every
    datetime on the wire is ``AwareDatetime``: one without a timezone would be read in the
    reading process's."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)


W = TypeVar("W", bound=WireModel)


def decoded(model: type[W], value: Any) -> W:
    """``model`` of a value of JSON already decoded (a control call's arguments, or its
    answer), read as from its text: the Python form of a datetime, which strict validation
    of a Python value asks for, is ISO 8601 text there."""
    return model.model_validate_json(orjson.dumps(value))


class ChatMessage(WireModel):
    """One message in OpenAI chat format; content is a string or a list of content parts."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _as_openai(self) -> ChatMessage:
        # Typed as the front door types a request's messages (queuegate.openai_messages):
        # a plain text message holds nothing more to read, and is not read again.
        plain = isinstance(self.content, str) and self.role != "tool"
        if not (plain and self.tool_calls is None and not self.model_extra):
            check_message(self.model_dump(exclude_unset=True))
        return self


class ChatParams(WireModel):
    """Sampling and tool parameters in OpenAI form; OpenAI's others kept among the extras,
    all typed as OpenAI's (``queuegate.openai_params``), unknown ones passed through to the
    provider."""

    model_config = ConfigDict(extra="allow")

    max_tokens: int | None = Field(default=None, ge=1, le=MAX_OUTPUT_TOKENS)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stop: str | list[str] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    seed: int | None = Field(default=None, ge=INT64[0], le=INT64[1])
    user: StoredText | None = None

    @model_validator(mode="after")
    def _extras(self) -> ChatParams:
        extra = self.model_extra or {}
        # ``n`` is passed through like any extra, but zero choices would be an answer with
        # nothing in it (OpenAI refuses it; an adapter would name it wrongly).
        n = extra.get("n")
        if n is not None and (type(n) is not int or not 1 <= n <= MAX_CHOICES):
            raise ParamError(
                "n", f"the number of choices is a whole number from 1 to {MAX_CHOICES}"
            )
        tokens = extra.get("max_completion_tokens")
        if tokens is not None and (type(tokens) is not int or not 1 <= tokens <= MAX_OUTPUT_TOKENS):
            # Not a number ("100", 1.5) passed through, and broke the job's estimate.
            raise ParamError(
                "max_completion_tokens", f"a whole number from 1 to {MAX_OUTPUT_TOKENS}"
            )
        if tokens is not None and self.max_tokens is not None:
            # OpenAI answers both with a 400 (max_tokens is the deprecated name of
            # max_completion_tokens), after the estimate had priced one of them: refused
            # here, before any deployment is called and billed for it.
            raise ParamError(
                "max_tokens",
                "set together with max_completion_tokens, which OpenAI refuses: send "
                "max_completion_tokens alone (max_tokens is its deprecated name)",
            )
        # The parameters typed only as JSON here, OpenAI's among the extras included, are
        # checked as OpenAI's API types them, as the front door checks them: nothing is read
        # again for a job that has none.
        shared = {name: value for name in _DEEP if (value := getattr(self, name)) is not None}
        if extra or shared:
            check_params(extra | shared)
        # The rest go to the provider as they are: none may be a number no worker can send.
        for name, value in extra.items():
            _check_values(name, value)
        return self

    @property
    def output_limit(self) -> int | None:
        """The most output tokens a choice may have: ``max_tokens`` or OpenAI's newer
        ``max_completion_tokens``, whichever the job sets (never both); None when neither."""
        limit: int | None = self.max_tokens or (self.model_extra or {}).get("max_completion_tokens")
        return limit

    @property
    def choices(self) -> int:
        """The choices (``n``) the job asks for, each generated and billed."""
        n: int = (self.model_extra or {}).get("n") or 1
        return n


_DEEP = ("tools", "tool_choice", "response_format")
"""ChatParams' own fields that hold more than their type here says."""


class ChatJob(WireModel):
    """A chat completion to run; ``job_id`` is the idempotency key, set by the producer."""

    v: int = SCHEMA_VERSION
    job_id: JobId = Field(min_length=1, max_length=128)
    team: str = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_-]*$")
    model: StoredText = Field(min_length=1, max_length=128)
    messages: list[ChatMessage] = Field(min_length=1)
    params: ChatParams = ChatParams()
    fallbacks: RequestFallbacks | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    deadline: AwareDatetime | None = None
    stream: bool = False
    chunk_wait: float | None = Field(default=None, gt=0)
    """For a streamed job: the seconds its caller waits for each next chunk (an SDK's read
    timeout). Its ``deadline`` then bounds the wait for the first chunk only: once that has
    left, the stream runs on while each chunk comes within ``chunk_wait`` of the one before,
    up to the worker's time limit. Unset, the deadline bounds the whole stream."""
    cache: bool | None = None
    """True: may be answered from the response cache (and fills it); False: never; None
    (unset): as the team's ``cache`` default says."""
    unsupported_params: UnsupportedParams | None = None
    """For this job, overrides the team's and the catalog's policy (docs/providers.md)."""
    answer_format: AnswerFormat = "openai"
    """The API its caller reads the answer in. An answer a Messages API message has no form
    for (``provider_formats.NotAnObject``) reaches an ``anthropic`` caller as an error: its
    usage is recorded as one (``provider_error``, billed), not ``ok``."""

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, metadata: dict[str, Any]) -> dict[str, Any]:
        # Batch and custom ids in it are stored with the batch's results.
        for key, value in metadata.items():
            _check_values("a key", key)
            _check_values(key, value)
        return metadata

    @model_validator(mode="after")
    def _answered(self) -> ChatJob:
        # As the front door checks a request (``check_chat_body``): a provider refuses a
        # conversation whose tool calls go unanswered only once the job has waited its turn.
        # Read only where a tool takes part: the general reading cost a job of two plain
        # messages 2.7 µs, a third of its parse; this look, 0.3.
        for message in self.messages:
            if message.tool_calls is not None or message.role == "tool":
                unanswered = unanswered_tool_calls(self.messages)
                if unanswered is not None:
                    raise unanswered
                break
        return self

    @property
    def ends_by(self) -> datetime | None:
        """When the job's work is over at the latest, as far as the job says: its deadline,
        but None for a stream its chunks keep going past it (``chunk_wait``), which only the
        worker's time limit bounds."""
        return None if self.stream and self.chunk_wait is not None else self.deadline


def prompt_cache_ttl(job: ChatJob) -> Literal["5m", "1h"] | None:
    """How long the job asks part of its prompt to be cached (a ``cache_control`` on a
    message, a content part or a tool): "1h" when any mark says so, else "5m"; None when it
    marks none. What a write to the cache is priced at before the provider says it wrote."""
    marks: list[Any] = []
    for message in job.messages:
        if message.model_extra:
            marks.append(message.model_extra.get("cache_control"))
        parts = message.content if isinstance(message.content, list) else ()
        marks += [part.get("cache_control") for part in parts]
    marks += [tool.get("cache_control") for tool in job.params.tools or ()]
    marked = [mark for mark in marks if mark is not None]
    if not marked:
        return None
    hour = any(isinstance(mark, dict) and mark.get("ttl") == "1h" for mark in marked)
    return "1h" if hour else "5m"


def request_digest(job: ChatJob) -> str:
    """What makes two jobs the same request: team, model, fallbacks, messages, parameters.

    A job id is bound to its request's digest (claims, cached answers, results)."""
    request = {"team": job.team, "model": job.model, "fallbacks": job.fallbacks}
    # Messages and parameters as each one's ``model_dump(exclude_none=True)``, in one call of
    # the job's serializer (a dump per message cost as much again in pydantic's own Python).
    request |= _JOB_PYTHON.to_python(job, include=_DIGESTED, exclude_none=True)
    return hashlib.sha256(orjson.dumps(request, option=orjson.OPT_SORT_KEYS)).hexdigest()


_JOB_PYTHON = ChatJob.__pydantic_serializer__
_DIGESTED = {"messages", "params"}


def body_digest(body: bytes) -> str:
    """What tells one request refused under a job id from another: a refused job's usage
    row is ``<job id>/refused/`` and this, the same for a redelivery or a replay of it."""
    return hashlib.sha256(body).hexdigest()[:32]


class Attempt(WireModel):
    """One call to one deployment, as recorded on results and usage events."""

    model: str
    deployment: str
    provider: str
    status: int | None = None
    """The provider's HTTP status; None when no response head arrived (timeout, connection)."""
    error: str | None = None
    """The error class (``timeout``, ``connection``, ``server_error``, ``rate_limited``, …)."""
    latency_ms: float = 0.0


class ErrorInfo(WireModel):
    code: ErrorCode
    message: str
    param: str | None = None
    """The request's field at fault, when a provider refusing the request named it (OpenAI's
    error ``param``): the front door's OpenAI-format error carries it."""
    attempts: int = 0
    retry_after_ms: float | None = None
    """For ``rate_limited``: how much longer the job would have had to wait."""


class GatewayInfo(WireModel):
    """How the gateway served a job: which model, where, how long, at what cost."""

    model_requested: str
    model_used: str | None = None
    provider: str | None = None
    deployment: str | None = None
    fallback_used: bool = False
    cached: bool = False
    queued_ms: float = 0.0
    latency_ms: float = 0.0
    attempts: list[Attempt] = Field(default_factory=list)
    cost_usd: Money = Decimal(0)
    worker: str = ""
    params_dropped: list[str] | None = None
    """Job parameters the provider could not take, left out (``unsupported_params: drop``)."""
    params_changed: list[str] | None = None
    """Job parameters sent with another value than asked (``unsupported_params: drop``)."""
    tokens_estimated: bool | None = None
    """True when the provider reported no usage to bill by for what it generated (a stream
    that broke; an answer without counts, or with none readable) and the tokens were counted
    from the text, UTF-8 bytes / 4."""
    trace_id: str | None = None
    """The OpenTelemetry trace the job ran in (32 hex digits), when the worker traces."""
    stream: str | None = None
    """The stream of deltas this answer was relayed as (``StreamChunk.stream``), for a
    streamed job; None otherwise, and from a worker that predates it."""


class ChatResult(WireModel):
    """The final answer to a job: an OpenAI ``chat.completion`` or an error, and how it went."""

    v: int = SCHEMA_VERSION
    job_id: str
    team: str
    status: JobStatus
    response: dict[str, Any] | None = None
    error: ErrorInfo | None = None
    gateway: GatewayInfo
    request: str | None = None
    """The ``request_digest`` of the request this answers; for a job refused before it was
    admitted (unreadable, or not proven its team's), the ``message_digest`` of the message
    refused (``queuegate.signing``). Two requests under one id get different answers
    (``idempotency_conflict`` for the later) on the same reply queue, and anyone publishing as
    the team may send a bad message under a job id to another's reply queue: a client tells
    them apart by it.
    None only in results of older workers."""

    @property
    def content(self) -> str | None:
        """The first choice's text, for callers that want just that."""
        if self.response is None:
            return None
        choices = self.response.get("choices") or [{}]
        message = choices[0].get("message") or {}
        text = message.get("content")
        return text if isinstance(text, str) else None


class StreamChunk(WireModel):
    """One streamed delta, sent to ``reply_to`` in ``seq`` order before the final ChatResult."""

    v: int = SCHEMA_VERSION
    job_id: str
    seq: int
    delta: dict[str, Any]
    model: str | None = None
    """The model the provider says is answering, as the answer's ``model`` names it (None
    from a worker that predates it)."""
    model_used: str | None = None
    """The alias serving the job, as its result's ``gateway.model_used`` will name it (a
    fallback's when one serves it: none can once a chunk is out); None from a worker that
    predates it."""
    cached: bool = False
    """The chunk replays the response cache's answer (``gateway.cached`` of the result)."""
    index: int = 0
    """The choice the delta belongs to: more than one with ``n`` > 1."""
    logprobs: dict[str, Any] | None = None
    """That choice's logprobs for the delta (OpenAI's ``content`` and ``refusal`` lists), when
    the job asked for them and the provider sent them."""
    system_fingerprint: str | None = None
    service_tier: str | None = None
    """What the provider sent beside the choices, repeated on each chunk as OpenAI does."""
    anthropic_events: list[dict[str, Any]] | None = None
    """An Anthropic deployment's own stream events the delta was read from, for Anthropic
    callers (``frontdoor.anthropic_stream``); ``[]`` for its cached answer, whose blocks are
    written whole at the end; None from any other provider."""
    stream: str | None = None
    """The delivery streaming it, a random id: a job's deltas are of one call. Should its
    worker be lost mid-stream and the job be called again, the next delivery's chunks, and
    its result (``GatewayInfo.stream``), name another, and the reader ends the stream broken
    rather than join two answers (``producer.streams``); None from a worker that predates
    it."""


class AuditContent(WireModel):
    """A job's prompt and response, kept as its team's capture setting says (issue 6)."""

    capture: Literal["redacted", "full"]
    prompt: list[dict[str, Any]]
    response: dict[str, Any] | None = None


class UsageEvent(WireModel):
    """What one finished job cost; accounting writes one row per ``job_id``, and one more per
    claim that called it again (``claim``)."""

    v: int = SCHEMA_VERSION
    job_id: str
    team: str
    model_requested: str
    model_used: str | None = None
    provider: str | None = None
    deployment: str | None = None
    input_tokens: int = 0
    """Every prompt token, those read from and written to a prompt cache included."""
    output_tokens: int = 0
    """Every generated token, reasoning (thinking) tokens included."""
    cached_tokens: int = 0
    """Prompt tokens read from the provider's prompt cache."""
    cache_write_tokens: int = 0
    """Prompt tokens written to the provider's prompt cache (Anthropic bills them apart)."""
    reasoning_tokens: int = 0
    cost_usd: Money = Decimal(0)
    status: JobStatus
    error_code: ErrorCode | None = None
    queued_ms: float = 0.0
    latency_ms: float = 0.0
    attempts: int = 0
    """How many calls were made; ``attempt_log`` lists them."""
    fallback_used: bool = False
    cached: bool = False
    reply_delivered: bool = True
    """False when the reply queue was gone and the broker returned the result."""
    worker: str = ""
    ts: AwareDatetime = Field(default_factory=lambda: datetime.now(UTC))
    # Tenancy and audit: who published the job, what PII its prompt held, what is kept of it.
    identity: str | None = None
    """``queue``, ``broker:<user>`` or ``api_key:<key id>``; None when it was never proven."""
    pii: str | None = None
    """PII families found in the prompt, comma-separated (policies warn, redact, block)."""
    content: AuditContent | None = None
    attempt_log: list[Attempt] | None = None
    """Every call made for the job, in order, as on the result; None from a worker that
    predates the log (its ``attempts`` still counts them)."""
    params_dropped: str | None = None
    """As on the result, comma-separated (like ``pii``); None when nothing was."""
    params_changed: str | None = None
    tokens_estimated: bool | None = None
    trace_id: str | None = None
    """The OpenTelemetry trace the job ran in (32 hex digits), when the worker traces; kept in
    usage_log, so that a row of spend leads to its trace."""
    span_id: str | None = None
    """The job's span in that trace (16 hex digits) when it was recorded (sampled): accounting
    continues the trace from it with its write."""
    claim: str | None = None
    """The owner of the job's claim whose delivery (or sweep) made the calls billed here, as
    stored with the outcome and sent again with it; None when the job was served unclaimed
    (Redis unreachable). A job's event under another claim bills calls made again after Redis
    lost the first's outcome: accounting keeps it on a row of its own (``AGAIN_MARK``)."""
    covers: list[str] | None = None
    """The claims whose calls this event bills as ``lost`` (their owners' leases lapsed, the
    job taken over): an owner among them that lived after all bills nothing more, and
    accounting never bills one of them again on a row of its own."""


class UsageBatch(WireModel):
    """The usage events of several jobs in one message (type ``usage-batch``).

    A worker sends the events of the jobs that finish while its previous batch awaits the
    broker's confirm together (one event when it is idle), and acknowledges each job only once
    the batch carrying its event is confirmed. Each event is the UsageEvent it would be alone:
    accounting writes one row per job however often, and in whichever batch, it arrives. A
    message of type ``usage`` holds one UsageEvent, as workers before batches sent them.
    """

    v: int = SCHEMA_VERSION
    events: list[UsageEvent] = Field(min_length=1)


def usage_batch_body(events: Sequence[bytes]) -> bytes:
    """A UsageBatch's JSON from its events' JSON, each as ``UsageEvent.model_dump_json`` made
    it: joined as bytes, not parsed and dumped again."""
    return b'{"v":%d,"events":[%b]}' % (SCHEMA_VERSION, b",".join(events))
