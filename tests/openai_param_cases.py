"""OpenAI chat parameters of another type or value than OpenAI's API gives them, nested ones
included: the front door and a worker both refuse each naming its path (``param``), never
calling a provider. Each was served and billed by the worker before the two shared one
description of them (``queuegate.openai_params``)."""

from __future__ import annotations

from typing import Any


def _schema(**fields: Any) -> dict[str, Any]:
    return {"response_format": {"type": "json_schema", "json_schema": fields}}


def _tool(**fields: Any) -> dict[str, Any]:
    return {"tools": [{"type": "function", "function": {"name": "f", **fields}}]}


def _custom(**fields: Any) -> dict[str, Any]:
    return {"tools": [{"type": "custom", "custom": {"name": "sh", **fields}}]}


def _allowing(mode: str, *tools: Any) -> dict[str, Any]:
    """A function tool ``f`` offered, and an ``allowed_tools`` choice allowing ``tools``."""
    choice = {"type": "allowed_tools", "allowed_tools": {"mode": mode, "tools": list(tools)}}
    return _tool() | {"tool_choice": choice}


def _naming(kind: str, name: str, *, offered: bool = True) -> dict[str, Any]:
    """A ``tool_choice`` naming the ``kind`` tool ``name``, a function tool ``f`` offered (or
    no tool at all)."""
    choice = {"tool_choice": {"type": kind, kind: {"name": name}}}
    return (_tool() if offered else {}) | choice


ALLOWED = "tool_choice.allowed_tools.tools"

REFUSED: list[tuple[dict[str, Any], str]] = [
    (_schema(name="a", strict="yes"), "response_format.json_schema.strict"),
    (_schema(name="a", schema="obj"), "response_format.json_schema.schema"),
    (_schema(name=5), "response_format.json_schema.name"),
    (_schema(strict=True), "response_format.json_schema.name"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"tool_choice": {"type": "function"}}, "tool_choice.function"),
    ({"tool_choice": {"type": "function", "function": {"name": 5}}}, "tool_choice.function.name"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    (_tool(strict="yes"), "tools.0.function.strict"),
    (_tool(description=5), "tools.0.function.description"),
    ({"tools": [{"type": 5, "function": {"name": "f"}}]}, "tools.0.type"),
    ({"tools": []}, "tools"),  # OpenAI's 400 (empty_array): leave tools out to offer none
    ({"stream_options": "yes"}, "stream_options"),
    ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({"prediction": {"type": "content", "content": 5}}, "prediction.content"),
    ({"prediction": {"type": "content"}}, "prediction.content"),
    ({"prediction": {"type": "x", "content": "a"}}, "prediction.type"),
    ({"audio": {"format": "wav", "voice": 5}}, "audio.voice"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"logit_bias": {"abc": 1}}, "logit_bias.abc"),
    (
        {"web_search_options": {"search_context_size": "huge"}},
        "web_search_options.search_context_size",
    ),
    ({"modalities": ["video"]}, "modalities.0"),
    ({"verbosity": "loud"}, "verbosity"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"service_tier": "turbo"}, "service_tier"),
    ({"prompt_cache_retention": "1y"}, "prompt_cache_retention"),
    ({"thinking": {"type": "enabled", "budget_tokens": "2000"}}, "thinking.budget_tokens"),
    ({"thinking": {"type": "on"}}, "thinking.type"),
    ({"thinking": {"type": "adaptive", "display": "full"}}, "thinking.display"),
    ({"tools": [{"type": "custom", "custom": {"name": ""}}]}, "tools.0.custom.name"),
    ({"tool_choice": {"type": "custom", "custom": {}}}, "tool_choice.custom.name"),
    (
        {"tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "any", "tools": []}}},
        "tool_choice.allowed_tools.mode",
    ),
    ({"thinking": {"type": "enabled", "budget_tokens": 2000, "foo": 1}}, "thinking.foo"),
    (_custom(format={"type": "yaml"}), "tools.0.custom.format.type"),
    (
        _custom(format={"type": "grammar", "grammar": {"syntax": "ebnf", "definition": "x"}}),
        "tools.0.custom.format.grammar.syntax",
    ),
    (
        _custom(format={"type": "grammar", "grammar": {"syntax": "lark"}}),
        "tools.0.custom.format.grammar.definition",
    ),
    (_custom(foo=1), "tools.0.custom.foo"),
    (_allowing("required", {"type": "function", "function": {"name": "nope"}}), ALLOWED),
    (_allowing("auto", {"type": "custom", "custom": {"name": "f"}}), ALLOWED),
    (_allowing("required", {"type": "function", "function": {"name": ["f"]}}), ALLOWED),
    (_allowing("required"), ALLOWED),
    (_naming("function", "nope"), "tool_choice.function.name"),
    (_naming("function", "f", offered=False), "tool_choice.function.name"),
    (_naming("custom", "f"), "tool_choice.custom.name"),
    ({"top_k": "5"}, "top_k"),
    (_tool(input_examples="x"), "tools.0.function.input_examples"),
    (
        {"tools": [{"type": "function", "function": {"name": "f"}, "cache_control": "yes"}]},
        "tools.0.cache_control",
    ),
    (
        {"web_search_options": {"user_location": {"type": "exact", "approximate": {}}}},
        "web_search_options.user_location.type",
    ),
    (
        {
            "web_search_options": {
                "user_location": {"type": "approximate", "approximate": {"city": 5}}
            }
        },
        "web_search_options.user_location.approximate.city",
    ),
]
"""Each set of parameters, and the path of the one at fault, for a model OpenAI serves."""

ENUMS = {
    "modalities.0": "'text' or 'audio'",
    "verbosity": "'low', 'medium' or 'high'",
    "reasoning_effort": "'none', 'minimal', 'low', 'medium', 'high', 'xhigh' or 'max'",
    "service_tier": "'auto', 'default', 'flex', 'scale', 'priority', 'fast' or 'standard_only'",
    "prompt_cache_retention": "'in_memory' or '24h'",
    "web_search_options.search_context_size": "'low', 'medium' or 'high'",
    "thinking.type": "'enabled', 'disabled', 'adaptive', 'between_tools'",
    "thinking.display": "'summarized' or 'omitted'",
    "tools.0.custom.format.type": "'text', 'grammar'",
    "tools.0.custom.format.grammar.syntax": "'lark' or 'regex'",
    "tool_choice.allowed_tools.mode": "'auto' or 'required'",
    "web_search_options.user_location.type": "'approximate'",
}
"""The values each refusal of a name lists as accepted."""
