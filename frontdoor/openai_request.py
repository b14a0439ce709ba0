"""``POST /v1/chat/completions`` bodies checked as OpenAI checks them, before anything is
published.

``check_chat(body, limits)`` raises ``ApiError`` (400, or 404 for a model the catalog does
not serve) naming what is wrong:

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

from frontdoor.chat_request import Limits, checked_messages, served_model
from frontdoor.errors import ApiError, shown
from frontdoor.request_errors import invalid_request, tagged_by
from queuegate.messages import (
    MAX_CHOICES,
    ChatJob,
    LogitBias,
    OpenAIMetadata,
    Penalty,
    TopLogprobs,
)
from queuegate.provider_formats import OPENAI_CHAT_PARAMS
from router.providers.anthropic import MIN_THINKING_BUDGET

ROUTED_EXTRAS = frozenset({"top_k", "thinking"})
"""Anthropic's parameters, which the router maps for OpenAI or passes on to Anthropic."""
JOB_FIELDS = frozenset(ChatJob.model_fields) - OPENAI_CHAT_PARAMS
"""The job's own fields (``team``, ``deadline``, ``fallbacks``, …): set by the gateway."""
NAMED = 5
"""Unknown fields an error names at most."""
MAX_STOP = 4
MAX_TOOLS = 128
NAME = r"^[a-zA-Z0-9_-]{1,64}$"
"""What OpenAI takes as the name of a function or of a JSON schema."""


class _Object(BaseModel):
    # Strict: "5" is no integer and "yes" no boolean, as OpenAI's API sees them. What an
    # object holds beyond its fields is left for the provider to judge.
    model_config = ConfigDict(extra="allow", strict=True)


class FunctionDefinition(_Object):
    name: str = Field(pattern=NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class CustomDefinition(_Object):
    name: str = Field(min_length=1)
    description: str | None = None
    format: dict[str, Any] | None = None


class FunctionTool(_Object):
    type: Literal["function"]
    function: FunctionDefinition


class CustomTool(_Object):
    type: Literal["custom"]
    custom: CustomDefinition


Tool = Annotated[
    Annotated[FunctionTool, Tag("function tool")] | Annotated[CustomTool, Tag("custom tool")],
    Discriminator(tagged_by("type", "tool")),
]


class Named(_Object):
    name: str = Field(min_length=1)


class FunctionChoice(_Object):
    type: Literal["function"]
    function: Named


class CustomChoice(_Object):
    type: Literal["custom"]
    custom: Named


class AllowedTools(_Object):
    mode: Literal["auto", "required"]
    tools: list[dict[str, Any]]


class AllowedToolsChoice(_Object):
    type: Literal["allowed_tools"]
    allowed_tools: AllowedTools


ToolChoice = (
    Literal["none", "auto", "required"]
    | Annotated[
        Annotated[FunctionChoice, Tag("function choice")]
        | Annotated[CustomChoice, Tag("custom choice")]
        | Annotated[AllowedToolsChoice, Tag("allowed_tools choice")],
        Discriminator(tagged_by("type", "choice")),
    ]
)


class TextPart(_Object):
    type: Literal["text"]
    text: str


class ImageURL(_Object):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Object):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(_Object):
    data: str
    format: Literal["wav", "mp3"]


class AudioPart(_Object):
    type: Literal["input_audio"]
    input_audio: InputAudio


class FilePart(_Object):
    type: Literal["file"]
    file: dict[str, Any]


class RefusalPart(_Object):
    type: Literal["refusal"]
    refusal: str


UserPart = Annotated[
    Annotated[TextPart, Tag("text part")]
    | Annotated[ImagePart, Tag("image_url part")]
    | Annotated[AudioPart, Tag("input_audio part")]
    | Annotated[FilePart, Tag("file part")],
    Discriminator(tagged_by("type", "part")),
]
AssistantPart = Annotated[
    Annotated[TextPart, Tag("text part")] | Annotated[RefusalPart, Tag("refusal part")],
    Discriminator(tagged_by("type", "part")),
]


class CalledFunction(_Object):
    name: str
    arguments: str


class FunctionCall(_Object):
    id: str
    type: Literal["function"]
    function: CalledFunction


class CalledCustom(_Object):
    name: str
    input: str


class CustomCall(_Object):
    id: str
    type: Literal["custom"]
    custom: CalledCustom


ToolCall = Annotated[
    Annotated[FunctionCall, Tag("function call")] | Annotated[CustomCall, Tag("custom call")],
    Discriminator(tagged_by("type", "call")),
]


class SystemMessage(_Object):
    role: Literal["system"]
    content: str | list[TextPart]
    name: str | None = None


class DeveloperMessage(_Object):
    role: Literal["developer"]
    content: str | list[TextPart]
    name: str | None = None


class UserMessage(_Object):
    role: Literal["user"]
    content: str | list[UserPart]
    name: str | None = None


class AssistantMessage(_Object):
    role: Literal["assistant"]
    content: str | list[AssistantPart] | None = None
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None
    function_call: CalledFunction | None = None
    audio: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _says_something(self) -> Self:
        if self.content is None and not self.tool_calls and self.function_call is None:
            raise ValueError("an assistant message needs content, or tool_calls")
        return self


class ToolMessage(_Object):
    role: Literal["tool"]
    content: str | list[TextPart]
    tool_call_id: str


Message = Annotated[
    Annotated[SystemMessage, Tag("system message")]
    | Annotated[DeveloperMessage, Tag("developer message")]
    | Annotated[UserMessage, Tag("user message")]
    | Annotated[AssistantMessage, Tag("assistant message")]
    | Annotated[ToolMessage, Tag("tool message")],
    Discriminator(tagged_by("role", "message")),
]


class JsonSchema(_Object):
    name: str = Field(pattern=NAME)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextFormat(_Object):
    type: Literal["text"]


class JsonObjectFormat(_Object):
    type: Literal["json_object"]


class JsonSchemaFormat(_Object):
    type: Literal["json_schema"]
    json_schema: JsonSchema


ResponseFormat = Annotated[
    Annotated[TextFormat, Tag("text format")]
    | Annotated[JsonObjectFormat, Tag("json_object format")]
    | Annotated[JsonSchemaFormat, Tag("json_schema format")],
    Discriminator(tagged_by("type", "format")),
]


class Prediction(_Object):
    type: Literal["content"]
    content: str | list[TextPart]


class StreamOptions(_Object):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class ThinkingEnabled(_Object):
    type: Literal["enabled"]
    budget_tokens: int = Field(ge=MIN_THINKING_BUDGET)


class ThinkingDisabled(_Object):
    type: Literal["disabled"]


Thinking = Annotated[
    Annotated[ThinkingEnabled, Tag("enabled thinking")]
    | Annotated[ThinkingDisabled, Tag("disabled thinking")],
    Discriminator(tagged_by("type", "thinking")),
]


class ChatRequest(_Object):
    """The body of ``POST /v1/chat/completions`` (the openai SDK's
    ``CompletionCreateParams``) with the bounds OpenAI's API reference gives; null is taken
    wherever a field may be left out."""

    model: str
    messages: list[Message] = Field(min_length=1)
    audio: dict[str, Any] | None = None
    frequency_penalty: Penalty | None = None
    function_call: Literal["none", "auto"] | Named | None = None
    functions: list[FunctionDefinition] | None = Field(default=None, max_length=MAX_TOOLS)
    logit_bias: LogitBias | None = None
    logprobs: bool | None = None
    max_completion_tokens: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    metadata: OpenAIMetadata | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    moderation: dict[str, Any] | None = None
    n: int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    parallel_tool_calls: bool | None = None
    prediction: Prediction | None = None
    presence_penalty: Penalty | None = None
    prompt_cache_key: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = (
        None
    )
    response_format: ResponseFormat | None = None
    safety_identifier: str | None = Field(default=None, max_length=64)
    seed: int | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority", "fast"] | None = None
    stop: Annotated[list[str], Field(max_length=MAX_STOP)] | str | None = None
    store: bool | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    tool_choice: ToolChoice | None = None
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    top_logprobs: TopLogprobs | None = None
    top_p: float | None = Field(default=None, ge=0, le=1)
    user: str | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    web_search_options: dict[str, Any] | None = None
    top_k: int | None = Field(default=None, ge=0)
    thinking: Thinking | None = None


def check_chat(body: dict[str, Any], limits: Limits) -> None:
    """Refuse what OpenAI's chat completions refuse (ApiError), before the job is made."""
    model = served_model(body, limits)
    checked_messages(body, limits)
    _known_fields(body, model, limits)
    try:
        ChatRequest.model_validate(body)
    except ValidationError as exc:
        raise invalid_request(exc, body) from None


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
    names = ", ".join(shown(name) for name in refused[:NAMED])
    if len(refused) > NAMED:
        names += f" and {len(refused) - NAMED} more"
    if any(name in JOB_FIELDS for name in refused):
        why = "the gateway sets a job's own fields (its team from the key, its deadline from "
        why += "x-queuegate-timeout), a request does not"
    else:
        why = "not parameters of OpenAI's chat completions, and no OpenAI-compatible server "
        why += f"that takes its own serves {shown(model)!r}"
    raise ApiError("invalid_request", f"unrecognized request arguments {names}: {why}")


__all__ = ["ChatRequest", "check_chat"]
