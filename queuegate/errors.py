"""The one error tree of queuegate.

    GatewayError                     base of everything queuegate raises on purpose
    ├── ConfigError                  settings or catalog are invalid
    │   ├── UnknownTeam              a report's team filter names no registered team (404)
    │   └── StartRefused             a supervised process cannot start as configured
    ├── ServiceUnavailable           RabbitMQ, Redis or PostgreSQL cannot be reached
    ├── JobError                     a job ends in an error; ``code`` is its wire error code
    │   ├── InvalidRequest           the job is malformed or breaks a limit (400)
    │   │   └── RequestTooLarge      the request is past ``max_job_bytes`` (413)
    │   ├── ContextLengthExceeded    no model along the chain takes a prompt this long (400)
    │   ├── UnknownModel             the alias is not in the catalog (400)
    │   ├── Unauthorized             the publisher may not act for the team (401)
    │   ├── DeadlineExceeded         the deadline passed before the job could be served (504)
    │   ├── RateLimited              limits would not let the job through in time (429)
    │   ├── BudgetExhausted          the team's (or model's) monthly budget is spent (402)
    │   ├── StreamInterrupted        the provider failed after the stream had started (502)
    │   ├── Canceled                 the job's batch was canceled before it was served (499)
    │   ├── IdempotencyConflict      the job id was used by a different request (422)
    │   ├── AlreadyAnswered          the job was answered before Redis lost its outcome (409)
    │   └── AllProvidersFailed       every deployment in the fallback chain failed (502)
    └── ClientError                  raised to producers
        ├── ResultTimeout            no result arrived within the timeout
        ├── StreamBroken             a stream's deltas went on from another call of its job
        ├── QueueFull                the broker refused the job: the team's queue is full (503)
        ├── PublishRefused           the broker did not accept the job (unroutable or nacked)
        ├── JobIdInFlight            the client awaits the job id for a different request
        ├── ControlRefused           the gateway refused a control request (limit, permission)
        └── BatchError               a batch cannot be submitted, collected or canceled
            └── BatchInvalid         lines of a batch file are invalid; ``problems`` lists them

Third-party errors (aiormq, httpx, asyncpg, redis) are translated at the boundary with
``raise ... from exc``, so callers only ever catch these.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from queuegate.messages import Attempt, ErrorCode, ErrorInfo


class GatewayError(Exception):
    """Base of every error queuegate raises on purpose."""


class ConfigError(GatewayError):
    """Settings or the model catalog are invalid; the message says which field and why."""


class UnknownTeam(ConfigError):
    """A report's team filter names a team that is not registered."""

    def __init__(self, team: str) -> None:
        super().__init__(f"no team named {team}: list them with queuegate teams list")
        self.team = team


class StartRefused(ConfigError):
    """A process its supervisor started cannot start as configured, before it was ever
    ready: started again it would fail the same way, so it exits with ``status``, at which
    its supervisor stops them all (``queuegate.supervisor``)."""

    status = 78
    """sysexits' EX_CONFIG: no status Python or the CLI gives for anything else."""


class ServiceUnavailable(GatewayError):
    """A backing service cannot be reached; the message names it and how to start it."""


class JobError(GatewayError):
    """A job ends with an error result; ``code`` is the wire error code it is answered with."""

    code: ErrorCode
    retry_after_ms: float | None = None
    """How long the caller should wait before trying again, when the gateway knows."""

    billed: Billed | None = None
    """What its calls still cost, though it failed (a stream that broke after the provider
    generated text, requests that timed out once sent): on its usage row, in its result and
    in its budget ledger."""

    def __init__(
        self, message: str, attempts: list[Attempt] | None = None, *, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.attempts = attempts or []
        self.param = param
        """The request's field at fault, when a provider refusing the request named it (as
        OpenAI's errors do in ``param``)."""


class InvalidRequest(JobError):
    """The job is not valid JSON, not a valid ChatJob, or breaks an input limit."""

    code: ErrorCode = "invalid_request"


class RequestTooLarge(InvalidRequest):
    """A request larger than the gateway takes (``max_job_bytes``, of its model, messages and
    parameters: ``request_limits.request_bytes``): the front door answers it 413, and a
    batch its line, never published."""

    code = "request_too_large"


class ContextLengthExceeded(JobError):
    """Every deployment along the chain (context fallbacks included) found the prompt too
    long for its context window."""

    code = "context_length_exceeded"


class UnknownModel(JobError):
    """The job names a model alias the catalog does not have."""

    code = "unknown_model"


class Unauthorized(JobError):
    """The job's proven publisher or team field does not own the queue it came from."""

    code = "unauthorized"


class DeadlineExceeded(JobError):
    """The job's deadline passed before a provider could be called."""

    code = "deadline_exceeded"


class RateLimited(JobError):
    """Limits would not let the job through in time: its own buckets would not admit it
    before its deadline or the maximum wait, or every deployment tried answered 429 within
    the job's retry budget."""

    code = "rate_limited"

    def __init__(
        self,
        message: str,
        attempts: list[Attempt] | None = None,
        *,
        retry_after_ms: float | None = None,
    ) -> None:
        super().__init__(message, attempts)
        self.retry_after_ms = retry_after_ms


class BudgetExhausted(JobError):
    """The team's monthly budget (or its cap for the model) cannot cover the job's estimate."""

    code = "budget_exhausted"


@dataclass(frozen=True)
class Billed:
    """What a failed call still cost: a stream that broke after the provider generated text,
    or a request that timed out once sent (its estimate, as a lost call's)."""

    model_used: str
    deployment: str
    provider: str
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    cost_usd: Decimal
    estimated: bool
    """The provider sent no usage: the tokens were counted from the text, UTF-8 bytes / 4."""
    cache_write_tokens: int = 0
    """Of ``input_tokens``, written to a prompt cache (a broken stream's message_start says
    so): priced in ``cost_usd``, and recorded as a whole answer's are."""


class StreamInterrupted(JobError):
    """The provider failed after deltas were relayed: no fallback can continue that stream.
    ``billed`` is what the provider generated until then, which it bills."""

    code = "provider_error"

    def __init__(
        self, message: str, attempts: list[Attempt] | None = None, *, billed: Billed | None = None
    ) -> None:
        super().__init__(message, attempts)
        self.billed = billed


class WorkerFault(JobError):
    """The worker itself failed on the job, in a way a redelivery would meet again (a value
    no check caught, a bug): the job is answered with this error at once rather than coming
    back until the broker's delivery limit with no answer at all."""

    code = "provider_error"


class Canceled(JobError):
    """The job belongs to a batch that was canceled; no provider is called for it."""

    code = "canceled"


class IdempotencyConflict(JobError):
    """The job's id already names a different request (model, messages, parameters,
    fallbacks or team differ): it is not served, and never answered with the other's result."""

    code = "idempotency_conflict"
    answered_usd: Decimal | None = None
    """What the answer of the request the id names cost, when the refusal found it stored."""


class AlreadyAnswered(JobError):
    """The job was answered (its usage row is in PostgreSQL) but Redis no longer holds the
    result, which went to the original reply queue: it is not called again."""

    code = "already_answered"
    answered_usd: Decimal | None = None
    """What the job's usage row holds it cost, when the refusal read it there."""


class AllProvidersFailed(JobError):
    """Every deployment of the model and its fallbacks failed; ``attempts`` says how."""

    code = "all_providers_failed"


BAD_INPUT = frozenset(
    error.code for error in (InvalidRequest, UnknownModel, Unauthorized, IdempotencyConflict)
)
"""Error codes that mean the job itself is wrong: a worker answers it with the error, then
dead-letters it under that code, so a dead letter of one was answered when it died."""


class ClientError(GatewayError):
    """Raised to producers by the client library."""


class ResultTimeout(ClientError):
    """No result arrived for a job within the timeout; the job may still be answered later."""


class AnswerTaken(ClientError):
    """A wait for a job whose answer this client has handed over already (to a handle, a
    stream or an earlier wait) or dropped as nobody's: a client keeps an answer until it is
    taken, not after, and a second one never comes unless the job is submitted again."""

    def __init__(self, job_id: str) -> None:
        super().__init__(
            f"the answer to job {job_id} was taken already on this client (by its handle, its "
            "stream or an earlier wait): keep it from there, or submit the job again"
        )
        self.job_id = job_id


class StreamBroken(ClientError):
    """A streamed job's worker was lost mid-stream and the job was called again: that call's
    deltas, or its answer, are not those of the deltas already read, so the stream ends
    here. The job's answer is its result, whole (``GatewayClient.wait``)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(
            f"the stream of job {job_id} broke: the worker streaming it was lost, and the job "
            "was answered by another call; read its answer whole (wait for job "
            f"{job_id}'s result, or GET /v1/jobs/{job_id})"
        )
        self.job_id = job_id


class GaveUp(Exception):
    """A wait for a job's result or its next chunk ended before them, as the client stops
    (``producer.replies.Inbox.give_up``): the job runs on, its result kept for a later read."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"stopped waiting for job {job_id}")
        self.job_id = job_id


class QueueFull(ClientError):
    """The team's queue is at its quota and the broker refused the job; retry later."""


class JobIdInFlight(ClientError):
    """A job id the client still awaits, submitted again with a different request."""


class PublishRefused(ClientError):
    """The broker did not accept the job: no queue for the team, or a negative confirm."""


class ControlRefused(ClientError):
    """The gateway refused a control request (a limit, a permission); the message says why."""


class TeamDisabled(ControlRefused):
    """The team is disabled: an operator enables it again (``queuegate teams add``)."""


class BatchError(ClientError):
    """A batch cannot be submitted, collected or canceled; the message says what to do."""


class BatchInvalid(BatchError):
    """Lines of a batch file are invalid; ``problems`` holds (line number, reason) pairs, and
    ``refused`` (line number, error) those of requests a check of their API refused
    (``producer.batch.jobs``)."""

    def __init__(
        self,
        message: str,
        problems: list[tuple[int, str]],
        *,
        refused: list[tuple[int, ErrorInfo]] | None = None,
    ) -> None:
        super().__init__(message)
        self.problems = problems
        self.refused = refused or []


class NotText(BatchInvalid):
    """A batch file is not UTF-8 text (a binary file, another encoding): refused whole, its
    one problem the first byte that is not UTF-8, which the message names too."""
