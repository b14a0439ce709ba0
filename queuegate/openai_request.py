"""OpenAI chat request bodies (``POST /v1/chat/completions``, an OpenAI batch line's
``body``) checked as OpenAI checks them, before anything is published.

``check_chat_body(body, model, limits)`` raises ``InvalidRequest`` naming what is wrong;
``body_refusal(body, limits)`` says the same of an OpenAI batch line's ``body``, for the
batch to answer that line 400 rather than send on what the endpoint refuses:

- top-level fields OpenAI's chat completions do not have
  (``queuegate.provider_formats.OPENAI_CHAT_PARAMS``), all of them at once, save those the
  router takes on purpose (docs/providers.md): Anthropic's ``top_k`` and ``thinking``, and,
  for a model an ``openai_compatible`` server may serve, any other (such servers have
  parameters of their own, which the openai SDK sends with ``extra_body``); the job's own
  fields (``team``, ``deadline``, ``cache``, …) never, as the gateway sets them, but its
  ``fallbacks`` (``REQUEST_JOB_FIELDS``);
- values of another type than OpenAI's (no coercion: ``"5"`` is no integer) or out of its
  bounds (``stop`` holds at most 4 sequences, ``temperature`` 0 to 2, …), and objects
  without what they must hold (a tool without its ``function``). What an object may hold
  beyond is left to the provider.

The front door looks the model, and the request's own fallbacks, up in the catalog (404 for
one not served); a batch line's are not: one not served is answered as any job's, by the
worker.
"""

from __future__ import annotations

from typing import Annotated, Any, Required

from pydantic import Field, TypeAdapter, ValidationError

from queuegate.errors import InvalidRequest
from queuegate.messages import ChatJob, ErrorInfo, RequestFallbacks
from queuegate.openai_messages import Message, unanswered_tool_calls
from queuegate.openai_params import JobParams, too_many_stops
from queuegate.provider_formats import OPENAI_CHAT_PARAMS
from queuegate.request_errors import invalid_request, refusal
from queuegate.request_limits import Limits, check_output_tokens, checked_messages
from queuegate.value_errors import shown

ROUTED_EXTRAS = frozenset({"top_k", "thinking"})
"""Anthropic's parameters, which the router maps for OpenAI or passes on to Anthropic."""
REQUEST_JOB_FIELDS = frozenset({"fallbacks"})
"""The job's own fields a request may name (``RequestFallbacks``), as LiteLLM's proxy takes
them in the body (the SDKs' ``extra_body``)."""
JOB_FIELDS = frozenset(ChatJob.model_fields) - OPENAI_CHAT_PARAMS - REQUEST_JOB_FIELDS
"""The job's own fields (``team``, ``deadline``, ``cache``, …): set by the gateway."""
NAMED = 5
"""Unknown fields an error names at most."""


class ChatRequest(JobParams, total=False):
    """The body of ``POST /v1/chat/completions`` (the openai SDK's
    ``CompletionCreateParams``) with the bounds OpenAI's API reference gives: its parameters
    and its messages as a worker types a job's (``JobParams``, ``Message``), and the job's
    own ``fallbacks`` it may name."""

    model: Required[str]
    messages: Required[Annotated[list[Message], Field(min_length=1)]]
    stream: bool | None
    fallbacks: RequestFallbacks | None


_CHAT_REQUEST = TypeAdapter(ChatRequest)


def body_refusal(body: dict[str, Any], limits: Limits) -> ErrorInfo | None:
    """Why ``POST /v1/chat/completions`` would refuse the ``body`` of an OpenAI batch line
    (a batch's ``producer.batch.jobs.Check``), or None when it takes it: the endpoint's
    error, its ``param`` the field it names."""
    model = body.get("model")
    try:
        check_chat_body(body, model if isinstance(model, str) else "", limits)
        check_output_tokens(body)  # the endpoint's, applied as it makes the job
    except InvalidRequest as exc:
        return refusal(exc)
    return None


def check_chat_body(body: dict[str, Any], model: str, limits: Limits) -> list[Any]:
    """The checks of a body for ``model`` (which fields it may carry depends on it); its
    messages, counted (``checked_messages``)."""
    messages = checked_messages(body, limits.max_messages)
    _known_fields(body, model, limits)
    try:
        _CHAT_REQUEST.validate_python(body)
    except ValidationError as exc:
        raise invalid_request(exc, body) from None
    if body.get("stream_options") is not None and body.get("stream") is not True:
        # OpenAI's 400; a job's stream is its own field, not a parameter, so it is told here.
        raise InvalidRequest(
            "stream_options: only allowed when stream is true", param="stream_options"
        )
    unanswered = unanswered_tool_calls(messages)
    if unanswered is not None:
        raise InvalidRequest(str(unanswered), param=unanswered.param)
    too_many = too_many_stops(body.get("stop"))
    if too_many is not None and model in limits.stop_capped:
        # OpenAI's cap, for a model OpenAI serves, as the worker's router keeps it: Anthropic
        # takes more (an Anthropic-format job's stop_sequences are its stop).
        raise InvalidRequest(f"stop: {too_many}", param="stop")
    return messages


def _known_fields(body: dict[str, Any], model: str, limits: Limits) -> None:
    if "extra_body" in body:
        raise InvalidRequest(
            "extra_body: the openai SDK sends the fields of extra_body at the top level of "
            "the body; send them there"
        )
    unknown = sorted(body.keys() - OPENAI_CHAT_PARAMS - ROUTED_EXTRAS - REQUEST_JOB_FIELDS)
    refused = [name for name in unknown if model not in limits.open_models or name in JOB_FIELDS]
    if not refused:
        return
    if any(name in JOB_FIELDS for name in refused):
        why = "the gateway sets a job's own fields (its team from the key, its deadline from "
        why += "x-queuegate-timeout), a request does not"
    else:
        why = "not parameters of OpenAI's chat completions, and no OpenAI-compatible server "
        why += f"that takes its own serves {shown(model)!r}"
    raise unrecognized(refused, why)


def unrecognized(names: list[str], why: str) -> InvalidRequest:
    """The refusal of a body's fields its endpoint does not have, the first ``NAMED`` by
    name (OpenAI's ``Unrecognized request argument``), saying ``why``."""
    listed = ", ".join(shown(name) for name in names[:NAMED])
    if len(names) > NAMED:
        listed += f" and {len(names) - NAMED} more"
    return InvalidRequest(f"unrecognized request arguments {listed}: {why}")


__all__ = [
    "JOB_FIELDS",
    "REQUEST_JOB_FIELDS",
    "ROUTED_EXTRAS",
    "ChatRequest",
    "body_refusal",
    "check_chat_body",
    "unrecognized",
]
