"""Providers' wire shapes where more than the router needs them.

Anthropic-format requests (batch files, the front door's ``/v1/messages``) are read as
canonical (OpenAI chat) requests (``openai_request``) and answered as Messages API messages
(``anthropic_message``); the router's adapters share the tool-call conversions and
``as_int``.

What the canonical format has no place for travels beside it, for the Anthropic side only:
thinking and redacted_thinking blocks sent back are content parts of their assistant message
(the Anthropic adapter sends them on, the OpenAI one leaves them out), ``is_error`` is a
field of a ``tool`` message, an Anthropic deployment's own Messages body is kept in the
canonical response under ``ANTHROPIC_BODY`` and its stream events beside the deltas
(``StreamChunk.anthropic_events``), so an Anthropic caller gets the blocks, signatures and
usage the provider sent. ``openai_view`` is the response without it.

An answer's id is the gateway's, made from the job's id (``openai_id``, ``anthropic_id``),
never the provider's: that would tell a caller which provider, even which deployment,
served the job, which the gateway's answers otherwise keep to ``model``.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

from queuegate.openai_params import ANTHROPIC_EFFORTS, unoffered_tools
from queuegate.visible import clipped

Block = dict[str, Any]

OPENAI_CHAT_PARAMS = frozenset(
    {"model", "messages", "stream", "stream_options", "audio", "frequency_penalty"}
    | {"function_call", "functions", "logit_bias", "logprobs", "max_completion_tokens"}
    | {"max_tokens", "metadata", "modalities", "moderation", "n", "parallel_tool_calls"}
    | {"prediction", "presence_penalty", "prompt_cache_key", "prompt_cache_options"}
    | {"prompt_cache_retention", "reasoning_effort", "response_format", "safety_identifier"}
    | {"seed", "service_tier", "stop", "store", "temperature", "tool_choice", "tools"}
    | {"top_logprobs", "top_p", "user", "verbosity", "web_search_options"}
)
"""The request body fields of OpenAI's ``POST /v1/chat/completions`` (the ``openai`` SDK's
``CompletionCreateParams``, ``stream`` included)."""
CHUNK_FIELDS = ("system_fingerprint", "service_tier")
"""Fields of OpenAI's ``chat.completion`` that a provider may send beside its choices, which
``chat.completion.chunk`` repeats on every chunk."""
ANTHROPIC_MESSAGES_PARAMS = frozenset(
    {"model", "messages", "max_tokens", "stream", "system", "metadata", "stop_sequences"}
    | {"temperature", "top_p", "top_k", "thinking", "tools", "tool_choice", "service_tier"}
    | {"cache_control", "container", "diagnostics", "inference_geo", "output_config", "speed"}
    | {"user_profile_id", "workspace_id"}
)
"""The request body fields of Anthropic's ``POST /v1/messages`` (the ``anthropic`` SDK's
``MessageCreateParams``, plus the sampling fields its API reference documents)."""
ANTHROPIC_COUNT_TOKENS_PARAMS = frozenset(
    {"model", "messages", "system", "thinking", "tools", "tool_choice", "cache_control"}
    | {"output_config", "speed", "user_profile_id", "workspace_id"}
)
"""The request body fields of Anthropic's ``POST /v1/messages/count_tokens`` (the
``anthropic`` SDK's ``MessageCountTokensParams``)."""


def as_int(value: Any) -> int:
    """An index in a provider's answer; absent or malformed ones are zero."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


MAX_TOKEN_COUNT = 10**9
"""The most tokens one count of a call's usage is believed for: the largest context windows
hold about 10^7. Believed, a provider's negative count paid the team back (its cost and spend
below zero, its budget bypassed) and failed the worker's metrics after the result had left,
so the job was answered twice; a count of 10^15 overflowed usage_log's cost (the row lost)
and the spend counters in Redis (the team refused with a spend of -9.2 billion dollars)."""


def detail_count(value: Any) -> int | None:
    """A count of cache reads or writes: absent or null is none (0); another that is no
    ``token_count`` is None, which makes the whole usage unreadable (a cache write reported
    as ``"2500"`` was free)."""
    return 0 if value is None else token_count(value)


def token_count(value: Any) -> int | None:
    """A token count a provider reported, or None when it is none: absent, not a whole
    number (``"5"``, ``1.5e3``, ``true``), negative, or past ``MAX_TOKEN_COUNT``."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOKEN_COUNT:
        return value
    return None


class NotAnObject(ValueError):
    """A tool call whose input is not a JSON object, which a ``tool_use`` block's ``input``
    must be (Anthropic's reference; its SDK's ``ToolUseBlock.input`` is a ``Dict``): an
    OpenAI model's ``arguments`` may be any text, not even JSON (OpenAI's reference warns
    of it: a call cut by ``max_tokens`` is), not even strict JSON (``strict_json``), a
    misbehaving deployment's ``input`` an array. An OpenAI custom tool's call (``custom``)
    has no tool_use form whatever its text: its input is free text, which its tool takes
    as it is, not an object. The message says which tool and what it was called with."""

    def __init__(self, name: Any, called_with: Any, *, custom: bool = False) -> None:
        shown = called_with if isinstance(called_with, str) else json.dumps(called_with)
        said = (
            f"custom tool {clipped(str(name))!r} with free-text input, which no tool_use "
            "block holds (its input is a JSON object)"
            if custom
            else f"tool {clipped(str(name))!r} with input that is not a JSON object, which "
            "a tool_use block's input must be"
        )
        super().__init__(f"the model called {said}: {clipped(shown, CALLED_WITH)!r}")


def custom_call(call: dict[str, Any]) -> NotAnObject:
    """The NotAnObject of an OpenAI custom tool's call (or its first streamed piece)."""
    custom = call.get("custom") or {}
    return NotAnObject(custom.get("name"), custom.get("input") or "", custom=True)


CALLED_WITH = 200
"""Characters of a tool call's input that ``NotAnObject`` repeats at most."""


def strict_json(text: str) -> Any:
    """The value of JSON ``text``; ValueError when it is no strict JSON (RFC 8259).

    Python's ``json`` reads more: ``NaN`` and ``Infinity``, a number beyond a float's range
    (as ``inf``), a lone surrogate escape (as a string no UTF-8 holds). None of them has a
    form in an answer: ``orjson`` refuses to write them (the front door's 500) or writes
    ``null`` (a value nobody sent), and Anthropic's SDK refuses the streamed text."""
    return orjson.loads(text)


def tool_use_block(call: dict[str, Any]) -> Block:
    """An OpenAI ``tool_calls`` entry as a ``tool_use`` block; NotAnObject when its arguments
    are not a strict JSON object (Anthropic takes only objects), or it is a custom tool's."""
    if call.get("type") == "custom":
        raise custom_call(call)
    function = call.get("function") or {}
    return {
        "type": "tool_use",
        "id": call.get("id"),
        "name": function.get("name"),
        "input": _tool_input(function),
    }


def _tool_input(function: dict[str, Any]) -> dict[str, Any]:
    """A tool call's ``function`` arguments as a ``tool_use`` block's input; NotAnObject when
    they are not a strict JSON object."""
    raw = function.get("arguments") or "{}"
    try:
        arguments = strict_json(raw)
    except (TypeError, ValueError):
        arguments = None
    if not isinstance(arguments, dict):
        raise NotAnObject(function.get("name"), raw)
    return arguments


def tool_call_of(block: Block) -> dict[str, Any]:
    """A ``tool_use`` block as an OpenAI ``tool_calls`` entry."""
    return {
        "id": block.get("id"),
        "type": "function",
        "function": {"name": block.get("name"), "arguments": json.dumps(block.get("input") or {})},
    }


FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
"""Anthropic's ``stop_reason`` as OpenAI's ``finish_reason``; read backwards, the first
``stop_reason`` of each ``finish_reason`` is the one it stands for."""
_STOP_REASONS = {finish: stop for stop, finish in reversed(FINISH_REASONS.items())}
_STOP_REASONS["function_call"] = "tool_use"  # OpenAI's legacy finish of a function_call
STOP_SEQUENCE = "stop_sequence"
"""The canonical choice's field naming the stop sequence the provider stopped at, when it
said which (Anthropic does; OpenAI's ``finish_reason: stop`` does not tell)."""
_INVERSE_PASSED = frozenset({"top_k", "thinking", "service_tier", "fallbacks"})
"""Fields the canonical request carries as they are: Anthropic's parameters the router maps
or passes on, and the request's own ``fallbacks``, which its job takes out of them."""
THINKING_PARTS = frozenset({"thinking", "redacted_thinking"})
"""Anthropic's thinking blocks, kept as content parts of the assistant message sending them
back: their signature must reach Anthropic again when a tool call follows them."""
ANTHROPIC_BODY = "anthropic_body"
"""The canonical response's field holding the Messages body an Anthropic deployment sent."""


def openai_request(
    params: Any, where: str = "params"
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The canonical messages and params of Messages API ``params``.

    Raises ValueError naming the field (under ``where``, the path of ``params`` in its
    document; "" for a request body) when the request is malformed or uses what the
    canonical format cannot carry (documents by URL, file id or content blocks, server
    tools); thinking blocks sent back in assistant turns stay content parts
    (``THINKING_PARTS``), a document (a base64 PDF or plain text) a ``file`` or a text part
    (``document_part``), ``output_config.effort`` the job's ``reasoning_effort``; the
    request's own ``fallbacks`` are kept among the params, as an OpenAI request's body holds
    them (its job takes them out). ``cache_control`` markers are kept where the canonical
    format has them (content parts, system blocks, tool results, tools): the Anthropic
    adapter sends them on.
    """
    if not isinstance(params, dict):
        raise ValueError(f"{where or 'the request'} must be an object")
    turns = params.get("messages")
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{_at(where, 'messages')} must be a non-empty list")
    max_tokens = params.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ValueError(f"{_at(where, 'max_tokens')} must be a positive integer")
    messages: list[dict[str, Any]] = []
    system = params.get("system")
    if system:
        messages.append({"role": "system", "content": _system(system, _at(where, "system"))})
    for index, turn in enumerate(turns):
        at = _at(where, f"messages.{index}")
        if not isinstance(turn, dict) or turn.get("role") not in ("user", "assistant"):
            raise ValueError(f"{at}.role must be user or assistant")
        messages.extend(_openai_turn(turn["role"], turn.get("content"), at))
    out: dict[str, Any] = {"max_tokens": max_tokens}
    for key in ("temperature", "top_p"):
        if params.get(key) is not None:
            out[key] = params[key]
    if params.get("stop_sequences"):
        out["stop"] = params["stop_sequences"]
    user = (params.get("metadata") or {}).get("user_id")
    if user:
        out["user"] = user
    if params.get("tools"):
        out["tools"] = [_function_tool(tool, _at(where, "tools")) for tool in params["tools"]]
    if params.get("tool_choice"):
        out.update(_openai_tool_choice(params["tool_choice"], _at(where, "tool_choice")))
        # Named as the caller sent it (``tool_choice.name``), not as the canonical choice
        # (``tool_choice.function.name``) that a job would be refused naming.
        unoffered = unoffered_tools(out.get("tools"), out.get("tool_choice"))
        if unoffered is not None:
            raise ValueError(f"{_at(where, 'tool_choice.name')}: {unoffered.problem}")
    out.update({key: params[key] for key in _INVERSE_PASSED & params.keys()})
    effort = _output_effort(params, _at(where, "output_config"))
    if effort is not None:
        out["reasoning_effort"] = effort
    return messages, out


def _output_effort(params: Block, where: str) -> str | None:
    """``output_config.effort`` as the job's ``reasoning_effort``: the Anthropic adapter sends
    it back as that effort beside adaptive thinking, and OpenAI takes each level by its name.
    Beside other thinking, or none, it is refused: the job's ``reasoning_effort`` would then
    be a thinking budget for the Anthropic adapter, not the effort asked. Its ``format``
    (structured output) the canonical format does not carry: refused by name."""
    config = params.get("output_config")
    if config is None:
        return None
    if not isinstance(config, dict):
        raise ValueError(f"{where}: Input should be an object")
    for key in config:
        if key != "effort":
            raise ValueError(f"{where}.{key}: not supported by this gateway")
    effort = config.get("effort")
    if effort is None:
        return None
    if effort not in ANTHROPIC_EFFORTS:
        levels = ", ".join(repr(level) for level in ANTHROPIC_EFFORTS)
        raise ValueError(f"{where}.effort: Input should be one of {levels}")
    thinking = params.get("thinking")
    if not (isinstance(thinking, dict) and thinking.get("type") == "adaptive"):
        raise ValueError(
            f"{where}.effort: this gateway carries an effort beside adaptive thinking only "
            '(thinking: {"type": "adaptive"})'
        )
    return str(effort)


def _at(where: str, field: str) -> str:
    return f"{where}.{field}" if where else field


def _system(system: Any, where: str) -> str | list[Block]:
    """The system prompt as one text, or as text parts when any block is marked for caching."""
    if isinstance(system, str):
        return system
    if isinstance(system, list) and all(
        isinstance(b, dict) and b.get("type") == "text" for b in system
    ):
        if any(b.get("cache_control") is not None for b in system):
            return [_text_part(b) for b in system]
        return "\n\n".join(str(b.get("text", "")) for b in system)
    raise ValueError(f"{where} must be a string or a list of text blocks")


def _text_part(block: Block) -> Block:
    return _cached({"type": "text", "text": str(block.get("text", ""))}, block)


def _cached(part: Block, block: Block) -> Block:
    """``part`` with the prompt caching marker of the Anthropic ``block`` it came from."""
    if block.get("cache_control") is not None:
        part["cache_control"] = block["cache_control"]
    return part


def _openai_turn(role: str, content: Any, where: str) -> list[dict[str, Any]]:
    """One Anthropic turn as OpenAI messages: tool results become ``tool`` messages first."""
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list) or not content:
        raise ValueError(f"{where}.content must be a string or a non-empty list of blocks")
    tools: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    for index, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        part = _text_or_image(block)
        if part is not None:
            parts.append(part)
        elif kind == "tool_use" and role == "assistant":
            calls.append(tool_call_of(block))
        elif kind in THINKING_PARTS and role == "assistant":
            parts.append(dict(block))
        elif kind == "document" and role == "user":
            parts.append(document_part(block, f"{where}.content.{index}"))
        elif kind == "tool_result" and role == "user":
            tools.append(_tool_message(block, f"{where}.content.{index}"))
        else:
            raise ValueError(f"{where}.content.{index}: {kind} blocks are not supported here")
    out = list(tools)
    if parts or calls:
        message: dict[str, Any] = {"role": role, "content": parts or None}
        if calls:
            message["tool_calls"] = calls
        out.append(message)
    return out


def _text_or_image(block: Any) -> dict[str, Any] | None:
    """A text or image block as an OpenAI content part; None for any other block."""
    kind = block.get("type") if isinstance(block, dict) else None
    if kind == "text":
        return _text_part(block)
    if kind == "image":
        return _cached({"type": "image_url", "image_url": {"url": _image_url(block)}}, block)
    return None


PDF = "application/pdf"
PLAIN_TEXT = "text/plain"
DOCUMENT = "document"
"""The key of a content part made from a document, holding what OpenAI's parts have no
place for (its ``title``, ``context`` and ``citations``): kept for an Anthropic deployment,
which gets the document back; the OpenAI adapter leaves the title out and refuses the
others."""
DOCUMENT_FIELDS = ("title", "context", "citations")


def document_part(block: Block, where: str) -> Block:
    """An Anthropic document as a canonical content part: a base64 PDF as OpenAI's ``file``
    part (its ``file_data`` a ``data:`` URL, the title its ``filename``), a plain text as a
    text part, so it is screened for PII as any text is (a base64 ``data:`` URL is not).
    ValueError for the sources the gateway cannot carry (a URL, an uploaded file, content
    blocks)."""
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    media = source.get("media_type") if isinstance(source, dict) else None
    data = source.get("data") if isinstance(source, dict) else None
    part: Block
    if kind == "base64" and media == PDF and isinstance(data, str) and data:
        file: Block = {"file_data": f"data:{PDF};base64,{data}"}
        if isinstance(block.get("title"), str):
            file["filename"] = block["title"]
        part = {"type": "file", "file": file}
    elif kind == "text" and media == PLAIN_TEXT and isinstance(data, str):
        part = {"type": "text", "text": data}
    else:
        raise ValueError(
            f"{where}.source: document sources of type {kind!r} ({media}) are not supported: "
            f"send a PDF as base64 ({PDF}) or the text as a text source ({PLAIN_TEXT})"
        )
    part[DOCUMENT] = {key: block[key] for key in DOCUMENT_FIELDS if block.get(key) is not None}
    return _cached(part, block)


def data_url(url: str) -> tuple[str, str] | None:
    """The media type and base64 data of a ``data:<media>;base64,<data>`` URL; None for any
    other URL."""
    if not url.startswith("data:"):
        return None
    header, _, data = url.partition(",")
    media_type, _, encoding = header.removeprefix("data:").partition(";")
    return (media_type, data) if encoding == "base64" and data else None


def _image_url(block: Block) -> str:
    source = block.get("source") or {}
    if source.get("type") == "base64":
        return f"data:{source.get('media_type')};base64,{source.get('data')}"
    if source.get("type") == "url" and isinstance(source.get("url"), str):
        return str(source["url"])
    raise ValueError(f"image sources of type {source.get('type')!r} are not supported")


def _tool_message(block: Block, where: str) -> dict[str, Any]:
    """A tool_result as a ``tool`` message: text and image blocks as content parts (plain text
    when it is one uncached text block), ``is_error`` kept as a field of the message."""
    content = block.get("content")
    if isinstance(content, list):
        parts: list[Block] = []
        for index, part in enumerate(content):
            converted = _text_or_image(part)
            if converted is None:
                kind = part.get("type") if isinstance(part, dict) else None
                raise ValueError(f"{where}.content.{index}: {kind} blocks are not supported here")
            parts.append(converted)
        plain = len(parts) == 1 and parts[0].keys() == {"type", "text"}
        content = parts[0]["text"] if plain else parts
    message = {"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": content or ""}
    if block.get("is_error"):
        message["is_error"] = True
    return _cached(message, block)


ANTHROPIC_EXAMPLES = "input_examples"
"""Anthropic's example inputs of a tool, kept on the function of an Anthropic-format job's
tool: its adapter sends them, OpenAI's has no place for them."""


def _function_tool(tool: Any, where: str) -> dict[str, Any]:
    if not isinstance(tool, dict) or "input_schema" not in tool:
        raise ValueError(f"{where}: only client tools with an input_schema are supported")
    function = {"name": tool.get("name"), "parameters": tool["input_schema"]}
    if tool.get("description"):
        function["description"] = tool["description"]
    # Carried where the adapters read them (Anthropic's tool has them too); OpenAI's function
    # takes strict, and no examples.
    for name in ("strict", ANTHROPIC_EXAMPLES):
        if tool.get(name) is not None:
            function[name] = tool[name]
    return _cached({"type": "function", "function": function}, tool)


def _openai_tool_choice(choice: Any, where: str) -> dict[str, Any]:
    kind = choice.get("type") if isinstance(choice, dict) else None
    names = {"auto": "auto", "none": "none", "any": "required"}
    if kind in names:
        out: dict[str, Any] = {"tool_choice": names[kind]}
    elif kind == "tool":
        out = {"tool_choice": {"type": "function", "function": {"name": choice.get("name")}}}
    else:
        raise ValueError(f"{where} of type {kind!r} is not supported")
    if choice.get("disable_parallel_tool_use"):
        out["parallel_tool_calls"] = False
    return out


def openai_id(job_id: str) -> str:
    """The id of the OpenAI-format answer to a job (whole, or each chunk of its stream)."""
    return f"chatcmpl-{job_id}"


def anthropic_id(job_id: str) -> str:
    """The id of the Messages API answer to a job (whole, or its stream's message_start)."""
    return f"msg_{job_id}"


def anthropic_message(response: dict[str, Any], message_id: str) -> dict[str, Any]:
    """A canonical ``chat.completion`` as a Messages API ``message`` of id ``message_id``;
    NotAnObject when the model called a tool with input the message has no form for.

    An Anthropic deployment's answer is its own body (``ANTHROPIC_BODY``): every block in
    its order, signatures and usage as sent. Another provider's is translated: thinking
    (``reasoning_content``) first, as a thinking block without a signature (no provider
    gave one), then the text (an OpenAI model's ``refusal`` too, with ``stop_reason:
    refusal``, as Anthropic's own refusals end), then the tool calls.
    """
    choice, message = _answer(response)
    content: list[Block] = []
    if isinstance(message.get("reasoning_content"), str) and message["reasoning_content"]:
        content.append(thinking_block(message["reasoning_content"]))
    for text in (message.get("content"), _refusal(choice)):
        if isinstance(text, str) and text:
            content.append({"type": "text", "text": text})
    content.extend(tool_use_block(call) for call in tool_calls_of(message, message_id))
    translated = {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": response.get("model") or "",
        "content": content,
        **anthropic_stop(choice),
        "usage": anthropic_usage(response.get("usage")),
    }
    native = response.get(ANTHROPIC_BODY)
    if not isinstance(native, dict):
        return translated
    _check_inputs(native.get("content"))
    kept = ("content", "stop_reason", "stop_sequence", "usage")
    return translated | {key: native[key] for key in kept if key in native}


def _answer(response: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A canonical response's first choice and its message: a Messages API answer's."""
    choice = (response.get("choices") or [{}])[0]
    return choice, choice.get("message") or {}


def tool_calls_of(message: dict[str, Any], message_id: str) -> list[dict[str, Any]]:
    """A canonical message's tool calls, its legacy ``function_call`` (OpenAI's answer to
    ``functions``, the old form of one tool call) last, as a call of id
    ``function_call_id(message_id)``."""
    calls = list(message.get("tool_calls") or [])
    legacy = message.get("function_call")
    if isinstance(legacy, dict):
        calls.append({"id": function_call_id(message_id), "type": "function", "function": legacy})
    return calls


def function_call_id(message_id: str) -> str:
    """The id of the tool_use block of a legacy ``function_call`` in the Messages API answer
    ``message_id``: OpenAI's has none, a tool_use block must (its tool_result names it)."""
    return "toolu_" + message_id.removeprefix("msg_")


def _check_inputs(content: Any) -> None:
    """NotAnObject when an Anthropic deployment's own ``content`` holds a tool_use block
    whose input is not an object: passed on as sent, but only in the Messages API's form
    (the canonical tool calls said ``{}`` of an empty array: ``tool_call_of``)."""
    for block in content if isinstance(content, list) else []:
        tool_use = isinstance(block, dict) and block.get("type") == "tool_use"
        if tool_use and not isinstance(block.get("input"), dict):
            raise NotAnObject(block.get("name"), block.get("input"))


def has_message_form(response: dict[str, Any]) -> bool:
    """Whether a canonical ``response`` has a Messages API form (``anthropic_message`` raises
    no NotAnObject): its tool calls read as that reads them, no message built (the
    front door builds the one its caller gets)."""
    _, message = _answer(response)
    native = response.get(ANTHROPIC_BODY)
    try:
        for call in tool_calls_of(message, ""):
            tool_use_block(call)
        if isinstance(native, dict):
            _check_inputs(native.get("content"))
    except NotAnObject:
        return False
    return True


def openai_view(response: dict[str, Any], answer_id: str) -> dict[str, Any]:
    """A canonical response as OpenAI's callers get it, of id ``answer_id``: without
    ``ANTHROPIC_BODY``."""
    kept = {key: value for key, value in response.items() if key != ANTHROPIC_BODY}
    return kept | {"id": answer_id}


def thinking_block(thinking: str) -> Block:
    return {"type": "thinking", "thinking": thinking, "signature": ""}


def openai_finish(stop_reason: Any, stop_sequence: Any) -> dict[str, Any]:
    """A Messages API stop as a canonical choice's ``finish_reason`` and, when Anthropic
    named the sequence it stopped at, ``stop_sequence``."""
    finish: dict[str, Any] = {"finish_reason": FINISH_REASONS.get(str(stop_reason), "stop")}
    if stop_reason == "stop_sequence" and isinstance(stop_sequence, str):
        finish[STOP_SEQUENCE] = stop_sequence
    return finish


def anthropic_stop(choice: dict[str, Any]) -> dict[str, Any]:
    """A canonical choice's ``finish_reason`` as a Message's ``stop_reason`` and
    ``stop_sequence`` (the inverse of ``openai_finish``)."""
    sequence = choice.get(STOP_SEQUENCE)
    if _refusal(choice):
        return {"stop_reason": "refusal", "stop_sequence": None}
    if choice.get("finish_reason") == "stop" and isinstance(sequence, str):
        return {"stop_reason": "stop_sequence", "stop_sequence": sequence}
    reason = _STOP_REASONS.get(str(choice.get("finish_reason")), "end_turn")
    return {"stop_reason": reason, "stop_sequence": None}


def _refusal(choice: dict[str, Any]) -> str:
    """The refusal an OpenAI model answered the choice with; "" when it did not refuse."""
    refusal = (choice.get("message") or {}).get("refusal")
    return refusal if isinstance(refusal, str) else ""


def anthropic_usage(usage: Any) -> dict[str, Any]:
    """A ``chat.completion``'s usage as a Message's: Anthropic counts cache reads and writes
    apart from ``input_tokens``, where OpenAI's ``prompt_tokens`` includes them. A usage or
    details of the wrong type are none, as the router reads them: an answer stored before it
    left them out (``prompt_tokens_details: "x"``) failed every read of it with a 500."""
    usage = usage if isinstance(usage, dict) else {}
    details = usage.get("prompt_tokens_details")
    details = details if isinstance(details, dict) else {}
    cached = token_count(details.get("cached_tokens")) or 0
    written = token_count(details.get("cache_write_tokens")) or 0
    return {
        "input_tokens": max(0, (token_count(usage.get("prompt_tokens")) or 0) - cached - written),
        "output_tokens": token_count(usage.get("completion_tokens")) or 0,
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": written,
    }
