"""What every provider adapter does, and how every provider failure is classified.

An adapter is pure translation: ``build_request`` turns a canonical job (OpenAI chat format)
into the provider's HTTP request, ``parse_response`` turns the provider's JSON body into a
canonical OpenAI ``chat.completion`` and its token usage. The HTTP call itself lives in
``router.transport``, so retries, streaming and breakers can wrap it without touching adapters.

Every failure becomes a ``ProviderError`` whose ``error_class`` comes from the one table below,
which also says whether the router moves on to the next deployment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from queuegate.errors import GatewayError
from queuegate.messages import ChatJob

ErrorClass = Literal[
    "timeout",
    "connection",
    "rate_limited",
    "server_error",
    "overloaded",
    "bad_request",
    "auth",
    "not_found",
    "context_length",
    "no_api_key",
    "unsupported",
    "bad_response",
]

MOVES_ON: dict[ErrorClass, bool] = {
    # Transient on the provider's side: another deployment may well answer.
    "timeout": True,
    "connection": True,
    "rate_limited": True,
    "server_error": True,
    "overloaded": True,
    # That deployment's configuration is wrong (key, account, model name): try the next one.
    "auth": True,
    "not_found": True,
    "no_api_key": True,
    # The request fits another model (bigger window, other content types) or another wire.
    "context_length": True,
    "unsupported": True,
    "bad_response": True,
    # The caller's request is wrong: every other deployment would refuse it too.
    "bad_request": False,
}
"""Whether a failure of each class moves on to the next deployment (False: the job fails)."""

_STATUS_CLASSES: dict[int, ErrorClass] = {
    400: "bad_request",
    401: "auth",
    402: "auth",  # Anthropic's billing_error: the account cannot be used
    403: "auth",
    404: "not_found",
    408: "timeout",
    409: "server_error",  # a conflict on the provider's side; Anthropic documents it as retryable
    413: "bad_request",  # Anthropic's request_too_large: the body itself is too big
    422: "bad_request",
    429: "rate_limited",
    503: "overloaded",
    529: "overloaded",  # Anthropic's overloaded_error
}

_CONTEXT_LENGTH_CODES = frozenset({"context_length_exceeded"})
_CONTEXT_LENGTH_TEXT = re.compile(
    r"context[ _-]?(length|window)|prompt is too long|too many (input )?tokens", re.IGNORECASE
)
"""OpenAI sends a code; Anthropic ("prompt is too long") and vLLM only say it in the message."""


def classify(status: int, code: str | None = None, message: str = "") -> ErrorClass:
    """The error class of an HTTP error response (status, error code and message from its body)."""
    error_class = _STATUS_CLASSES.get(status)
    if error_class == "bad_request" and (
        code in _CONTEXT_LENGTH_CODES or _CONTEXT_LENGTH_TEXT.search(message)
    ):
        return "context_length"
    if error_class is not None:
        return error_class
    if status >= 500:
        return "server_error"
    # Anything else (another 4xx, a redirect) means this deployment does not speak our wire.
    return "bad_response"


class ProviderError(GatewayError):
    """One call to one deployment failed; the router records it and decides what comes next.

    The message is always ours (an upstream excerpt at most, with the key scrubbed), never an
    httpx error text or a request header.
    """

    def __init__(
        self,
        error_class: ErrorClass,
        detail: str = "",
        *,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.error_class: ErrorClass = error_class
        self.status = status
        self.moves_on = MOVES_ON[error_class]
        self.retry_after = retry_after
        """Seconds the provider asked us to wait (Retry-After or retry-after-ms), if it said."""
        head = f"{status} {error_class}" if status is not None else error_class
        super().__init__(f"{head}: {detail}" if detail else head)


@dataclass(frozen=True)
class Usage:
    """Tokens of one call; ``input_tokens`` includes the ``cached_tokens`` read from a cache."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0


@dataclass(frozen=True)
class Completion:
    """A provider's answer in canonical form: an OpenAI ``chat.completion`` dict and its usage."""

    response: dict[str, Any]
    usage: Usage


@dataclass(frozen=True)
class UpstreamRequest:
    """One HTTP POST to a provider, relative to the deployment's api_base."""

    path: str
    body: dict[str, Any]
    headers: dict[str, str] = field(repr=False)
    """Kept out of repr: they carry the API key."""


class Adapter(Protocol):
    """Translates between the canonical job/response and one provider's wire format."""

    def build_request(self, job: ChatJob, model: str, api_key: str | None) -> UpstreamRequest:
        """The request for ``model`` (the upstream name); raises ProviderError("unsupported")."""
        ...

    def parse_response(self, body: Any, model: str) -> Completion:
        """The canonical completion of a 2xx body; raises ProviderError("bad_response")."""
        ...


def as_int(value: Any) -> int:
    """A token count from a usage object; absent or malformed counts are zero."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
