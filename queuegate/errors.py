"""The one error tree of queuegate.

    GatewayError                     base of everything queuegate raises on purpose
    ├── ConfigError                  settings or catalog are invalid
    ├── ServiceUnavailable           RabbitMQ, Redis or PostgreSQL cannot be reached
    ├── JobError                     a job ends in an error; ``code`` is its wire error code
    │   ├── InvalidRequest           the job is malformed or breaks a limit (400)
    │   ├── UnknownModel             the alias is not in the catalog (400)
    │   ├── Unauthorized             the publisher may not act for the team (401)
    │   ├── DeadlineExceeded         the deadline passed before the job could be served (504)
    │   ├── RateLimited              limits would not let the job through in time (429)
    │   ├── BudgetExhausted          the team's (or model's) monthly budget is spent (402)
    │   ├── StreamInterrupted        the provider failed after the stream had started (502)
    │   ├── Canceled                 the job's batch was canceled before it was served (499)
    │   └── AllProvidersFailed       every deployment in the fallback chain failed (502)
    └── ClientError                  raised to producers
        ├── ResultTimeout            no result arrived within the timeout
        ├── QueueFull                the broker refused the job: the team's queue is full (503)
        ├── PublishRefused           the broker did not accept the job (unroutable or nacked)
        ├── ControlRefused           the gateway refused a control request (limit, permission)
        └── BatchError               a batch cannot be submitted, collected or canceled
            └── BatchInvalid         lines of a batch file are invalid; ``problems`` lists them

Third-party errors (aiormq, httpx, asyncpg, redis) are translated at the boundary with
``raise ... from exc``, so callers only ever catch these.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from queuegate.messages import Attempt, ErrorCode


class GatewayError(Exception):
    """Base of every error queuegate raises on purpose."""


class ConfigError(GatewayError):
    """Settings or the model catalog are invalid; the message says which field and why."""


class ServiceUnavailable(GatewayError):
    """A backing service cannot be reached; the message names it and how to start it."""


class JobError(GatewayError):
    """A job ends with an error result; ``code`` is the wire error code it is answered with."""

    code: ErrorCode
    retry_after_ms: float | None = None
    """How long the caller should wait before trying again, when the gateway knows."""

    def __init__(self, message: str, attempts: list[Attempt] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.attempts = attempts or []


class InvalidRequest(JobError):
    """The job is not valid JSON, not a valid ChatJob, or breaks an input limit."""

    code = "invalid_request"


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


class StreamInterrupted(JobError):
    """The provider failed after deltas were relayed: no fallback can continue that stream."""

    code = "provider_error"


class Canceled(JobError):
    """The job belongs to a batch that was canceled; no provider is called for it."""

    code = "canceled"


class AllProvidersFailed(JobError):
    """Every deployment of the model and its fallbacks failed; ``attempts`` says how."""

    code = "all_providers_failed"


class ClientError(GatewayError):
    """Raised to producers by the client library."""


class ResultTimeout(ClientError):
    """No result arrived for a job within the timeout; the job may still be answered later."""


class QueueFull(ClientError):
    """The team's queue is at its quota and the broker refused the job; retry later."""


class PublishRefused(ClientError):
    """The broker did not accept the job: no queue for the team, or a negative confirm."""


class ControlRefused(ClientError):
    """The gateway refused a control request (a limit, a permission); the message says why."""


class BatchError(ClientError):
    """A batch cannot be submitted, collected or canceled; the message says what to do."""


class BatchInvalid(BatchError):
    """Lines of a batch file are invalid; ``problems`` holds (line number, reason) pairs."""

    def __init__(self, message: str, problems: list[tuple[int, str]]) -> None:
        super().__init__(message)
        self.problems = problems
