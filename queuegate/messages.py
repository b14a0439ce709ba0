"""The wire contract: every body that crosses the broker, as pydantic v2 models.

Bodies are JSON (``content_type=application/json``) and carry ``v``, the schema version.
Unknown fields are ignored on read, so a newer producer never breaks an older worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION = 1
CONTENT_TYPE = "application/json"

ErrorCode = Literal[
    "unauthorized",
    "budget_exhausted",
    "invalid_request",
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
]

HTTP_STATUS: dict[str, int] = {
    "unauthorized": 401,
    "budget_exhausted": 402,
    "invalid_request": 400,
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
}
"""The HTTP status each error code is answered with: by the HTTP front door (every API it
speaks) and in batch output lines. ``queue_full`` is a 429 (retry later, as the SDKs do),
``unknown_model`` a 404 (as OpenAI answers a model it does not have)."""


JobStatus = Literal["ok", "error"]
"""How a job ended: answered, or with an error (``ErrorInfo``)."""

UnsupportedParams = Literal["refuse", "drop"]
"""What the gateway does with a job parameter a provider cannot take as asked: ``refuse`` it
on that deployment (the job goes on to the next one, and fails ``invalid_request`` naming the
parameter when none can take it), or ``drop`` it (or change it) and list it on the result."""


class WireModel(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class ChatMessage(BaseModel):
    """One message in OpenAI chat format; content is a string or a list of content parts."""

    model_config = ConfigDict(extra="allow", frozen=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ChatParams(BaseModel):
    """Sampling and tool parameters in OpenAI form; unknown ones pass through to the provider."""

    model_config = ConfigDict(extra="allow", frozen=True)

    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stop: str | list[str] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    seed: int | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _choices(self) -> ChatParams:
        # ``n`` is passed through like any extra, but zero choices would be an answer with
        # nothing in it (OpenAI refuses it; an adapter would name it wrongly).
        n = (self.model_extra or {}).get("n")
        if n is not None and (type(n) is not int or not 1 <= n <= MAX_CHOICES):
            raise ValueError(f"n: the number of choices is a whole number from 1 to {MAX_CHOICES}")
        return self


MAX_CHOICES = 128
"""The most choices (``n``) one job may ask for: OpenAI's limit."""


class ChatJob(WireModel):
    """A chat completion to run; ``job_id`` is the idempotency key, set by the producer."""

    v: int = SCHEMA_VERSION
    job_id: str = Field(min_length=1, max_length=128)
    team: str = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_-]*$")
    model: str = Field(min_length=1, max_length=128)
    messages: list[ChatMessage] = Field(min_length=1)
    params: ChatParams = ChatParams()
    fallbacks: list[str] | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    deadline: datetime | None = None
    stream: bool = False
    cache: bool | None = None
    """True: may be answered from the response cache (and fills it); False: never; None
    (unset): as the team's ``cache`` default says."""
    unsupported_params: UnsupportedParams | None = None
    """For this job, overrides the team's and the catalog's policy (docs/providers.md)."""


class Attempt(WireModel):
    """One call to one deployment, as recorded on results and usage events."""

    model: str
    deployment: str
    provider: str
    status: int | None = None
    """The provider's HTTP status; None when no response arrived (timeout, connection)."""
    error: str | None = None
    """The error class (``timeout``, ``connection``, ``server_error``, ``rate_limited``, …)."""
    latency_ms: float = 0.0


class ErrorInfo(WireModel):
    code: ErrorCode
    message: str
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
    cost_usd: Decimal = Decimal(0)
    worker: str = ""
    params_dropped: list[str] | None = None
    """Job parameters the provider could not take, left out (``unsupported_params: drop``)."""
    params_changed: list[str] | None = None
    """Job parameters sent with another value than asked (``unsupported_params: drop``)."""
    tokens_estimated: bool | None = None
    """True when the provider reported no usage for what it generated (a stream that broke)
    and the tokens were counted from the text received, characters / 4."""
    trace_id: str | None = None
    """The OpenTelemetry trace the job ran in (32 hex digits), when the worker traces."""


class ChatResult(WireModel):
    """The final answer to a job: an OpenAI ``chat.completion`` or an error, and how it went."""

    v: int = SCHEMA_VERSION
    job_id: str
    team: str
    status: JobStatus
    response: dict[str, Any] | None = None
    error: ErrorInfo | None = None
    gateway: GatewayInfo

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


class AuditContent(WireModel):
    """A job's prompt and response, kept as its team's capture setting says (issue 6)."""

    capture: Literal["redacted", "full"]
    prompt: list[dict[str, Any]]
    response: dict[str, Any] | None = None


class UsageEvent(WireModel):
    """What one finished job cost; accounting writes exactly one row per ``job_id``."""

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
    cost_usd: Decimal = Decimal(0)
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
    ts: datetime = Field(default_factory=lambda: datetime.now(UTC))
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
