"""``POST /v1/messages`` bodies: Anthropic's request schema, checked as Anthropic checks it.

``messages_job`` validates a body against ``MessagesRequest`` (unknown fields and invalid
values refused, in the ``<field path>: <reason>`` wording of Anthropic's own
``invalid_request_error`` messages), reads it as a canonical (OpenAI chat) request with
``queuegate.provider_formats.openai_request``, and makes it the team's job as an OpenAI
request is made one (``frontdoor.chat_request.chat_job``: catalog, limits, job id, deadline).
What Anthropic takes and the gateway cannot carry (documents, server tools, adaptive
thinking) is refused by name. Any refusal: ``ApiError``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    model_validator,
)
from pydantic_core import ErrorDetails

from frontdoor.chat_request import Limits, RequestOptions, chat_job
from frontdoor.errors import ApiError
from queuegate.messages import ChatJob
from queuegate.provider_formats import ANTHROPIC_MESSAGES_PARAMS, openai_request

MIN_THINKING_BUDGET = 1024
"""Anthropic's smallest ``thinking.budget_tokens``."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


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


class ToolUseBlock(_Strict):
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: dict[str, Any]
    cache_control: CacheControl | None = None


class ToolResultBlock(_Strict):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: str | list[TextBlock] | None = None
    is_error: bool | None = None
    cache_control: CacheControl | None = None


class ThinkingBlock(_Strict):
    """Sent back in an assistant turn; left out, as Anthropic leaves out earlier thinking."""

    type: Literal["thinking"]
    thinking: str
    signature: str


class RedactedThinkingBlock(_Strict):
    type: Literal["redacted_thinking"]
    data: str


def _block_tag(value: Any) -> str | None:
    # Tags hold a space so that no error location mistakes one for a field of the body.
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return f"{kind} block" if isinstance(kind, str) else None


ContentBlock = Annotated[
    Annotated[TextBlock, Tag("text block")]
    | Annotated[ImageBlock, Tag("image block")]
    | Annotated[ToolUseBlock, Tag("tool_use block")]
    | Annotated[ToolResultBlock, Tag("tool_result block")]
    | Annotated[ThinkingBlock, Tag("thinking block")]
    | Annotated[RedactedThinkingBlock, Tag("redacted_thinking block")],
    Discriminator(_block_tag),
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


class ThinkingEnabled(_Strict):
    type: Literal["enabled"]
    budget_tokens: int = Field(ge=MIN_THINKING_BUDGET)


class ThinkingDisabled(_Strict):
    type: Literal["disabled"]


class Metadata(_Strict):
    user_id: str | None = Field(default=None, max_length=256)


class MessagesRequest(_Strict):
    """The body of ``POST /v1/messages`` (Anthropic's ``MessageCreateParams``), as far as the
    gateway serves it."""

    model: str = Field(min_length=1, max_length=128)
    max_tokens: int = Field(ge=1)
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
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    metadata: Metadata | None = None
    stream: bool = False
    thinking: Annotated[ThinkingEnabled | ThinkingDisabled, Field(discriminator="type")] | None = (
        None
    )
    service_tier: Literal["auto", "standard_only"] | None = None

    @model_validator(mode="after")
    def _thinking_fits(self) -> MessagesRequest:
        if isinstance(self.thinking, ThinkingEnabled) and self.thinking.budget_tokens >= (
            self.max_tokens
        ):
            raise ValueError("`max_tokens` must be greater than `thinking.budget_tokens`")
        return self


def messages_job(
    body: dict[str, Any], team: str, options: RequestOptions, limits: Limits
) -> ChatJob:
    """The team's job for a ``/v1/messages`` body; ApiError saying what is wrong, in
    Anthropic's wording (``max_tokens: Field required``), when it is invalid."""
    try:
        request = MessagesRequest.model_validate(body)
    except ValidationError as exc:
        raise ApiError("invalid_request", _reason(exc, body)) from None
    try:
        messages, params = openai_request(request.model_dump(exclude_none=True), where="")
    except ValueError as exc:
        raise ApiError("invalid_request", str(exc)) from None
    canonical = {"model": request.model, "messages": messages, **params}
    return chat_job(canonical, team, options, limits, stream=request.stream)


def _reason(exc: ValidationError, body: dict[str, Any]) -> str:
    """The one error a client can act on: the deepest, as Anthropic reports one."""
    error = max(exc.errors(include_url=False), key=lambda e: len(e["loc"]))
    where = _path(error, body)
    kind = error["type"]
    if kind == "extra_forbidden" and where in ANTHROPIC_MESSAGES_PARAMS:
        return f"{where}: not supported by this gateway"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        # A type Anthropic may well know (documents, thinking sent back, adaptive thinking)
        # that the gateway cannot carry, or none at all: either way, the ones it can.
        ctx = error.get("ctx") or {}
        expected = str(ctx.get("expected_tags", "")).replace(" block", "")
        tag = str(ctx.get("tag", "")).removesuffix(" block")
        if kind == "union_tag_not_found":
            return f"{where}.type: Field required"
        return f"{where}.type: {tag!r} is not supported by this gateway; use one of {expected}"
    message = error["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def _path(error: ErrorDetails, body: Any) -> str:
    """The error's location in the body: the steps that lead into it, and a missing field,
    without the names pydantic gives the members of a union (``str``, ``text block``)."""
    steps: list[str] = []
    node = body
    loc = error["loc"]
    for position, step in enumerate(loc):
        inside = (isinstance(node, dict) and isinstance(step, str) and step in node) or (
            isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node)
        )
        if inside:
            node = node[step]
        elif not (error["type"] == "missing" and position == len(loc) - 1):
            continue
        steps.append(str(step))
    return ".".join(steps)
