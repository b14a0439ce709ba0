"""``POST /v1/messages`` bodies: Anthropic's request schema, checked as Anthropic checks it.

``messages_job`` validates a body against ``MessagesRequest`` (unknown fields, values of
another type (``"yes"`` for a boolean: no coercion) and empty content refused, in the
``<field path>: <reason>`` wording of Anthropic's own ``invalid_request_error`` messages),
reads it as a canonical (OpenAI chat) request with
``queuegate.provider_formats.openai_request``, and makes it the team's job as an OpenAI
request is made one (``frontdoor.chat_request.chat_job``: catalog, limits, job id, deadline).
What Anthropic takes and the gateway cannot carry (documents by URL, file id or content
blocks, server tools, structured output's ``output_config.format``) is refused by name.
``count_tokens_job`` does the same for a ``/v1/messages/count_tokens`` body, whose job is
only counted. Any refusal: ``ApiError``. ``params_refusal`` is the same check of a Message
Batch request's ``params`` (a batch's ``producer.batch.jobs.Check``), so a batch
refuses, by name, what ``/v1/messages`` refuses, rather than leaving it out unread.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    model_validator,
)

from frontdoor.chat_request import Limits, RequestOptions, chat_job, check_output_tokens
from frontdoor.errors import ApiError
from frontdoor.request_errors import deepest, joined, problem, refusal, tagged_by
from queuegate.messages import ChatJob, ErrorInfo
from queuegate.openai_params import AnthropicEffort, Thinking, ThinkingEnabled
from queuegate.provider_formats import (
    ANTHROPIC_COUNT_TOKENS_PARAMS,
    ANTHROPIC_MESSAGES_PARAMS,
    openai_request,
)


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


class Base64Source(_Strict):
    type: Literal["base64"]
    media_type: Literal["image/jpeg", "image/png", "image/gif", "image/webp"]
    data: str = Field(min_length=1)


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
    data: str = Field(min_length=1)


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
        return self


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


def messages_job(
    body: dict[str, Any], team: str, options: RequestOptions, limits: Limits
) -> ChatJob:
    """The team's job for a ``/v1/messages`` body; ApiError saying what is wrong, in
    Anthropic's wording (``max_tokens: Field required``), when it is invalid."""
    request = _messages_request(body, "")
    return _job(request.model_dump(exclude_none=True), team, options, limits, request.stream)


def params_refusal(params: dict[str, Any]) -> ErrorInfo | None:
    """Why ``/v1/messages`` would refuse a Message Batch request's ``params`` as its body,
    the field named by its path in the request (``params.container: not supported by this
    gateway``); None when it takes them. What it takes the batch reads as ``messages_job``
    reads a body (``provider_formats.openai_request``), which refuses the rest."""
    try:
        _messages_request(params, "params")
        check_output_tokens(params, "params")  # the endpoint's, as it makes the job (chat_job)
    except ApiError as exc:
        return refusal(exc)
    return None


def _messages_request(body: dict[str, Any], where: str) -> MessagesRequest:
    """``body`` as a MessagesRequest; ApiError naming the field at fault by its path, under
    ``where`` (the path of ``body`` in what the caller sent; "" for a request body)."""
    try:
        return MessagesRequest.model_validate(body)
    except ValidationError as exc:
        reason = _reason(exc, body, ANTHROPIC_MESSAGES_PARAMS, where)
        raise ApiError("invalid_request", reason) from None


def count_tokens_job(
    body: dict[str, Any], team: str, options: RequestOptions, limits: Limits
) -> ChatJob:
    """The job a ``/v1/messages/count_tokens`` body would make, for its prompt to be counted
    (never published); ApiError as ``messages_job``'s when it is invalid."""
    try:
        request = CountTokensRequest.model_validate(body)
    except ValidationError as exc:
        known = ANTHROPIC_COUNT_TOKENS_PARAMS
        raise ApiError("invalid_request", _reason(exc, body, known)) from None
    # The canonical form needs a max_tokens; the prompt it counts does not depend on it.
    fields = request.model_dump(exclude_none=True) | {"max_tokens": 1}
    return _job(fields, team, options, limits, stream=False)


def _job(
    fields: dict[str, Any], team: str, options: RequestOptions, limits: Limits, stream: bool
) -> ChatJob:
    try:
        messages, params = openai_request(fields, where="")
    except ValueError as exc:
        raise ApiError("invalid_request", str(exc)) from None
    canonical = {"model": fields["model"], "messages": messages, **params}
    return chat_job(canonical, team, options, limits, stream=stream, answer_format="anthropic")


def _reason(
    exc: ValidationError, body: dict[str, Any], known: frozenset[str], under: str = ""
) -> str:
    error = deepest(exc)
    where, reason = problem(error, body)
    if error["type"] == "extra_forbidden" and where in known:
        reason = "not supported by this gateway"
    return joined(".".join(filter(None, (under, where))), reason)
