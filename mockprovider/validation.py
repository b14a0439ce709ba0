"""Strict request checks, as the real APIs document them: unknown fields and invalid values
are refused with the provider's own wording, so a request the mock accepts is one the provider
would accept too (field names from ``queuegate.provider_formats``, pinned to the SDKs' types).

OpenAI answers an unknown top-level field with "Unrecognized request argument supplied",
Anthropic with "<field>: Extra inputs are not permitted"; both are 400
``invalid_request_error``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from queuegate.openai_params import unoffered_tools
from queuegate.provider_formats import ANTHROPIC_MESSAGES_PARAMS, OPENAI_CHAT_PARAMS

Refusal = Callable[[str], str] | None
"""How a server words its refusal of an unknown field (given its path); None: it ignores it."""


class InvalidRequest(Exception):
    """The request breaks the provider's schema: answered 400 ``invalid_request_error``."""


OPENAI_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
OPENAI_MESSAGE_FIELDS = frozenset(
    {"role", "content", "name", "tool_calls", "tool_call_id", "refusal", "audio"}
    | {"function_call"}
)
OPENAI_PART_FIELDS = {
    "text": frozenset({"type", "text"}),
    "image_url": frozenset({"type", "image_url"}),
    "input_audio": frozenset({"type", "input_audio"}),
    "file": frozenset({"type", "file"}),
    "refusal": frozenset({"type", "refusal"}),
}
OPENAI_FUNCTION_FIELDS = frozenset({"name", "description", "parameters", "strict"})
OPENAI_CUSTOM_FIELDS = frozenset({"name", "description", "format"})
OPENAI_CUSTOM_FORMATS = frozenset({"text", "grammar"})
OPENAI_TOOL_MODES = frozenset({"none", "auto", "required"})
OPENAI_TOOL_CHOICES = frozenset({"function", "custom", "allowed_tools"})
OPENAI_DETAILS = frozenset({"auto", "low", "high"})
OPENAI_RESPONSE_FORMATS = frozenset({"text", "json_object", "json_schema"})
OPENAI_METADATA_PAIRS = 16
OPENAI_METADATA_KEY = 64
OPENAI_METADATA_VALUE = 512
OPENAI_EFFORTS = frozenset({"none", "minimal", "low", "medium", "high", "xhigh", "max"})
"""``reasoning_effort`` (the openai SDK's ``ReasoningEffort``); which models take which level
is OpenAI's to judge, per model: the mock takes every level."""
OPENAI_MAX_STOP = 4
OPENAI_TIERS = frozenset({"auto", "default", "flex", "scale", "priority"})

ANTHROPIC_BLOCK_FIELDS = {
    "text": frozenset({"type", "text", "cache_control", "citations"}),
    "image": frozenset({"type", "source", "cache_control"}),
    "document": frozenset({"type", "source", "cache_control", "citations", "context", "title"}),
    "tool_use": frozenset({"type", "id", "name", "input", "cache_control"}),
    "tool_result": frozenset({"type", "tool_use_id", "content", "is_error", "cache_control"}),
    "thinking": frozenset({"type", "thinking", "signature"}),
    "redacted_thinking": frozenset({"type", "data"}),
}
DOCUMENT_MEDIA: dict[str, str | None] = {
    "base64": "application/pdf",
    "text": "text/plain",
    "url": None,
    "content": None,
    "file": None,
}
"""A document block's source types, and the media type each must name (None: none)."""
PDF_DATA = "data:application/pdf;base64,"
ANTHROPIC_TOOL_FIELDS = frozenset(
    {"name", "input_schema", "description", "cache_control", "strict", "type"}
    | {"allowed_callers", "defer_loading", "eager_input_streaming", "input_examples"}
)
ANTHROPIC_TIERS = frozenset({"auto", "standard_only"})
ANTHROPIC_MIN_THINKING = 1024
ANTHROPIC_THINKING = {
    "enabled": frozenset({"type", "budget_tokens", "display"}),
    "disabled": frozenset({"type"}),
    "adaptive": frozenset({"type", "display"}),
    "between_tools": frozenset({"type"}),
}
"""Anthropic's ``thinking`` types and the fields of each (the anthropic SDK's
``ThinkingConfigParam``)."""
ANTHROPIC_TOOL_CHOICES = {
    "auto": frozenset({"type", "disable_parallel_tool_use"}),
    "any": frozenset({"type", "disable_parallel_tool_use"}),
    "tool": frozenset({"type", "name", "disable_parallel_tool_use"}),
    "none": frozenset({"type"}),
}
"""Anthropic's ``tool_choice`` types and the fields of each (the anthropic SDK's
``ToolChoiceParam``)."""
ANTHROPIC_OUTPUT_CONFIG = frozenset({"effort", "format"})
ANTHROPIC_EFFORTS = ("low", "medium", "high", "xhigh", "max")
"""``output_config.effort`` (the anthropic SDK's ``OutputConfigParam``); which models take
``xhigh`` and ``max`` is Anthropic's to judge, per model: the mock takes every level."""
ANTHROPIC_THINKING_ON = ("enabled", "adaptive")
"""The types under which the model thinks, and the rules for thinking hold."""
ANTHROPIC_DISPLAYS = ("summarized", "omitted")
SIGNATURE = "mock-signature"
"""The signature of the mock's thinking blocks: the only one it takes back."""


@dataclass(frozen=True, slots=True)
class ChatServer:
    """Where servers of OpenAI's chat completions differ in what they take."""

    fields: frozenset[str] | None
    """The top-level fields taken; None: any, the unknown ones ignored, nested ones too (a
    content part's ``cache_control``)."""
    max_stop: int | None
    """The most stop sequences taken; None: no limit."""


OPENAI_API = ChatServer(OPENAI_CHAT_PARAMS, OPENAI_MAX_STOP)
VLLM = ChatServer(None, None)
"""vLLM's OpenAI-compatible server: its request model takes (and ignores) fields it does not
know, beside its own sampling parameters (``top_k``, ``min_p``, ...); ``stop`` is a list of
any length (its ``SamplingParams.stop``)."""


def check_openai(body: dict[str, Any], server: ChatServer = OPENAI_API) -> None:
    """Refuse what ``POST /v1/chat/completions`` refuses, of OpenAI or of another ``server``."""
    # vLLM's request model ignores the fields it does not know, at any depth.
    unknown = _openai_unknown if server.fields is not None else None
    for field in body:
        if server.fields is not None and field not in server.fields:
            raise InvalidRequest(f"Unrecognized request argument supplied: {field}")
    _number(body, "temperature", 0, 2)
    _number(body, "top_p", 0, 1)
    _number(body, "frequency_penalty", -2, 2)
    _number(body, "presence_penalty", -2, 2)
    _number(body, "top_logprobs", 0, 20)
    if body.get("top_logprobs") is not None and body.get("logprobs") is not True:
        raise InvalidRequest("top_logprobs: logprobs must be true when top_logprobs is set")
    _one_of(body, "reasoning_effort", OPENAI_EFFORTS)
    _one_of(body, "service_tier", OPENAI_TIERS)
    stop = body.get("stop")
    if server.max_stop is not None and isinstance(stop, list) and len(stop) > server.max_stop:
        raise InvalidRequest(f"stop: at most {server.max_stop} sequences")
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise InvalidRequest("max_tokens: set max_tokens or max_completion_tokens, not both")
    _openai_metadata(body.get("metadata"))
    _openai_response_format(body.get("response_format"))
    for i, message in enumerate(body.get("messages") or []):
        where = f"messages[{i}]"
        _fields(message, OPENAI_MESSAGE_FIELDS, where, unknown)
        if message.get("role") not in OPENAI_ROLES:
            raise InvalidRequest(f"{where}.role: invalid value {message.get('role')!r}")
        content = message.get("content")
        for j, part in enumerate(content if isinstance(content, list) else []):
            kind = part.get("type") if isinstance(part, dict) else None
            allowed = OPENAI_PART_FIELDS.get(str(kind))
            if allowed is None:
                raise InvalidRequest(f"{where}.content[{j}].type: invalid value")
            _fields(part, allowed, f"{where}.content[{j}]", unknown)
            if kind == "image_url":
                _openai_image(part.get("image_url"), f"{where}.content[{j}].image_url", unknown)
            if kind == "file":
                _openai_file(part.get("file"), f"{where}.content[{j}].file", unknown)
    for i, tool in enumerate(body.get("tools") or []):
        _fields(tool, {"type", "function", "custom"}, f"tools[{i}]", unknown)
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict):
            _fields(function, OPENAI_FUNCTION_FIELDS, f"tools[{i}].function", unknown)
        custom = tool.get("custom") if isinstance(tool, dict) else None
        if isinstance(custom, dict):
            _openai_custom(custom, f"tools[{i}].custom", unknown)
    _openai_tool_choice(body.get("tool_choice"))
    unoffered = unoffered_tools(body.get("tools"), body.get("tool_choice"))
    if unoffered is not None:  # no tool a model could call: refused, never made up
        raise InvalidRequest(str(unoffered))


def _openai_custom(custom: dict[str, Any], where: str, unknown: Refusal) -> None:
    """A custom tool: free text, or text a grammar (Lark or a regex) constrains."""
    _fields(custom, OPENAI_CUSTOM_FIELDS, where, unknown)
    form = custom.get("format") or {"type": "text"}
    kind = form.get("type") if isinstance(form, dict) else None
    if kind not in OPENAI_CUSTOM_FORMATS:
        raise InvalidRequest(f"{where}.format.type: invalid value {kind!r}")
    if kind == "grammar":
        grammar = form.get("grammar")
        if not isinstance(grammar, dict) or grammar.get("syntax") not in ("lark", "regex"):
            raise InvalidRequest(f"{where}.format.grammar.syntax: expected 'lark' or 'regex'")
        if not isinstance(grammar.get("definition"), str):
            raise InvalidRequest(f"{where}.format.grammar.definition: Field required")


def _openai_tool_choice(choice: Any) -> None:
    """A mode, a function or custom tool by name, or the tools allowed (``allowed_tools``)."""
    if choice is None or (isinstance(choice, str) and choice in OPENAI_TOOL_MODES):
        return
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind not in OPENAI_TOOL_CHOICES:
        raise InvalidRequest(f"tool_choice: invalid value {choice!r:.60}")
    if kind == "allowed_tools":
        allowed = choice.get("allowed_tools")
        mode = allowed.get("mode") if isinstance(allowed, dict) else None
        if mode not in ("auto", "required"):
            raise InvalidRequest(f"tool_choice.allowed_tools.mode: invalid value {mode!r}")


def _openai_metadata(metadata: Any) -> None:
    """Up to 16 pairs of strings: keys of at most 64 characters, values of at most 512."""
    if metadata is None:
        return
    if not isinstance(metadata, dict):
        raise InvalidRequest("metadata: Input should be an object")
    if len(metadata) > OPENAI_METADATA_PAIRS:
        raise InvalidRequest(f"metadata: at most {OPENAI_METADATA_PAIRS} key-value pairs")
    for key, value in metadata.items():
        if len(key) > OPENAI_METADATA_KEY:
            raise InvalidRequest(f"metadata: keys are at most {OPENAI_METADATA_KEY} characters")
        if not isinstance(value, str):
            raise InvalidRequest(f"metadata.{key}: Input should be a valid string")
        if len(value) > OPENAI_METADATA_VALUE:
            raise InvalidRequest(
                f"metadata.{key}: values are at most {OPENAI_METADATA_VALUE} characters"
            )


def _openai_response_format(response_format: Any) -> None:
    if response_format is None:
        return
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind not in OPENAI_RESPONSE_FORMATS:
        raise InvalidRequest(
            f"response_format.type: invalid value {kind!r}; "
            f"expected one of {sorted(OPENAI_RESPONSE_FORMATS)}"
        )
    if kind == "json_schema":
        schema = response_format.get("json_schema")
        if not isinstance(schema, dict) or not isinstance(schema.get("name"), str):
            raise InvalidRequest("response_format.json_schema.name: Field required")


def _openai_image(image: Any, where: str, unknown: Refusal) -> None:
    if not isinstance(image, dict) or not isinstance(image.get("url"), str):
        raise InvalidRequest(f"{where}.url: Field required")
    _fields(image, {"url", "detail"}, where, unknown)
    detail = image.get("detail", "auto")
    if detail not in OPENAI_DETAILS:
        raise InvalidRequest(
            f"{where}.detail: invalid value {detail!r}; expected one of {sorted(OPENAI_DETAILS)}"
        )


def _openai_file(file: Any, where: str, unknown: Refusal) -> None:
    """A file by id or inline: Chat Completions takes PDFs only (other files' text is sent
    as text)."""
    _fields(file, {"file_data", "file_id", "filename"}, where, unknown)
    data = file.get("file_data")
    if data is None and not isinstance(file.get("file_id"), str):
        raise InvalidRequest(f"{where}: give file_data or file_id")
    if data is not None and not (isinstance(data, str) and data.startswith(PDF_DATA)):
        raise InvalidRequest(f"{where}.file_data: Invalid file data: only PDF files are supported")


def check_anthropic(body: dict[str, Any]) -> None:
    """Refuse what ``POST /v1/messages`` refuses."""
    for field in body:
        if field not in ANTHROPIC_MESSAGES_PARAMS:
            raise InvalidRequest(_extra(field))
    _number(body, "temperature", 0, 1)
    _number(body, "top_p", 0, 1)
    _number(body, "top_k", 0, None)
    _one_of(body, "service_tier", ANTHROPIC_TIERS)
    metadata = body.get("metadata")
    if metadata is not None:
        _fields(metadata, {"user_id"}, "metadata", _extra)
    for i, message in enumerate(body.get("messages") or []):
        _fields(message, {"role", "content"}, f"messages.{i}", _extra)
        if message.get("role") not in ("user", "assistant"):
            raise InvalidRequest(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        _blocks(message.get("content"), f"messages.{i}.content")
    system = body.get("system")
    if isinstance(system, list):
        for i, block in enumerate(system):
            if not isinstance(block, dict) or block.get("type") != "text":
                raise InvalidRequest(f"system.{i}: Input should be a text block")
            _fields(block, ANTHROPIC_BLOCK_FIELDS["text"], f"system.{i}", _extra)
            _cache_control(block, f"system.{i}")
    for i, tool in enumerate(body.get("tools") or []):
        _fields(tool, ANTHROPIC_TOOL_FIELDS, f"tools.{i}", _extra)
        schema = tool.get("input_schema") if isinstance(tool, dict) else None
        if not isinstance(schema, dict) or schema.get("type") != "object":
            raise InvalidRequest(f"tools.{i}.input_schema.type: Input should be 'object'")
        _cache_control(tool, f"tools.{i}")
    _tool_choice(body)
    _output_config(body.get("output_config"))
    _thinking(body)


def _tool_choice(body: dict[str, Any]) -> None:
    """A mode, or a tool by name: one of ``tools``, else no call the model could make."""
    choice = body.get("tool_choice")
    if choice is None:
        return
    kind = _tagged(choice, ANTHROPIC_TOOL_CHOICES, "tool_choice")
    if kind != "tool":
        return
    name = choice.get("name")
    offered = {tool.get("name") for tool in body.get("tools") or [] if isinstance(tool, dict)}
    if not isinstance(name, str) or name not in offered:
        raise InvalidRequest(f"tool_choice.name: tool {name!r} is not one of tools")


def _output_config(config: Any) -> None:
    """How much effort the model spends (``effort``) and the JSON schema of its answer
    (``format``)."""
    if config is None:
        return
    _fields(config, ANTHROPIC_OUTPUT_CONFIG, "output_config", _extra)
    _anthropic_choice(config, "effort", ANTHROPIC_EFFORTS, "output_config")
    form = config.get("format")
    if form is None:
        return
    _fields(form, {"type", "schema"}, "output_config.format", _extra)
    if form.get("type") != "json_schema":
        raise InvalidRequest("output_config.format.type: Input should be 'json_schema'")
    if not isinstance(form.get("schema"), dict):
        raise InvalidRequest("output_config.format.schema: Input should be an object")


def _thinking(body: dict[str, Any]) -> None:
    thinking = body.get("thinking")
    if thinking is None:
        return
    kind = _tagged(thinking, ANTHROPIC_THINKING, "thinking")
    _anthropic_choice(thinking, "display", ANTHROPIC_DISPLAYS, "thinking")
    if kind not in ANTHROPIC_THINKING_ON:
        return
    if kind == "enabled":
        budget = thinking.get("budget_tokens")
        if not isinstance(budget, int) or budget < ANTHROPIC_MIN_THINKING:
            raise InvalidRequest(
                "thinking.budget_tokens: Input should be greater than or equal to 1024"
            )
        if not budget < body.get("max_tokens", 0):
            raise InvalidRequest("`max_tokens` must be greater than `thinking.budget_tokens`")
    if body.get("temperature", 1) != 1:
        raise InvalidRequest("`temperature` may only be set to 1 when thinking is enabled")
    if body.get("top_k") is not None:
        raise InvalidRequest("`top_k` must be unset when thinking is enabled")
    if body.get("top_p", 1) < 0.95:
        raise InvalidRequest(
            "`top_p` must be greater than or equal to 0.95 when thinking is enabled"
        )
    choice = body.get("tool_choice") or {}
    if isinstance(choice, dict) and choice.get("type") in ("any", "tool"):
        raise InvalidRequest("Thinking may not be enabled when tool_choice forces tool use.")
    _thinking_returned(body.get("messages") or [])


def _thinking_returned(messages: list[Any]) -> None:
    """As Anthropic: with thinking on, an assistant turn whose tool calls the last turn
    answers starts with the thinking that led to the calls, and every thinking block sent
    back carries the signature it came with."""
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        for j, block in enumerate(content if isinstance(content, list) else []):
            if block.get("type") == "thinking" and block.get("signature") != SIGNATURE:
                raise InvalidRequest(
                    f"messages.{i}.content.{j}: Invalid `signature` in `thinking` block"
                )
    last = messages[-1] if messages else {}
    answered = isinstance(last.get("content"), list) and any(
        b.get("type") == "tool_result" for b in last["content"]
    )
    if not answered or len(messages) < 2 or not isinstance(messages[-2].get("content"), list):
        return
    i, content = len(messages) - 2, messages[-2]["content"]
    first = content[0].get("type") if content else None
    if first not in ("thinking", "redacted_thinking"):
        raise InvalidRequest(
            f"messages.{i}.content.0.type: Expected `thinking` or `redacted_thinking`, but "
            f"found `{first}`. When `thinking` is enabled, a final `assistant` message must "
            "start with a thinking block (preceeding the lastmost set of `tool_use` and "
            "`tool_result` blocks)."
        )


def _blocks(content: Any, where: str) -> None:
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}: Input should be a valid string or list")
    for i, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        allowed = ANTHROPIC_BLOCK_FIELDS.get(str(kind))
        if allowed is None:
            raise InvalidRequest(f"{where}.{i}.type: Input tag {kind!r} is not a known block")
        _fields(block, allowed, f"{where}.{i}", _extra)
        _cache_control(block, f"{where}.{i}")
        if kind == "document":
            _document_source(block.get("source"), f"{where}.{i}.source")
        if kind == "tool_result":
            _blocks(block.get("content", ""), f"{where}.{i}.content")


def _document_source(source: Any, where: str) -> None:
    """A PDF as base64 or by URL, plain text, content blocks or an uploaded file."""
    kind = source.get("type") if isinstance(source, dict) else None
    if not isinstance(source, dict) or kind not in DOCUMENT_MEDIA:
        raise InvalidRequest(f"{where}.type: Input tag {kind!r} is not a known source")
    media = DOCUMENT_MEDIA[kind]
    if media is not None and source.get("media_type") != media:
        raise InvalidRequest(f"{where}.media_type: Input should be '{media}'")
    if kind in ("base64", "text") and not isinstance(source.get("data"), str):
        raise InvalidRequest(f"{where}.data: Input should be a valid string")


def _cache_control(block: dict[str, Any], where: str) -> None:
    marker = block.get("cache_control")
    if marker is None:
        return
    if not isinstance(marker, dict) or marker.get("type") != "ephemeral":
        raise InvalidRequest(f"{where}.cache_control.type: Input should be 'ephemeral'")
    _fields(marker, {"type", "ttl"}, f"{where}.cache_control", _extra)
    if marker.get("ttl", "5m") not in ("5m", "1h"):
        raise InvalidRequest(f"{where}.cache_control.ttl: Input should be '5m' or '1h'")


def _fields(obj: Any, allowed: Iterable[str], where: str, refusal: Refusal) -> None:
    """``obj`` must be an object; a field it holds beyond ``allowed`` is refused in the
    words of ``refusal``, or ignored when there is none."""
    if not isinstance(obj, dict):
        raise InvalidRequest(f"{where}: Input should be an object")
    for field in obj:
        if refusal is not None and field not in allowed:
            raise InvalidRequest(refusal(f"{where}.{field}"))


def _tagged(obj: Any, kinds: Mapping[str, Iterable[str]], where: str) -> str:
    """The ``type`` of ``obj``, one of ``kinds``; a field beyond those of its type is refused."""
    kind: Any = obj.get("type") if isinstance(obj, dict) else None
    if kind not in kinds:
        raise InvalidRequest(f"{where}.type: Input should be {_either(kinds)}")
    _fields(obj, kinds[kind], where, _extra)
    return str(kind)


def _anthropic_choice(obj: dict[str, Any], field: str, values: Iterable[str], where: str) -> None:
    """``obj``'s ``field``, when given, must be one of ``values`` (in Anthropic's words)."""
    if obj.get(field) not in (None, *values):
        raise InvalidRequest(f"{where}.{field}: Input should be {_either(values)}")


def _either(values: Iterable[str]) -> str:
    """``'a', 'b' or 'c'``, as Anthropic lists the values a field takes."""
    quoted = [f"'{value}'" for value in values]
    return ", ".join(quoted[:-1]) + " or " + quoted[-1]


def _openai_unknown(field: str) -> str:
    return f"Unrecognized request argument supplied: {field}"


def _extra(field: str) -> str:
    return f"{field}: Extra inputs are not permitted"


def _number(body: dict[str, Any], field: str, low: float, high: float | None) -> None:
    value = body.get(field)
    if value is None:
        return
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise InvalidRequest(f"{field}: Input should be a valid number")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise InvalidRequest(f"{field}: Input should be {bound}")


def _one_of(body: dict[str, Any], field: str, allowed: frozenset[str]) -> None:
    value = body.get(field)
    if value is not None and value not in allowed:
        raise InvalidRequest(f"{field}: invalid value {value!r}; expected one of {sorted(allowed)}")
