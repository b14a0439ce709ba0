"""Anthropic Messages (``/v1/messages``), translated to and from the canonical OpenAI format.

Request: system and developer messages become the top-level ``system``; ``tool`` messages become
user ``tool_result`` blocks and assistant ``tool_calls`` become ``tool_use`` blocks; consecutive
turns of one role are merged, since the Messages API requires user and assistant to alternate.
``cache_control`` on content parts, messages and tools is kept (prompt caching), and
``reasoning_effort`` becomes extended ``thinking`` with the budget of ``THINKING_BUDGETS``, or,
beside adaptive ``thinking``, its ``output_config.effort`` (``ANTHROPIC_EFFORTS``).
Thinking blocks sent back (content parts of an assistant message) are passed as they are,
signature included, and a tool message's ``is_error`` is the ``tool_result``'s.
Response: text blocks become the message content, ``tool_use`` blocks its ``tool_calls``,
thinking blocks its ``reasoning_content``; the body itself is kept beside them
(``ANTHROPIC_BODY``), and each stream event on the piece it makes (``anthropic_events``), so
an Anthropic caller gets them as sent.

What the Messages API cannot express at all (audio, JSON mode, ``n`` > 1) raises
ProviderError("unsupported"), so the router moves on to a deployment that can. Parameters it
has no equivalent for are refused the same way, or dropped and noted when the job's policy
says ``drop`` (``Fidelity``). docs/providers.md has the whole table.

The inverse direction, for Anthropic-format batch files, is in ``queuegate.provider_formats``.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Literal

from queuegate.messages import ChatJob, ChatMessage, ChatParams
from queuegate.openai_params import (
    ANTHROPIC_EFFORTS,
    MIN_THINKING_BUDGET,
    THINKING_ON,
    named_tool,
)
from queuegate.provider_formats import (
    ANTHROPIC_BODY,
    ANTHROPIC_EXAMPLES,
    DOCUMENT,
    PDF,
    PLAIN_TEXT,
    THINKING_PARTS,
    Block,
    data_url,
    detail_count,
    openai_finish,
    strict_json,
    token_count,
    tool_call_of,
    tool_use_block,
)
from router.providers.base import (
    Completion,
    Delta,
    Fidelity,
    Piece,
    ProviderError,
    ServerEvent,
    UpstreamRequest,
    Usage,
    billed_counts,
    estimate_tokens,
    estimated_usage,
    json_data,
    list_of,
    object_of,
    openai_usage,
    request,
    stream_error,
    text_of,
    text_size,
    texts_of,
    usage_kept,
    whole_of,
)

PATH = "/v1/messages"
API_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 1024
"""The Messages API requires ``max_tokens``; OpenAI does not, so jobs often leave it out."""
MAX_TEMPERATURE = 1.0
"""Anthropic's range is 0 to 1, OpenAI's 0 to 2."""
THINKING_BUDGETS = {"minimal": 1024, "low": 2048, "medium": 8192, "high": 16384, "xhigh": 32768}
"""Thinking tokens allowed for each OpenAI ``reasoning_effort`` (``none``: no thinking)."""
MIN_TOP_P_THINKING = 0.95
"""With thinking on, Anthropic takes ``top_p`` from 0.95 to 1 only."""

_NATIVE = frozenset({"top_k", "thinking"})
"""Extra params of the Messages API itself (from Anthropic-format jobs), passed as they are."""
_SERVICE_TIERS = {"auto": "auto", "default": "standard_only", "standard_only": "standard_only"}
"""OpenAI's tiers (and Anthropic's own) that Anthropic has; flex, priority, scale it has not."""
_NEUTRAL: dict[str, Any] = {
    "logprobs": False,
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "logit_bias": {},
    "store": False,
    "n": 1,
    "parallel_tool_calls": True,
}
"""Values that ask for nothing beyond the default: no reason to refuse or note them."""
_JSON_MODES = frozenset({"json_object", "json_schema"})
"""OpenAI's response_format types that ask for JSON: the Messages API has no such mode."""
_HANDLED = frozenset(
    {"max_completion_tokens", "parallel_tool_calls", "n", "metadata", "service_tier"}
    | {"reasoning_effort", "modalities", "audio"}
    | {"stream", "stream_options"}  # the router decides on streaming
    | _NATIVE
)
"""Extras read below (or owned by the gateway); any other has no Messages API equivalent."""


class AnthropicAdapter:
    """Requests for ``/v1/messages`` with ``x-api-key`` and a pinned ``anthropic-version``."""

    def build_request(
        self,
        job: ChatJob,
        model: str,
        api_key: str | None,
        *,
        stream: bool = False,
        drop: bool = False,
    ) -> UpstreamRequest:
        fidelity = Fidelity("anthropic", drop)
        system, messages = _messages(job.messages, fidelity)
        body: dict[str, Any] = {"model": model, "messages": messages}
        if system:
            body["system"] = system
        body.update(_params(job.params, fidelity))
        if stream:
            body["stream"] = True
        headers = {"anthropic-version": API_VERSION}
        if api_key:
            headers["x-api-key"] = api_key
        # Always set (the Messages API requires it), thinking included; one choice.
        return request(PATH, body, headers, fidelity, body["max_tokens"])

    def parse_response(self, body: Any, model: str, *, choices: int = 1) -> Completion:
        # One choice: more is refused before the call (_params).
        if not isinstance(body, dict) or not isinstance(body.get("content"), list):
            raise ProviderError("bad_response", "no content in the Messages body")
        # Kept as it came (ANTHROPIC_BODY), an Anthropic caller's answer: checked whole.
        texts_of(body, _MESSAGE_TEXTS, "the Messages body")
        texts: list[str] = []
        thoughts: list[str] = []
        tool_calls: list[dict[str, Any]] = []
        for entry in body["content"]:
            block = object_of(entry, "a content block")
            # A text of another type is a bad response, as a stream's (_check_block).
            kind = _check_block(block)
            if kind == "text":
                texts.append(block.get("text") or "")
            elif kind == "tool_use":
                tool_calls.append(tool_call_of(block))
            elif kind == "thinking":
                thoughts.append(block.get("thinking") or "")
            # redacted_thinking is encrypted: nothing a caller could read
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(texts) if texts else None,
        }
        if thoughts:
            message["reasoning_content"] = "".join(thoughts)
        if tool_calls:
            message["tool_calls"] = tool_calls
        usage = _usage(body.get("usage"))
        response = {
            "id": body.get("id"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    **openai_finish(body.get("stop_reason"), body.get("stop_sequence")),
                }
            ],
            "usage": openai_usage(usage) if usage is not None else None,
            ANTHROPIC_BODY: body,
        }
        return Completion(response=response, usage=usage)

    def stream_parser(self, model: str, secret: str | None, *, choices: int = 1) -> AnthropicStream:
        return AnthropicStream(self, model, secret)


class AnthropicStream:
    """The Messages event stream, rebuilt into the Messages body it stands for.

    Text deltas become ``content`` deltas, thinking deltas ``reasoning_content`` ones; a
    ``tool_use`` block becomes a tool call whose arguments arrive as ``input_json_delta``
    pieces, as in OpenAI's streamed tool calls. The events themselves ride on the pieces
    (``Piece.anthropic_events``); those that carry no content (message_start, a block's start,
    signature and stop) wait for the next delta, or the end, so that nothing is relayed
    before the first content: until then the router may still try another deployment.
    """

    def __init__(self, adapter: AnthropicAdapter, model: str, secret: str | None) -> None:
        self._adapter = adapter
        self._secret = secret
        self._message: dict[str, Any] = {"model": model, "content": []}
        self._usage: dict[str, Any] = {}
        self._calls: dict[int, int] = {}
        """Tool call position (OpenAI's ``index``) of each tool_use block index."""
        self._json: dict[int, list[str]] = {}
        self._stopped = False
        self._final = False
        """A message_delta brought the real output count."""
        self._received = 0
        """``text_size`` of text, thinking and tool input received so far."""
        self._pending: list[Block] = []
        """Events read and not yet relayed on a delta."""

    @property
    def model(self) -> str:
        return str(self._message["model"])

    @property
    def ended(self) -> bool:
        return self._stopped

    def feed(self, event: ServerEvent) -> list[Piece]:
        data = json_data(event, self._secret)
        pieces = [Piece(delta) for delta in self._read(data)]
        if data.get("type") in _RELAYED:
            self._pending.append(_relayed(data))
        if data.get("type") == "message_delta" and self._pending:
            pieces.append(Piece({}))  # the last events, relayed before the end
        if pieces and self._pending:
            pieces[0] = replace(pieces[0], anthropic_events=self._pending)
            self._pending = []
        return pieces

    def _read(self, data: Block) -> list[Delta]:
        # Every field read is checked as it comes, before its event is relayed: not only by
        # parse_response at the end, once the events before the bad one had been.
        kind = text_of(data.get("type"), "a stream event's type")
        if kind == "error":
            raise stream_error(data.get("error"), self._secret)
        if kind == "message_start":
            start = object_of(data.get("message"), "message_start's message")
            texts_of(start, _MESSAGE_TEXTS, "message_start's message")
            self._message |= {k: v for k, v in start.items() if k not in ("content", "usage")}
            self._usage |= _given(start.get("usage"))
        elif kind == "content_block_start":
            block = object_of(data.get("content_block"), "a content block")
            _check_block(block)
            return self._start(whole_of(data.get("index"), "a content block's index"), block)
        elif kind == "content_block_delta":
            delta = object_of(data.get("delta"), "a content block's delta")
            text_of(delta.get("type"), "a content block delta's type")
            return self._delta(whole_of(data.get("index"), "a content block's index"), delta)
        elif kind == "message_delta":
            delta = object_of(data.get("delta"), "message_delta's delta")
            texts_of(delta, _MESSAGE_TEXTS, "message_delta's delta")
            self._message |= delta
            # Counts it leaves null (the SDK types them so) are not message_start's erased.
            given = _given(data.get("usage"))
            self._usage |= given
            self._final = "output_tokens" in given
        elif kind == "message_stop":
            self._stopped = True
        return []

    def _start(self, index: int, block: Block) -> list[Delta]:
        blocks = self._message["content"]
        if not 0 <= index <= len(blocks):
            # Blocks start in order; a gap was filled block by block up to the index, so one
            # start at index 10^9 took the worker's memory.
            raise ProviderError("bad_response", "a stream block started out of order")
        if index == len(blocks):
            blocks.append({})
        blocks[index] = dict(block)
        if block.get("type") == "tool_use":
            position = self._calls[index] = len(self._calls)
            self._json[index] = []
            function = {"name": block.get("name") or "", "arguments": ""}
            call = {"index": position, "id": block.get("id") or "", "type": "function"}
            return [{"tool_calls": [call | {"function": function}]}]
        text = block.get("text") or ""
        if block.get("type") == "text" and text:
            self._received += text_size(text)
            return [{"content": text}]
        return []

    def _delta(self, index: int, delta: Block) -> list[Delta]:
        blocks = self._message["content"]
        if index >= len(blocks):
            raise ProviderError("bad_response", "a stream delta for a block never started")
        kind = delta.get("type")
        if kind == "signature_delta":  # seals the thinking, to be sent back with a tool call
            blocks[index]["signature"] = text_of(delta.get("signature"), "a signature")
            return []
        if kind in ("text_delta", "thinking_delta"):
            field = "text" if kind == "text_delta" else "thinking"
            text = text_of(delta.get(field), f"a {kind}'s {field}")
            blocks[index][field] = blocks[index].get(field, "") + text
            self._received += text_size(text)
            if not text:
                return []
            return [{"content": text}] if field == "text" else [{"reasoning_content": text}]
        if kind == "citations_delta":  # relayed as it came, to an Anthropic caller only
            object_of(delta.get("citation"), "a citations_delta's citation")
            return []
        if kind == "input_json_delta" and index in self._calls:
            piece = text_of(delta.get("partial_json"), "an input_json_delta's partial_json")
            self._json[index].append(piece)
            self._received += text_size(piece)
            function = {"arguments": piece}
            return [{"tool_calls": [{"index": self._calls[index], "function": function}]}]
        return []

    def completion(self) -> Completion:
        if not self._stopped:
            raise ProviderError("bad_response", "the stream ended before message_stop")
        for index, pieces in self._json.items():
            try:
                self._message["content"][index]["input"] = strict_json("".join(pieces) or "{}")
            except ValueError as exc:
                raise ProviderError("bad_response", "streamed tool input is not JSON") from exc
        parsed = self._adapter.parse_response(
            self._message | {"usage": self._usage}, self._message["model"]
        )
        if self._final or parsed.usage is None:
            return parsed
        # No message_delta said the output count: message_start's is a placeholder (1), and
        # the stream's text was billed as one token.
        usage = self._estimated(parsed.usage)
        return Completion(parsed.response | {"usage": openai_usage(usage)}, usage)

    def received(self, prompt_size: int, ttl: Literal["5m", "1h"] | None) -> Usage:
        """The usage of a stream that broke: the counts a message_delta reported, else
        message_start's input count (Anthropic sends it first) and the output estimated from
        what arrived (message_start's output count is a placeholder)."""
        usage = _usage(self._usage)
        if usage is not None and self._final:
            return usage
        if usage is not None:
            return self._estimated(usage)
        return estimated_usage(estimate_tokens(prompt_size), estimate_tokens(self._received), ttl)

    def _estimated(self, usage: Usage) -> Usage:
        """``usage`` with its output counted from the text received: message_start's input
        and cache counts, which the provider bills, kept."""
        output = estimate_tokens(self._received)
        thinking = min(usage.reasoning_tokens, output)
        return replace(usage, output_tokens=output, reasoning_tokens=thinking, estimated=True)


_MESSAGE_TEXTS = ("id", "type", "role", "model", "stop_reason", "stop_sequence")
"""The text fields of a Message (the stop's nullable), read or kept as they came."""
_BLOCK_TEXTS = {
    "text": ("text",),
    "thinking": ("thinking", "signature"),
    "redacted_thinking": ("data",),
    "tool_use": ("id", "name"),
    "server_tool_use": ("id", "name"),
}
"""The text fields of each type of content block, read or relayed as they came."""
_BLOCK_SHAPES: dict[str, dict[str, tuple[type, ...]]] = {
    "server_tool_use": {"input": (dict,)},
    "web_search_tool_result": {"content": (list, dict)},  # its results, or its error
}
"""The other fields of a content block relayed as it came, checked as the Messages API
documents them (what is inside, passed as sent)."""
_USAGE_OBJECTS = ("cache_creation", "server_tool_use", "output_tokens_details")
_USAGE_TEXTS = ("service_tier",)
"""A usage's fields beside its counts, relayed unless of the wrong type (``usage_kept``)."""


def _check_block(block: Block) -> str:
    """A content block's type; raises ProviderError("bad_response") when one of its fields,
    read or relayed as it came (to an Anthropic caller, as a stream's content_block_start
    is), is of the wrong type: its type, its texts (``_BLOCK_TEXTS``), its citations (a
    list). Relayed, a caller's SDK read a thinking block of thinking 42."""
    kind = text_of(block.get("type"), "a content block's type")
    texts_of(block, _BLOCK_TEXTS.get(kind, ()), f"a {kind} block")
    list_of(block.get("citations"), f"a {kind} block's citations")
    for field, types in _BLOCK_SHAPES.get(kind, {}).items():
        if not isinstance(block.get(field), (*types, type(None))):
            raise ProviderError("bad_response", f"a {kind} block's {field} is of the wrong type")
    return kind


def _relayed(event: Block) -> Block:
    """A stream ``event`` as an Anthropic caller gets it: as it came, but message_start's
    usage without fields of the wrong type (``usage_kept``), as the whole answer's."""
    message = event.get("message")
    if event.get("type") != "message_start" or not isinstance(message, dict):
        return event
    if "usage" not in message:
        return event
    usage = usage_kept(message["usage"], _USAGE_OBJECTS, _USAGE_TEXTS)
    return event | {"message": message | {"usage": usage}}


_RELAYED = frozenset(
    {"message_start", "content_block_start", "content_block_delta", "content_block_stop"}
)
"""Stream events an Anthropic caller gets as they came; the front door writes the end."""


def _messages(
    messages: list[ChatMessage], fidelity: Fidelity
) -> tuple[str | list[Block], list[Block]]:
    """The top-level system prompt and the alternating user/assistant turns."""
    system: list[Block] = []
    turns: list[Block] = []
    for index, message in enumerate(messages):
        if message.name is not None:
            fidelity.unsupported("messages[].name", "a message's name is not supported")
        if message.role in ("system", "developer"):
            system.extend(_cached(message, _blocks(message.content, fidelity, text_only=True)))
            continue
        role, blocks = _turn(message, f"messages.{index}", fidelity)
        if not blocks:  # the Messages API refuses empty turns
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    if any("cache_control" in block for block in system):
        return system, [_compact(turn) for turn in turns]
    return "\n\n".join(block["text"] for block in system), [_compact(turn) for turn in turns]


def _cached(message: ChatMessage, blocks: list[Block]) -> list[Block]:
    """A message-level ``cache_control`` marks the end of that message: its last block."""
    marker = (message.model_extra or {}).get("cache_control")
    if marker is not None and blocks:
        blocks[-1] = blocks[-1] | {"cache_control": marker}
    return blocks


def _turn(message: ChatMessage, where: str, fidelity: Fidelity) -> tuple[str, list[Block]]:
    if message.role == "tool":
        result: Block = {"type": "tool_result", "tool_use_id": message.tool_call_id or ""}
        if isinstance(message.content, str):
            result["content"] = message.content
        elif message.content:
            result["content"] = _blocks(message.content, fidelity)
        if (message.model_extra or {}).get("is_error") is True:
            result["is_error"] = True
        return "user", _cached(message, [result])
    blocks = _blocks(message.content, fidelity)
    if message.role == "assistant":
        calls = enumerate(message.tool_calls or [])
        blocks.extend(_tool_use(call, f"{where}.tool_calls.{i}") for i, call in calls)
    return message.role, _cached(message, blocks)


def _blocks(
    content: str | list[dict[str, Any]] | None, fidelity: Fidelity, *, text_only: bool = False
) -> list[Block]:
    """Content blocks of an OpenAI message content; empty text is dropped (Anthropic refuses it)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks: list[Block] = []
    for part in content:
        kind = part.get("type")
        if kind == "text" and DOCUMENT in part:
            block = _document(part)
        elif kind in ("text", "refusal"):
            text = part.get(kind) or ""
            if not text:
                continue
            block = {"type": "text", "text": text}
        elif kind == "image_url" and not text_only:
            block = _image(part.get("image_url"), fidelity)
        elif kind == "file" and not text_only:
            block = _document(part)
        elif kind in THINKING_PARTS and not text_only:
            blocks.append(part)  # as Anthropic sent it: the signature must match
            continue
        else:
            raise ProviderError("unsupported", f"{kind} content parts")
        if part.get("cache_control") is not None:
            block["cache_control"] = part["cache_control"]
        blocks.append(block)
    return blocks


def _image(image_url: Any, fidelity: Fidelity) -> Block:
    """An image block: ``data:`` URLs are sent inline as base64, http(s) URLs by reference."""
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str):
        raise ProviderError("unsupported", "image_url parts without a url")
    if isinstance(image_url, dict) and image_url.get("detail", "auto") != "auto":
        fidelity.unsupported("image_url.detail", "an image's detail level is not supported")
    if url.startswith("data:"):
        inline = data_url(url)
        if inline is None:
            raise ProviderError("unsupported", "data: image URLs that are not base64")
        media_type, data = inline
        return {
            "type": "image",
            "source": {"type": "base64", "media_type": media_type, "data": data},
        }
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise ProviderError("unsupported", "image URLs other than data:, http: and https:")


def _document(part: Block) -> Block:
    """A document block of a ``file`` part (a PDF as its base64 source, ``filename`` its
    title) or of a text part made from a document (its text as a text source), with the
    document's own fields (``DOCUMENT``). An uploaded file (``file_id``) is OpenAI's own,
    and Anthropic's documents are PDFs or text: anything else is refused."""
    fields = part.get(DOCUMENT) or {}
    if part.get("type") == "text":
        source: Block = {"type": "text", "media_type": PLAIN_TEXT, "data": part.get("text")}
        return {"type": "document", "source": source, **fields}
    file = part.get("file")
    data = file.get("file_data") if isinstance(file, dict) else None
    inline = data_url(data) if isinstance(data, str) else None
    if inline is None or inline[0] != PDF:
        raise ProviderError("unsupported", "file parts other than a PDF's base64 file_data")
    pdf = {"type": "base64", "media_type": PDF, "data": inline[1]}
    block: Block = {"type": "document", "source": pdf}
    title = file.get("filename") if isinstance(file, dict) else None
    if isinstance(title, str):
        block["title"] = title
    return block | fields


def _tool_use(call: dict[str, Any], where: str) -> Block:
    if call.get("type") != "function":
        # A custom tool's call is free text, a tool_use block's input an object; and a
        # custom tool is no tool Anthropic can be offered (``_tool``).
        kind = str(call.get("type"))[:40]
        raise ProviderError("unsupported", f"{where}: {kind} tool calls", param=where)
    try:
        return tool_use_block(call)
    except ValueError as exc:
        raise ProviderError("unsupported", str(exc)) from exc


def _compact(turn: Block) -> Block:
    """A turn of one plain text block is sent as a string, as in Anthropic's own examples."""
    content = turn["content"]
    if len(content) == 1 and content[0].keys() == {"type", "text"}:
        return {"role": turn["role"], "content": content[0]["text"]}
    return turn


def _params(params: ChatParams, fidelity: Fidelity) -> dict[str, Any]:
    extra = params.model_extra or {}
    _refuse_what_cannot_be_expressed(params, extra)
    for key, value in extra.items():
        if key not in _HANDLED and _NEUTRAL.get(key, ...) != value:
            fidelity.unsupported(key)
    if params.seed is not None:
        fidelity.unsupported("seed")
    out: dict[str, Any] = {"max_tokens": params.output_limit or DEFAULT_MAX_TOKENS}
    if params.temperature is not None:
        if params.temperature > MAX_TEMPERATURE:
            fidelity.change("temperature", f"{params.temperature} is above Anthropic's 1.0")
        out["temperature"] = min(params.temperature, MAX_TEMPERATURE)
    if params.top_p is not None:
        out["top_p"] = params.top_p
    if params.stop:
        out["stop_sequences"] = [params.stop] if isinstance(params.stop, str) else params.stop
    metadata = _metadata(params.user, extra.get("metadata"), fidelity)
    if metadata:
        out["metadata"] = metadata
    tier = extra.get("service_tier")
    if tier is not None:
        if tier in _SERVICE_TIERS:
            out["service_tier"] = _SERVICE_TIERS[tier]
        else:
            fidelity.unsupported("service_tier", f"tier {tier!r} does not exist")
    if params.tools:
        tools, choice = _allowed(params.tools, params.tool_choice)
        out["tools"] = [_tool(tool) for tool in tools]
        out["tool_choice"] = _tool_choice(choice, extra.get("parallel_tool_calls"))
    out.update({key: extra[key] for key in _NATIVE & extra.keys()})
    _thinking(params, extra, out, fidelity)
    return out


def _refuse_what_cannot_be_expressed(params: ChatParams, extra: dict[str, Any]) -> None:
    """What no policy can drop without breaking the answer the caller expects."""
    if params.choices != 1:  # ChatParams allows 1 to MAX_CHOICES
        raise ProviderError("unsupported", f"n = {params.choices}: more than one choice")
    if params.response_format is not None:
        kind = params.response_format.get("type")
        if kind in _JSON_MODES:
            raise ProviderError("unsupported", f"response_format {kind} (JSON mode)")
        if kind != "text":
            raise ProviderError(
                "unsupported", f"response_format type {str(kind)[:40]!r}: not a known mode"
            )
    if extra.get("audio") is not None or "audio" in (extra.get("modalities") or []):
        raise ProviderError("unsupported", "audio output")


def _metadata(user: str | None, metadata: Any, fidelity: Fidelity) -> Block:
    """Anthropic's metadata holds ``user_id`` only: from ``user``, else from the job's own
    ``metadata.user_id``; OpenAI's free-form metadata has no equivalent."""
    out: Block = {"user_id": user} if user else {}
    if metadata is None:
        return out
    if not isinstance(metadata, dict):
        fidelity.unsupported("metadata")
        return out
    for key, value in metadata.items():
        if key == "user_id" and value is not None and value == out.setdefault("user_id", value):
            continue
        fidelity.unsupported(f"metadata.{key}")
    return out


def _thinking(params: ChatParams, extra: dict[str, Any], out: Block, fidelity: Fidelity) -> None:
    """``reasoning_effort`` as extended thinking (beside adaptive thinking, as its effort), and
    what thinking requires of the rest."""
    effort = extra.get("reasoning_effort")
    asked_by = "thinking"
    if effort not in (None, "none"):
        if (extra.get("thinking") or {}).get("type") == "adaptive":
            out["output_config"] = {"effort": _effort(effort, fidelity)}
        elif "thinking" in extra:
            fidelity.unsupported("reasoning_effort", "set together with thinking")
        elif effort not in THINKING_BUDGETS:
            fidelity.unsupported("reasoning_effort", f"{effort!r} has no thinking budget")
        else:
            out["thinking"] = {"type": "enabled", "budget_tokens": THINKING_BUDGETS[effort]}
            asked_by = "reasoning_effort"
    thinking = out.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") == "enabled":
        # The job's own budget as an effort's (an Anthropic-format job's is below its
        # max_tokens already: Anthropic's door refuses it otherwise).
        _budget(params, out, thinking, asked_by, fidelity)
        thinking = out.get("thinking")
    if not (isinstance(thinking, dict) and thinking.get("type") in THINKING_ON):
        return
    # Anthropic's rules for thinking, adaptive thinking's too: temperature 1 only, no top_k,
    # top_p 0.95 or more, and the model must be free to think before any tool call.
    if out.get("temperature", 1) != 1:
        fidelity.change("temperature", "must be 1 with thinking")
        del out["temperature"]
    if "top_k" in out:
        fidelity.unsupported("top_k", "not allowed with thinking")
        del out["top_k"]
    if out.get("top_p", 1) < MIN_TOP_P_THINKING:
        fidelity.change("top_p", f"must be at least {MIN_TOP_P_THINKING} with thinking")
        del out["top_p"]
    choice = out.get("tool_choice") or {}
    if choice.get("type") in ("any", "tool"):
        fidelity.change("tool_choice", "a forced tool is not allowed with thinking")
        out["tool_choice"] = {"type": "auto"} | {
            k: v for k, v in choice.items() if k == "disable_parallel_tool_use"
        }


def _effort(effort: str, fidelity: Fidelity) -> str:
    """``reasoning_effort`` as the effort of adaptive thinking, which Anthropic sets with
    ``output_config.effort``, not with a budget: ``minimal``, below its lowest level,
    refused or sent as ``low``."""
    if effort in ANTHROPIC_EFFORTS:
        return effort
    fidelity.change("reasoning_effort", f"{effort!r} is below the lowest effort, 'low'")
    return "low"


def _budget(
    params: ChatParams, out: Block, thinking: Block, asked_by: str, fidelity: Fidelity
) -> None:
    """Enabled ``thinking`` within the job's ``max_tokens``, which bounds thinking and answer
    together, as OpenAI's bounds reasoning and answer: its budget lowered below it; without
    one, the answer keeps ``DEFAULT_MAX_TOKENS`` past the budget. Too little left to think:
    ``asked_by`` (the parameter that asked for thinking) refused, or dropped."""
    requested = params.output_limit
    budget = thinking["budget_tokens"]
    if requested is None:
        out["max_tokens"] = budget + DEFAULT_MAX_TOKENS
    else:
        budget = min(budget, requested - 1)
        if budget < MIN_THINKING_BUDGET:
            fidelity.unsupported(asked_by, f"max_tokens must exceed {MIN_THINKING_BUDGET} to think")
            out.pop("thinking", None)
            return
    out["thinking"] = thinking | {"budget_tokens": budget}


def _tool(tool: dict[str, Any]) -> Block:
    if tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise ProviderError("unsupported", f"{tool.get('type')} tools")
    function = tool["function"]
    out: Block = {
        "name": function.get("name"),
        # OpenAI lets a function take no parameters; Anthropic requires an object schema.
        "input_schema": function.get("parameters") or {"type": "object", "properties": {}},
    }
    if function.get("description"):
        out["description"] = function["description"]
    for name in ("strict", ANTHROPIC_EXAMPLES):
        if function.get(name) is not None:
            out[name] = function[name]
    if tool.get("cache_control") is not None:
        out["cache_control"] = tool["cache_control"]
    return out


def _allowed(
    tools: list[dict[str, Any]], choice: str | dict[str, Any] | None
) -> tuple[list[dict[str, Any]], str | dict[str, Any] | None]:
    """OpenAI's ``allowed_tools`` choice as the tools Anthropic is offered (those it allows)
    and its mode (``auto`` or ``required``); any other choice as it is, with every tool."""
    if not (isinstance(choice, dict) and choice.get("type") == "allowed_tools"):
        return tools, choice
    allowed = choice.get("allowed_tools") or {}
    named = {named_tool(tool) for tool in allowed.get("tools") or []}
    return [tool for tool in tools if named_tool(tool) in named], allowed.get("mode")


def _tool_choice(choice: str | dict[str, Any] | None, parallel: Any) -> Block:
    """auto/none keep their names, required is ``any``, a named function is ``tool``."""
    if choice is None or choice == "auto":
        out: Block = {"type": "auto"}
    elif choice == "none":
        return {"type": "none"}
    elif choice == "required":
        out = {"type": "any"}
    elif isinstance(choice, dict) and choice.get("type") == "function":
        out = {"type": "tool", "name": named_tool(choice)[1]}
    else:
        kind = choice.get("type") if isinstance(choice, dict) else choice
        raise ProviderError("unsupported", f"tool_choice {str(kind)[:40]!r}")
    if parallel is False:
        out["disable_parallel_tool_use"] = True
    return out


def _given(usage: Any) -> dict[str, Any]:
    """The counts a stream event's usage gives: those it leaves null are not given."""
    if not isinstance(usage, dict):
        return {}
    return {name: count for name, count in usage.items() if count is not None}


def native_usage(sent: dict[str, Any], usage: Usage) -> dict[str, Any]:
    """An answer's own usage object ``sent`` with the counts it is billed by (``usage``: read
    from it, clamped, or its output estimated), as a Messages API caller reads them; its
    other fields kept, but for those of the wrong type (``usage_kept``)."""
    sent = usage_kept(sent, _USAGE_OBJECTS, _USAGE_TEXTS)
    written, hour = usage.cache_write_tokens, usage.cache_write_1h_tokens
    counts = billed_counts(
        sent,
        input_tokens=usage.input_tokens - usage.cached_tokens - written,
        output_tokens=usage.output_tokens,
        cache_read_input_tokens=usage.cached_tokens,
        cache_creation_input_tokens=written,
    )
    if "cache_creation" in sent:
        counts["cache_creation"] = billed_counts(
            sent["cache_creation"],
            ephemeral_5m_input_tokens=written - hour,
            ephemeral_1h_input_tokens=hour,
        )
    if "output_tokens_details" in sent:
        counts["output_tokens_details"] = billed_counts(
            sent["output_tokens_details"], thinking_tokens=usage.reasoning_tokens
        )
    return counts


def _usage(usage: Any) -> Usage | None:
    """Anthropic reports cache reads and writes apart from ``input_tokens``; the canonical
    count includes them, as OpenAI's ``prompt_tokens`` does. None without an input and an
    output count to bill by (``token_count``), or with a cache count that is no count
    (``detail_count``); another detail that is no count is none."""
    if not isinstance(usage, dict):
        return None
    uncached = token_count(usage.get("input_tokens"))
    output = token_count(usage.get("output_tokens"))
    cached = detail_count(usage.get("cache_read_input_tokens"))
    written = detail_count(usage.get("cache_creation_input_tokens"))
    if uncached is None or output is None or cached is None or written is None:
        return None
    creation = usage.get("cache_creation")
    creation = creation if isinstance(creation, dict) else {}
    hour = token_count(creation.get("ephemeral_1h_input_tokens")) or 0
    details = usage.get("output_tokens_details")
    details = details if isinstance(details, dict) else {}
    thinking = token_count(details.get("thinking_tokens")) or 0
    return Usage(
        input_tokens=uncached + cached + written,
        output_tokens=output,
        cached_tokens=cached,
        cache_write_tokens=written,
        cache_write_1h_tokens=min(hour, written),
        reasoning_tokens=min(thinking, output),
    )
