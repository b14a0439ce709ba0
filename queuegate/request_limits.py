"""What the gateway takes of a request beyond its API's own schema: the catalog's models, how
many messages and output tokens a job carries, how large it is. The front door's endpoints
and a batch's checks of its requests (``producer.batch.checks``) read them alike::

    limits = Limits.of(settings, catalog)
    checked_messages(body, limits)      # InvalidRequest naming what is over
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from queuegate.errors import InvalidRequest
from queuegate.messages import MAX_OUTPUT_TOKENS

if TYPE_CHECKING:
    from queuegate.settings import Settings


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


def checked_messages(body: dict[str, Any], limits: Limits) -> list[Any]:
    """The request's messages, as many as a job may carry; InvalidRequest otherwise."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty array", param="messages")
    if len(messages) > limits.max_messages:
        raise InvalidRequest(
            f"{len(messages)} messages; at most {limits.max_messages} are served at once",
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


__all__ = ["Limits", "Served", "check_output_tokens", "checked_messages"]
