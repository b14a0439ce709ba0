"""What the gateway takes of a request beyond its API's own schema: the catalog's models, how
many messages and output tokens a job carries, how deep its JSON nests, how large its
request is. The front door's endpoints and a batch's requests (``producer.batch.checks``,
``producer.batch.jobs.JobReader``) are checked by these alike::

    limits = Limits.of(settings, catalog)
    checked_messages(body, limits.max_messages)  # InvalidRequest naming what is over
    check_nesting(request)              # of the canonical request, before its job is made
    check_job_size(job, limits.max_job_bytes)   # RequestTooLarge (413)

``max_job_bytes`` bounds the request a job carries (``request_bytes``: its model, messages,
parameters), not the job's own fields around it, which differ by the way it came in: a
batch's job has a longer id and its batch and custom id in its metadata, a synchronous one a
deadline. So a request is taken or refused alike whichever way it is sent; a worker takes a
job up to ``JOB_OWN_BYTES`` larger.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from queuegate.errors import InvalidRequest, RequestTooLarge
from queuegate.messages import MAX_OUTPUT_TOKENS, ChatJob

if TYPE_CHECKING:
    from queuegate.settings import Settings

REQUEST_FIELDS = frozenset({"model", "messages", "params", "fallbacks"})
"""A job's request, as its caller sent it (what ``request_digest`` compares too); its other
fields are the job's own: id, team, metadata, deadline, how it is answered."""

JOB_OWN_BYTES = 4096
"""Bytes a job may carry beyond its request (``max_job_bytes``) that a worker takes: the
gateway's own jobs carry under 1 KiB of them (an id of 128 characters, a team of 64, a
batch's name and custom id, a deadline, flags); the rest is room for a producer's metadata."""

MAX_NESTING = 100
"""Levels a request's JSON may nest: far past any schema a provider takes (OpenAI's structured
outputs take 10 levels), and far inside what a job's JSON encoding and the workers' decoding
carry (about 250 and 200: a tool schema nested 390 levels was a 500 at the front door, one
nested 200 a worker's refusal in its words)."""


class Served(Protocol):
    """What ``Limits.of`` reads of the catalog (``router.Catalog``, which this ground may
    not import)."""

    @property
    def models(self) -> Mapping[str, object]: ...

    def caps_stop(self, alias: str) -> bool: ...

    def takes_own_params(self, alias: str) -> bool: ...


@dataclass(frozen=True)
class Limits:
    models: Collection[str]
    max_messages: int
    max_job_bytes: int
    open_models: Collection[str] = frozenset()
    """Models an ``openai_compatible`` deployment may serve (their own or a fallback's): such
    a server takes parameters of its own, so a request for one may carry fields OpenAI's
    API does not have."""
    stop_capped: Collection[str] = frozenset()
    """Models whose jobs take at most OpenAI's 4 stop sequences (``Catalog.caps_stop``)."""

    @classmethod
    def of(cls, settings: Settings, catalog: Served) -> Limits:
        return cls(
            models=frozenset(catalog.models),
            max_messages=settings.max_job_messages,
            max_job_bytes=settings.max_job_bytes,
            open_models=frozenset(filter(catalog.takes_own_params, catalog.models)),
            stop_capped=frozenset(filter(catalog.caps_stop, catalog.models)),
        )


def checked_messages(body: dict[str, Any], max_messages: int) -> list[Any]:
    """The request's messages, at most ``max_messages`` (the gateway's ``max_job_messages``,
    which a worker refuses past); InvalidRequest otherwise."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty array", param="messages")
    if len(messages) > max_messages:
        raise InvalidRequest(
            f"{len(messages)} messages; at most {max_messages} are served at once",
            param="messages",
        )
    return messages


def check_output_tokens(params: dict[str, Any], under: str = "") -> None:
    """InvalidRequest when ``params`` ask for more output tokens than ``MAX_OUTPUT_TOKENS``,
    the field named by its path under ``under`` (the path of ``params`` in what the caller
    sent). A batch's checks apply it too: left to the job's own bound, such a request would
    be no job at all, failing its whole OpenAI batch instead of itself."""
    for name in ("max_tokens", "max_completion_tokens"):
        value = params.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_OUTPUT_TOKENS:
            path = f"{under}.{name}" if under else name
            raise InvalidRequest(f"{path} is above {MAX_OUTPUT_TOKENS}", param=path)


def check_nesting(request: dict[str, Any]) -> None:
    """InvalidRequest when ``request`` (parsed JSON, a canonical request) nests more than
    ``MAX_NESTING`` objects and arrays deep."""
    if nests_deeper(request, MAX_NESTING):
        raise InvalidRequest(f"the request nests deeper than {MAX_NESTING} levels: flatten it")


def nests_deeper(value: Any, levels: int) -> bool:
    """Whether ``value`` (parsed JSON) nests more than ``levels`` objects and arrays deep."""
    if isinstance(value, dict):
        children: Any = value.values()
    elif isinstance(value, list):
        children = value
    else:
        return False
    return levels <= 0 or any(nests_deeper(child, levels - 1) for child in children)


def request_bytes(job: ChatJob) -> int:
    """The size of ``job``'s request, in bytes of the JSON it is published in (UTF-8)."""
    return len(job.model_dump_json(include=set(REQUEST_FIELDS), exclude_defaults=True).encode())


def check_job_size(job: ChatJob, max_bytes: int) -> None:
    """RequestTooLarge when ``job``'s request is larger than ``max_bytes`` (the gateway's
    ``max_job_bytes``, which a worker refuses past)."""
    if request_bytes(job) > max_bytes:
        raise too_large(max_bytes)


def too_large(max_bytes: int) -> RequestTooLarge:
    """The refusal of a request past ``max_bytes``: its body as read, or the job it makes."""
    return RequestTooLarge(f"the request is larger than {max_bytes} bytes: send less")


def body_too_large(max_bytes: int, body_bytes: int) -> RequestTooLarge:
    """The refusal of a body past ``body_bytes``, the most read of a request held to
    ``max_bytes`` once read: it names the limit a request is held to, as ``too_large`` does,
    not the body's bound (the same words for both read as two limits)."""
    return RequestTooLarge(
        f"the request is larger than the {max_bytes}-byte limit (its body is over {body_bytes} "
        "bytes, which no request within the limit reaches): send less"
    )


__all__ = [
    "JOB_OWN_BYTES",
    "MAX_NESTING",
    "REQUEST_FIELDS",
    "Limits",
    "Served",
    "body_too_large",
    "check_job_size",
    "check_nesting",
    "check_output_tokens",
    "checked_messages",
    "nests_deeper",
    "request_bytes",
    "too_large",
]
