"""OpenAI's chat parameters, typed once as its API reference (and the openai SDK's
``CompletionCreateParams``) gives them: the front door checks a request's body against
``OpenAIParams`` (``queuegate.openai_request.ChatRequest`` adds the body's own fields), and
a worker a job's parameters (``queuegate.messages.ChatParams``), so that both refuse the same
values, naming the field, before anything is called.

Strict, as OpenAI's API is: ``"5"`` is no integer and ``"yes"`` no boolean. A name a value
may take (``reasoning_effort``, ``service_tier``, ...) is one OpenAI documents, Anthropic's
own tier as well (Anthropic-format jobs carry it); what an object may hold beyond its fields
is left to the provider, save where the API types every field it may hold (a custom tool's
definition, Anthropic's ``thinking``: ``ClosedObject``). ``stop`` has no cap here: Anthropic
takes more than OpenAI's 4 sequences, so the cap is kept where OpenAI's format is sent
(``MAX_STOP``). A ``tool_choice`` naming a tool, or an ``allowed_tools`` one, must name
tools the request offers (``unoffered_tools``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    TypeAdapter,
    ValidationError,
    with_config,
)
from pydantic_core import ErrorDetails
from typing_extensions import TypedDict  # pydantic reads typing.TypedDict from Python 3.12 on

from queuegate.value_errors import problem, shown, tagged_by

MAX_CHOICES = 128
"""The most choices (``n``) one job may ask for: OpenAI's limit."""
MAX_STOP = 4
"""The most stop sequences OpenAI takes (Anthropic takes more)."""
MAX_TOOLS = 128
MIN_THINKING_BUDGET = 1024
"""The fewest thinking tokens Anthropic takes (``thinking.budget_tokens``)."""
NAME = r"^[a-zA-Z0-9_-]{1,64}$"
"""What OpenAI takes as the name of a function or of a JSON schema."""


class OpenAIObject(BaseModel):
    # Strict: "5" is no integer and "yes" no boolean, as OpenAI's API sees them. What an
    # object holds beyond its fields is left for the provider to judge.
    model_config = ConfigDict(extra="allow", strict=True)


class ClosedObject(OpenAIObject):
    """An object whose every field its API types: another one is refused, as the API (or
    Anthropic's own door, for ``thinking``) refuses it."""

    model_config = ConfigDict(extra="forbid", strict=True)


class CacheControl(OpenAIObject):
    """Anthropic's prompt caching marker, which the Anthropic adapter sends on."""

    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] | None = None


class FunctionDefinition(OpenAIObject):
    name: str = Field(pattern=NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None
    input_examples: list[dict[str, Any]] | None = None
    """Anthropic's, sent on to Anthropic's tool."""


class CustomTextFormat(ClosedObject):
    """Free text: what a custom tool takes unless its format says otherwise."""

    type: Literal["text"]


class Grammar(ClosedObject):
    definition: str
    syntax: Literal["lark", "regex"]


class CustomGrammarFormat(ClosedObject):
    """Text the grammar (Lark's, or a regular expression) constrains."""

    type: Literal["grammar"]
    grammar: Grammar


CustomFormat = Annotated[
    Annotated[CustomTextFormat, Tag("text format")]
    | Annotated[CustomGrammarFormat, Tag("grammar format")],
    Discriminator(tagged_by("type", "format")),
]
"""A custom tool's ``format``, as the openai SDK's ``ChatCompletionCustomToolParam`` types it."""


class CustomDefinition(ClosedObject):
    name: str = Field(min_length=1)
    description: str | None = None
    format: CustomFormat | None = None


class FunctionTool(OpenAIObject):
    type: Literal["function"]
    function: FunctionDefinition
    cache_control: CacheControl | None = None


class CustomTool(OpenAIObject):
    type: Literal["custom"]
    custom: CustomDefinition


Tool = Annotated[
    Annotated[FunctionTool, Tag("function tool")] | Annotated[CustomTool, Tag("custom tool")],
    Discriminator(tagged_by("type", "tool")),
]


class Named(OpenAIObject):
    name: str = Field(min_length=1)


class FunctionChoice(OpenAIObject):
    type: Literal["function"]
    function: Named


class CustomChoice(OpenAIObject):
    type: Literal["custom"]
    custom: Named


class AllowedTools(OpenAIObject):
    mode: Literal["auto", "required"]
    tools: list[dict[str, Any]]


class AllowedToolsChoice(OpenAIObject):
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


class TextPart(OpenAIObject):
    type: Literal["text"]
    text: str


class JsonSchema(OpenAIObject):
    name: str = Field(pattern=NAME)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextFormat(OpenAIObject):
    type: Literal["text"]


class JsonObjectFormat(OpenAIObject):
    type: Literal["json_object"]


class JsonSchemaFormat(OpenAIObject):
    type: Literal["json_schema"]
    json_schema: JsonSchema


ResponseFormat = Annotated[
    Annotated[TextFormat, Tag("text format")]
    | Annotated[JsonObjectFormat, Tag("json_object format")]
    | Annotated[JsonSchemaFormat, Tag("json_schema format")],
    Discriminator(tagged_by("type", "format")),
]


class Prediction(OpenAIObject):
    type: Literal["content"]
    content: str | list[TextPart]


class StreamOptions(OpenAIObject):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class VoiceId(OpenAIObject):
    id: str


class Audio(OpenAIObject):
    """Audio output: a built-in voice's name, or a custom voice's id."""

    format: Literal["wav", "aac", "mp3", "flac", "opus", "pcm16"]
    voice: str | VoiceId


class ApproximateLocation(OpenAIObject):
    city: str | None = None
    country: str | None = None
    region: str | None = None
    timezone: str | None = None


class UserLocation(OpenAIObject):
    type: Literal["approximate"]
    approximate: ApproximateLocation


class WebSearchOptions(OpenAIObject):
    search_context_size: Literal["low", "medium", "high"] | None = None
    user_location: UserLocation | None = None


ThinkingDisplay = Literal["summarized", "omitted"]
"""How Anthropic shows thinking in its answer: summarized, or its text left out (the
signature kept)."""


class ThinkingEnabled(ClosedObject):
    type: Literal["enabled"]
    budget_tokens: int = Field(ge=MIN_THINKING_BUDGET)
    display: ThinkingDisplay | None = None


class ThinkingDisabled(ClosedObject):
    type: Literal["disabled"]


class ThinkingAdaptive(ClosedObject):
    """The model decides whether and how much to think: no budget."""

    type: Literal["adaptive"]
    display: ThinkingDisplay | None = None


class ThinkingBetweenTools(ClosedObject):
    """Thinking off, the short updates a model writes between tool calls kept as thinking."""

    type: Literal["between_tools"]


Thinking = Annotated[
    Annotated[ThinkingEnabled, Tag("enabled thinking")]
    | Annotated[ThinkingDisabled, Tag("disabled thinking")]
    | Annotated[ThinkingAdaptive, Tag("adaptive thinking")]
    | Annotated[ThinkingBetweenTools, Tag("between_tools thinking")],
    Discriminator(tagged_by("type", "thinking")),
]
"""Anthropic's ``thinking`` as its API types it (the anthropic SDK's ``ThinkingConfigParam``)."""
AnthropicEffort = Literal["low", "medium", "high", "xhigh", "max"]
"""Anthropic's ``output_config.effort`` (the anthropic SDK's ``OutputConfigParam``): how much a
model thinking adaptively spends. Each is a ``reasoning_effort`` of the same name, which is
how a job carries it."""
ANTHROPIC_EFFORTS: tuple[str, ...] = get_args(AnthropicEffort)
"""Lowest first, as Anthropic lists them."""
THINKING_ON = frozenset({"enabled", "adaptive"})
"""The ``thinking.type`` values under which the model thinks, and Anthropic's rules for
thinking (temperature 1, no top_k, no forced tool) hold."""


Penalty = Annotated[float, Field(ge=-2, le=2)]
"""OpenAI's ``presence_penalty`` and ``frequency_penalty``."""
TokenId = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,10}$")]
LogitBias = dict[TokenId, Annotated[int, Field(ge=-100, le=100)]]
"""OpenAI's ``logit_bias``: token ids (as JSON keys, text of a whole number) to a whole
bias, -100 to 100."""
TopLogprobs = Annotated[int, Field(ge=0, le=20)]
"""OpenAI's ``top_logprobs``: the most likely tokens listed at each position."""
OpenAIMetadata = Annotated[
    dict[
        Annotated[str, StringConstraints(max_length=64)],
        Annotated[str, StringConstraints(max_length=512)],
    ],
    Field(max_length=16),
]
"""OpenAI's ``metadata``: at most 16 pairs of text."""
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]
ServiceTier = Literal["auto", "default", "flex", "scale", "priority", "fast", "standard_only"]
"""OpenAI's tiers, and Anthropic's ``standard_only``, which its adapter maps."""


@with_config(ConfigDict(strict=True))
class OpenAIParams(TypedDict, total=False):
    """Every parameter of OpenAI's chat completions but the body's ``model``, ``messages``
    and ``stream``; null is taken wherever a field may be left out. A TypedDict, not a
    model: only the parameters given are read (a worker reads a job's, 1 us for 6)."""

    audio: Audio | None
    frequency_penalty: Penalty | None
    function_call: Literal["none", "auto"] | Named | None
    functions: Annotated[list[FunctionDefinition], Field(max_length=MAX_TOOLS)] | None
    logit_bias: LogitBias | None
    logprobs: bool | None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None
    max_tokens: Annotated[int, Field(ge=1)] | None
    metadata: OpenAIMetadata | None
    modalities: list[Literal["text", "audio"]] | None
    moderation: dict[str, Any] | None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] | None
    parallel_tool_calls: bool | None
    prediction: Prediction | None
    presence_penalty: Penalty | None
    prompt_cache_key: str | None
    prompt_cache_options: dict[str, Any] | None
    prompt_cache_retention: Literal["in_memory", "24h"] | None
    reasoning_effort: ReasoningEffort | None
    response_format: ResponseFormat | None
    safety_identifier: Annotated[str, Field(max_length=64)] | None
    seed: int | None
    service_tier: ServiceTier | None
    stop: list[str] | str | None
    store: bool | None
    stream_options: StreamOptions | None
    temperature: Annotated[float, Field(ge=0, le=2)] | None
    tool_choice: ToolChoice | None
    tools: Annotated[list[Tool], Field(min_length=1, max_length=MAX_TOOLS)] | None
    top_logprobs: TopLogprobs | None
    top_p: Annotated[float, Field(ge=0, le=1)] | None
    user: str | None
    verbosity: Literal["low", "medium", "high"] | None
    web_search_options: WebSearchOptions | None


class JobParams(OpenAIParams, total=False):
    """A job's parameters: OpenAI's, and Anthropic's ``top_k`` and ``thinking``, which the
    router maps for OpenAI or passes on to Anthropic."""

    top_k: Annotated[int, Field(ge=0)] | None
    thinking: Thinking | None


_PARAMS = TypeAdapter(JobParams)


class ParamError(ValueError):
    """A parameter refused, naming it (``param``, its path: ``response_format.type``) as
    OpenAI's errors do."""

    def __init__(self, param: str, problem: str) -> None:
        super().__init__(f"{param}: {problem}")
        self.param = param
        self.problem = problem


def refused_param(error: ErrorDetails) -> ParamError | None:
    """The ParamError a validation error of a job (or of its parameters) carries, named by
    its path from the top of the request's body, as the front door names it: a message's
    field under ``messages.<i>``, a parameter as it is (a job's ``params`` are the body's
    top-level fields); None for any other error."""
    refused = (error.get("ctx") or {}).get("error")
    if not isinstance(refused, ParamError):
        return None
    loc = [str(step) for step in error["loc"]]
    if loc[:1] == ["params"]:
        loc = loc[1:]
    return ParamError(".".join([*loc, refused.param]), refused.problem)


def too_many_stops(stop: object) -> str | None:
    """Why ``stop`` holds more sequences than OpenAI takes; None when it does not."""
    if isinstance(stop, list) and len(stop) > MAX_STOP:
        return f"{len(stop)} sequences; OpenAI takes at most {MAX_STOP}"
    return None


def check_params(params: dict[str, Any]) -> None:
    """Refuse (ParamError) a parameter among ``params`` of another type or value than
    OpenAI's; others (Anthropic's, a server's own) are left to the provider adapters."""
    try:
        _PARAMS.validate_python(params)
    except ValidationError as exc:
        deepest = max(exc.errors(include_url=False), key=lambda e: len(e["loc"]))
        where, reason = problem(deepest, params)
        raise ParamError(where, reason) from None
    unoffered = unoffered_tools(params.get("tools"), params.get("tool_choice"))
    if unoffered is not None:
        raise unoffered
    alone = _without_its_partner(params)
    if alone is not None:
        raise alone


def _without_its_partner(params: dict[str, Any]) -> ParamError | None:
    """A parameter OpenAI takes only beside another the request lacks, which it answers
    with a 400 after the job waited its turn (an attack's were published and called)."""
    if not params.get("tools"):
        if params.get("tool_choice") == "required":
            return ParamError("tool_choice", "required needs tools to call: offer them in tools")
        if params.get("parallel_tool_calls") is not None:
            return ParamError("parallel_tool_calls", "only allowed when tools are offered")
    if params.get("top_logprobs") is not None and params.get("logprobs") is not True:
        return ParamError("top_logprobs", "only allowed when logprobs is true")
    return None


ALLOWED_TOOLS = "tool_choice.allowed_tools.tools"
NAMED_CHOICES = frozenset({"function", "custom"})
"""The ``tool_choice`` types naming one tool, under the type: ``{"type": "function",
"function": {"name": ...}}``."""


def unoffered_tools(tools: Any, choice: Any) -> ParamError | None:
    """The error of a ``tool_choice`` asking for a tool that ``tools`` does not offer (a tool
    by its type and name: a custom tool is no function): the function or custom tool it
    names (``tool_choice.function.name``), a tool an ``allowed_tools`` choice allows, or, in
    mode ``required``, no tool at all. Each is a call the model could not make: OpenAI and
    Anthropic answer a named tool not offered with a 400 after the job waited its turn, and
    Anthropic's adapter would send an ``allowed_tools`` choice as no tools to call, a caller
    getting text instead. None when it asks only for tools offered."""
    if not isinstance(choice, dict):
        return None
    offered = {named_tool(tool) for tool in tools or []}
    kind = choice.get("type")
    if kind in NAMED_CHOICES:
        return _unoffered(choice, offered, f"tool_choice.{kind}.name", "names")
    if kind != "allowed_tools":
        return None
    allowed = choice.get("allowed_tools") or {}
    for tool in allowed.get("tools") or []:
        unoffered = _unoffered(tool, offered, ALLOWED_TOOLS, "allows")
        if unoffered is not None:
            return unoffered
    if not allowed.get("tools") and allowed.get("mode") == "required":
        return ParamError(ALLOWED_TOOLS, "mode required allows no tool: name at least one of tools")
    return None


def _unoffered(
    tool: Any, offered: set[tuple[Any, Any]], param: str, verb: str
) -> ParamError | None:
    kind, name = named_tool(tool)
    if isinstance(kind, str) and isinstance(name, str) and (kind, name) in offered:
        return None
    said = f"the {shown(str(kind))} tool {shown(str(name))!r}"
    return ParamError(param, f"{verb} {said}, which tools does not offer")


def named_tool(tool: Any) -> tuple[Any, Any]:
    """A tool (or a choice naming one) by its type and name: ``{"type": "function",
    "function": {"name": ...}}``."""
    kind = tool.get("type") if isinstance(tool, dict) else None
    said = tool.get(kind) if isinstance(tool, dict) and isinstance(kind, str) else None
    return kind, said.get("name") if isinstance(said, dict) else None


__all__ = [
    "ANTHROPIC_EFFORTS",
    "MAX_CHOICES",
    "MAX_STOP",
    "MIN_THINKING_BUDGET",
    "THINKING_ON",
    "AnthropicEffort",
    "JobParams",
    "OpenAIObject",
    "OpenAIParams",
    "ParamError",
    "TextPart",
    "ThinkingDisplay",
    "check_params",
    "named_tool",
    "refused_param",
    "too_many_stops",
    "unoffered_tools",
]
