"""Anthropic Messages request bodies (``POST /v1/messages``, its ``count_tokens``, a Message
Batch request's ``params``): Anthropic's request schema, checked as Anthropic checks it.

Unknown fields, values of another type (``"yes"`` for a boolean: no coercion) and empty
content are refused, in the ``<field path>: <reason>`` wording of Anthropic's own
``invalid_request_error`` messages, as ``InvalidRequest``: ``messages_request`` and
``count_tokens_request`` for a body, ``params_refusal`` for a Message Batch request's
``params`` (a batch's ``producer.batch.jobs.Check``), so a batch refuses, by name, what
``/v1/messages`` refuses, rather than leaving it out unread. A batch request may not stream:
Anthropic types its ``params`` as ``MessageCreateParamsNonStreaming`` and answers a
parameter a batch does not take with a validation error.

What is taken is read as a canonical (OpenAI chat) request by
``queuegate.provider_formats.openai_request``, which refuses by name what the gateway cannot
carry (documents by URL, file id or content blocks, server tools, structured output's
``output_config.format``).
"""

from __future__ import annotations

import binascii
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from queuegate.errors import InvalidRequest
from queuegate.messages import ErrorInfo, RequestFallbacks
from queuegate.openai_params import AnthropicEffort, Thinking, ThinkingEnabled
from queuegate.provider_formats import ANTHROPIC_COUNT_TOKENS_PARAMS, ANTHROPIC_MESSAGES_PARAMS
from queuegate.request_errors import deepest, joined, refusal
from queuegate.request_limits import check_output_tokens
from queuegate.value_errors import problem, shown, tagged_by


class _Strict(BaseModel):
    # Strict: "yes" is no boolean and "5" no integer, as Anthropic's API sees them.
    model_config = ConfigDict(extra="forbid", strict=True)


class CacheControl(_Strict):
    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] | None = None


class TextBlock(_Strict):
    type: Literal["text"]
    text: str
    cache_control: CacheControl | None = None


def _base64(data: str) -> str:
    """Data Anthropic decodes: refused here, or the job waited its turn for the provider's
    400 (an attack's ``"!!!"`` was published and called)."""
    try:
        # Lines broken as MIME breaks them are base64 still.
        binascii.a2b_base64("".join(data.split()), strict_mode=True)
    except binascii.Error:
        raise ValueError("invalid base64 data") from None
    return data


Base64Data = Annotated[str, Field(min_length=1), AfterValidator(_base64)]


class Base64Source(_Strict):
    type: Literal["base64"]
    media_type: Literal["image/jpeg", "image/png", "image/gif", "image/webp"]
    data: Base64Data


class URLSource(_Strict):
    type: Literal["url"]
    url: str = Field(min_length=1)


class ImageBlock(_Strict):
    type: Literal["image"]
    source: Annotated[Base64Source | URLSource, Field(discriminator="type")]
    cache_control: CacheControl | None = None


class PdfSource(_Strict):
    type: Literal["base64"]
    media_type: Literal["application/pdf"]
    data: Base64Data


class PlainTextSource(_Strict):
    type: Literal["text"]
    media_type: Literal["text/plain"]
    data: str


class CitationsConfig(_Strict):
    enabled: bool | None = None


class DocumentBlock(_Strict):
    """A PDF or a plain text (a URL, an uploaded file or content blocks are refused: the
    gateway carries what it can send to either provider, ``provider_formats.document_part``)."""

    type: Literal["document"]
    source: Annotated[PdfSource | PlainTextSource, Field(discriminator="type")]
    title: str | None = None
    context: str | None = None
    citations: CitationsConfig | None = None
    cache_control: CacheControl | None = None


ToolResultContent = Annotated[
    Annotated[TextBlock, Tag("text block")] | Annotated[ImageBlock, Tag("image block")],
    Discriminator(tagged_by("type", "block")),
]
"""What a tool result holds (Anthropic's ``ToolResultBlockParam``; documents the gateway
refuses, as everywhere)."""


class ToolUseBlock(_Strict):
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: dict[str, Any]
    cache_control: CacheControl | None = None


class ToolResultBlock(_Strict):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: str | list[ToolResultContent] | None = None
    is_error: bool | None = None
    cache_control: CacheControl | None = None


class ThinkingBlock(_Strict):
    """Sent back in an assistant turn: to an Anthropic deployment as it is (its signature
    must match), left out for another provider."""

    type: Literal["thinking"]
    thinking: str
    signature: str


class RedactedThinkingBlock(_Strict):
    type: Literal["redacted_thinking"]
    data: str


ContentBlock = Annotated[
    Annotated[TextBlock, Tag("text block")]
    | Annotated[ImageBlock, Tag("image block")]
    | Annotated[DocumentBlock, Tag("document block")]
    | Annotated[ToolUseBlock, Tag("tool_use block")]
    | Annotated[ToolResultBlock, Tag("tool_result block")]
    | Annotated[ThinkingBlock, Tag("thinking block")]
    | Annotated[RedactedThinkingBlock, Tag("redacted_thinking block")],
    Discriminator(tagged_by("type", "block")),
]


class MessageParam(_Strict):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class InputSchema(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["object"]


class Tool(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,128}$")
    input_schema: InputSchema
    description: str | None = None
    type: Literal["custom"] | None = None
    cache_control: CacheControl | None = None
    strict: bool | None = None
    input_examples: list[dict[str, Any]] | None = None


class ToolChoiceAuto(_Strict):
    type: Literal["auto"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceAny(_Strict):
    type: Literal["any"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceTool(_Strict):
    type: Literal["tool"]
    name: str = Field(min_length=1)
    disable_parallel_tool_use: bool | None = None


class ToolChoiceNone(_Strict):
    type: Literal["none"]


class Metadata(_Strict):
    user_id: str | None = Field(default=None, max_length=256)


class OutputConfig(_Strict):
    """Anthropic's ``OutputConfigParam``, typed as its SDK types it. Reading it into the
    canonical form (``openai_request``, which a Message Batch's requests go through too)
    makes its ``effort`` the job's ``reasoning_effort``, beside adaptive thinking only, and
    refuses its ``format`` by name."""

    effort: AnthropicEffort | None = None
    format: dict[str, Any] | None = None


class _Prompt(_Strict):
    """What a request prompts with: the fields ``/v1/messages`` and its ``count_tokens``
    share."""

    model: str = Field(min_length=1, max_length=128)
    messages: list[MessageParam] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: (
        Annotated[
            ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone,
            Field(discriminator="type"),
        ]
        | None
    ) = None
    thinking: Thinking | None = None  # one typing with OpenAI-format requests'
    output_config: OutputConfig | None = None

    @model_validator(mode="after")
    def _content_given(self) -> Self:
        last = len(self.messages) - 1
        for index, message in enumerate(self.messages):
            if not message.content and not (index == last and message.role == "assistant"):
                raise ValueError(
                    f"messages.{index}: all messages must have non-empty content except for "
                    "the optional final assistant message"
                )
            if isinstance(message.content, list) and any(
                isinstance(block, TextBlock) and not block.text for block in message.content
            ):
                raise ValueError(f"messages.{index}: text content blocks must be non-empty")
        names = [tool.name for tool in self.tools or []]
        if len(set(names)) < len(names):
            raise ValueError("tools: Tool names must be unique")
        _answered_tool_uses(self.messages)
        return self


def _answered_tool_uses(messages: list[MessageParam]) -> None:
    """Refuse a ``tool_result`` that answers no ``tool_use`` of the message before it, one
    answered already, or one that follows other content of its message; a ``tool_use`` the
    next message leaves unanswered, and two ``tool_use`` blocks of one id, as Anthropic does
    (attacks' were published and called). One that ends the conversation waits for its
    answer."""
    asked: set[str] = set()
    for index, message in enumerate(messages):
        blocks = message.content if isinstance(message.content, list) else []
        other = False
        results: set[str] = set()
        for at, block in enumerate(blocks):
            if not isinstance(block, ToolResultBlock):
                other = True
            elif block.tool_use_id in results:
                raise ValueError(
                    f"messages.{index}.content.{at}: each `tool_use` must have a single "
                    f"result; found multiple `tool_result` blocks with id: "
                    f"{shown(block.tool_use_id)}"
                )
            elif block.tool_use_id not in asked:
                raise ValueError(
                    f"messages.{index}.content.{at}: unexpected `tool_use_id` found in "
                    f"`tool_result` blocks: {shown(block.tool_use_id)}. Each `tool_result` "
                    "block must have a corresponding `tool_use` block in the previous message"
                )
            elif other:
                raise ValueError(
                    f"messages.{index}.content.{at}: `tool_result` blocks must come first in "
                    "the message, before any other content"
                )
            else:
                results.add(block.tool_use_id)
        if asked - results:
            unanswered = ", ".join(sorted(shown(id_) for id_ in asked - results))
            raise ValueError(
                f"messages.{index}: `tool_use` ids were found without `tool_result` blocks "
                f"immediately after: {unanswered}. Each `tool_use` block must have a "
                "corresponding `tool_result` block in the next message"
            )
        uses = [block.id for block in blocks if isinstance(block, ToolUseBlock)]
        asked = set(uses)
        if len(asked) < len(uses):
            raise ValueError(f"messages.{index}: `tool_use` ids must be unique")


class MessagesRequest(_Prompt):
    """The body of ``POST /v1/messages`` (Anthropic's ``MessageCreateParams``), as far as the
    gateway serves it."""

    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    metadata: Metadata | None = None
    stream: bool = False
    service_tier: Literal["auto", "standard_only"] | None = None
    fallbacks: RequestFallbacks | None = None
    """The gateway's, not Anthropic's: the job's own fallbacks, as an OpenAI request names
    them (the SDK's ``extra_body``)."""

    @field_validator("stop_sequences")
    @classmethod
    def _stops_say_something(cls, stops: list[str] | None) -> list[str] | None:
        if stops is not None and any(not stop.strip() for stop in stops):
            raise ValueError("each stop sequence must contain non-whitespace")
        return stops

    @model_validator(mode="after")
    def _thinking_fits(self) -> Self:
        if isinstance(self.thinking, ThinkingEnabled) and self.thinking.budget_tokens >= (
            self.max_tokens
        ):
            raise ValueError("`max_tokens` must be greater than `thinking.budget_tokens`")
        return self


class CountTokensRequest(_Prompt):
    """The body of ``POST /v1/messages/count_tokens`` (Anthropic's
    ``MessageCountTokensParams``), as far as the gateway serves it."""


def messages_request(body: dict[str, Any], where: str = "") -> MessagesRequest:
    """``body`` as a MessagesRequest; InvalidRequest naming the field at fault by its path,
    under ``where`` (the path of ``body`` in what the caller sent; "" for a request body)."""
    try:
        return MessagesRequest.model_validate(body)
    except ValidationError as exc:
        raise InvalidRequest(_reason(exc, body, ANTHROPIC_MESSAGES_PARAMS, where)) from None


def count_tokens_request(body: dict[str, Any]) -> CountTokensRequest:
    """``body`` as a CountTokensRequest; InvalidRequest as ``messages_request``'s."""
    try:
        return CountTokensRequest.model_validate(body)
    except ValidationError as exc:
        raise InvalidRequest(_reason(exc, body, ANTHROPIC_COUNT_TOKENS_PARAMS)) from None


def params_refusal(params: dict[str, Any]) -> ErrorInfo | None:
    """Why ``/v1/messages`` would refuse a Message Batch request's ``params`` as its body,
    or a batch refuses them (``stream``), the field named by its path in the request
    (``params.container: not supported by this gateway``); None when it takes them."""
    try:
        request = messages_request(params, "params")
        check_output_tokens(params, "params")  # the endpoint's, as it makes the job
    except InvalidRequest as exc:
        return refusal(exc)
    if request.stream:
        # Served, its answer would be a Message all the same: the caller asked for what a
        # batch does not do, as Anthropic answers it.
        message = "params.stream: a Message Batch request cannot stream; remove stream"
        return refusal(InvalidRequest(message, param="params.stream"))
    return None


def _reason(
    exc: ValidationError, body: dict[str, Any], known: frozenset[str], under: str = ""
) -> str:
    error = deepest(exc)
    where, reason = problem(error, body)
    if error["type"] == "extra_forbidden" and where in known:
        reason = "not supported by this gateway"
    return joined(".".join(filter(None, (under, where))), reason)


__all__ = [
    "CountTokensRequest",
    "MessagesRequest",
    "count_tokens_request",
    "messages_request",
    "params_refusal",
]
