"""``POST /v1/chat/completions`` bodies checked as OpenAI checks them, before anything is
published.

``check_chat(body, limits)`` raises ``ApiError`` (400, or 404 for a model the catalog does
not serve) naming what is wrong; ``body_refusal(body, limits)`` says the same of an OpenAI
batch line's ``body``, for the batch to answer that line 400 rather than send on what the
endpoint refuses:

- top-level fields OpenAI's chat completions do not have
  (``queuegate.provider_formats.OPENAI_CHAT_PARAMS``), all of them at once, save those the
  router takes on purpose (docs/providers.md): Anthropic's ``top_k`` and ``thinking``, and,
  for a model an ``openai_compatible`` server may serve, any other (such servers have
  parameters of their own, which the openai SDK sends with ``extra_body``); the job's own
  fields (``team``, ``deadline``, ``cache``, ``fallbacks``, …) never, as the gateway sets them;
- values of another type than OpenAI's (no coercion: ``"5"`` is no integer) or out of its
  bounds (``stop`` holds at most 4 sequences, ``temperature`` 0 to 2, …), and objects
  without what they must hold (a tool without its ``function``). What an object may hold
  beyond is left to the provider.
"""

from __future__ import annotations

from typing import Annotated, Any, Required

from pydantic import Field, TypeAdapter, ValidationError

from frontdoor.chat_request import Limits, check_output_tokens, checked_messages, served_model
from frontdoor.errors import ApiError, shown
from frontdoor.request_errors import invalid_request, refusal
from queuegate.messages import ChatJob, ErrorInfo
from queuegate.openai_messages import Message
from queuegate.openai_params import JobParams, too_many_stops
from queuegate.provider_formats import OPENAI_CHAT_PARAMS

ROUTED_EXTRAS = frozenset({"top_k", "thinking"})
"""Anthropic's parameters, which the router maps for OpenAI or passes on to Anthropic."""
JOB_FIELDS = frozenset(ChatJob.model_fields) - OPENAI_CHAT_PARAMS
"""The job's own fields (``team``, ``deadline``, ``fallbacks``, …): set by the gateway."""
NAMED = 5
"""Unknown fields an error names at most."""


class ChatRequest(JobParams, total=False):
    """The body of ``POST /v1/chat/completions`` (the openai SDK's
    ``CompletionCreateParams``) with the bounds OpenAI's API reference gives: its parameters
    and its messages as a worker types a job's (``JobParams``, ``Message``)."""

    model: Required[str]
    messages: Required[Annotated[list[Message], Field(min_length=1)]]
    stream: bool | None


_CHAT_REQUEST = TypeAdapter(ChatRequest)


def check_chat(body: dict[str, Any], limits: Limits) -> None:
    """Refuse what OpenAI's chat completions refuse (ApiError), before the job is made."""
    _check_for(body, served_model(body, limits), limits)


def body_refusal(body: dict[str, Any], limits: Limits) -> ErrorInfo | None:
    """Why ``POST /v1/chat/completions`` would refuse the ``body`` of an OpenAI batch line
    (a batch's ``producer.batch.jobs.Check``), or None when it takes it: the endpoint's
    error, its ``param`` the field it names. Its model is not looked up in the catalog: one
    not served is answered as any job's, by the worker (404 ``unknown_model``)."""
    model = body.get("model")
    try:
        _check_for(body, model if isinstance(model, str) else "", limits)
        check_output_tokens(body)  # the endpoint's, applied as it makes the job (chat_job)
    except ApiError as exc:
        return refusal(exc)
    return None


def _check_for(body: dict[str, Any], model: str, limits: Limits) -> None:
    """The checks of a body for ``model``: which fields it may carry depends on it."""
    checked_messages(body, limits)
    _known_fields(body, model, limits)
    try:
        _CHAT_REQUEST.validate_python(body)
    except ValidationError as exc:
        raise invalid_request(exc, body) from None
    too_many = too_many_stops(body.get("stop"))
    if too_many is not None and model in limits.stop_capped:
        # OpenAI's cap, for a model OpenAI serves, as the worker's router keeps it: Anthropic
        # takes more (an Anthropic-format job's stop_sequences are its stop).
        raise ApiError("invalid_request", f"stop: {too_many}", param="stop")


def _known_fields(body: dict[str, Any], model: str, limits: Limits) -> None:
    if "extra_body" in body:
        raise ApiError(
            "invalid_request",
            "extra_body: the openai SDK sends the fields of extra_body at the top level of "
            "the body; send them there",
        )
    unknown = sorted(body.keys() - OPENAI_CHAT_PARAMS - ROUTED_EXTRAS)
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


def unrecognized(names: list[str], why: str) -> ApiError:
    """The refusal of a body's fields its endpoint does not have, the first ``NAMED`` by
    name (OpenAI's ``Unrecognized request argument``), saying ``why``."""
    listed = ", ".join(shown(name) for name in names[:NAMED])
    if len(names) > NAMED:
        listed += f" and {len(names) - NAMED} more"
    return ApiError("invalid_request", f"unrecognized request arguments {listed}: {why}")


__all__ = ["ChatRequest", "body_refusal", "check_chat", "unrecognized"]
