"""Anthropic Messages (``/v1/messages``), translated to and from the canonical OpenAI format.

Request: system and developer messages become the top-level ``system``; ``tool`` messages become
user ``tool_result`` blocks and assistant ``tool_calls`` become ``tool_use`` blocks; consecutive
turns of one role are merged, since the Messages API requires user and assistant to alternate.
Response: text blocks become the message content, ``tool_use`` blocks its ``tool_calls``.

What the Messages API cannot express (audio parts, JSON mode, ``n`` > 1) raises
ProviderError("unsupported"), so the router moves on to a deployment that can.

The inverse direction, for Anthropic-format batch files, is in ``queuegate.provider_formats``.
"""

from __future__ import annotations

import json
import time
from typing import Any

from queuegate.messages import ChatJob, ChatMessage, ChatParams
from queuegate.provider_formats import Block, as_int, tool_call_of, tool_use_block
from router.providers.base import (
    Completion,
    Delta,
    ProviderError,
    ServerEvent,
    UpstreamRequest,
    Usage,
    json_data,
    stream_error,
)

PATH = "/v1/messages"
API_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 1024
"""The Messages API requires ``max_tokens``; OpenAI does not, so jobs often leave it out."""
MAX_TEMPERATURE = 1.0
"""Anthropic's range is 0 to 1, OpenAI's 0 to 2: a hotter request is clamped rather than refused."""

_PASSED_THROUGH = frozenset({"top_k", "metadata", "thinking", "service_tier"})
"""Extra params with the same meaning on the Messages API; OpenAI-only extras are dropped."""

_FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


class AnthropicAdapter:
    """Requests for ``/v1/messages`` with ``x-api-key`` and a pinned ``anthropic-version``."""

    def build_request(
        self, job: ChatJob, model: str, api_key: str | None, *, stream: bool = False
    ) -> UpstreamRequest:
        system, messages = _messages(job.messages)
        body: dict[str, Any] = {"model": model, "messages": messages}
        if system:
            body["system"] = system
        body.update(_params(job.params))
        if stream:
            body["stream"] = True
        headers = {"anthropic-version": API_VERSION}
        if api_key:
            headers["x-api-key"] = api_key
        return UpstreamRequest(path=PATH, body=body, headers=headers)

    def parse_response(self, body: Any, model: str) -> Completion:
        if not isinstance(body, dict) or not isinstance(body.get("content"), list):
            raise ProviderError("bad_response", "no content in the Messages body")
        texts: list[str] = []
        tool_calls: list[dict[str, Any]] = []
        for block in body["content"]:
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text":
                texts.append(str(block.get("text", "")))
            elif kind == "tool_use":
                tool_calls.append(tool_call_of(block))
            # thinking blocks have no place in an OpenAI message
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(texts) if texts else None,
        }
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
                    "finish_reason": _FINISH_REASONS.get(str(body.get("stop_reason")), "stop"),
                }
            ],
            "usage": {
                "prompt_tokens": usage.input_tokens,
                "completion_tokens": usage.output_tokens,
                "total_tokens": usage.input_tokens + usage.output_tokens,
                "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
            },
        }
        return Completion(response=response, usage=usage)

    def stream_parser(self, model: str) -> AnthropicStream:
        return AnthropicStream(self, model)


class AnthropicStream:
    """The Messages event stream, rebuilt into the Messages body it stands for.

    Text deltas become ``content`` deltas; a ``tool_use`` block becomes a tool call whose
    arguments arrive as ``input_json_delta`` pieces, as in OpenAI's streamed tool calls.
    """

    def __init__(self, adapter: AnthropicAdapter, model: str) -> None:
        self._adapter = adapter
        self._message: dict[str, Any] = {"model": model, "content": []}
        self._usage: dict[str, Any] = {}
        self._calls: dict[int, int] = {}
        """Tool call position (OpenAI's ``index``) of each tool_use block index."""
        self._json: dict[int, list[str]] = {}
        self._stopped = False

    def feed(self, event: ServerEvent) -> list[Delta]:
        data = json_data(event)
        kind = data.get("type")
        if kind == "error":
            raise stream_error(data.get("error"))
        if kind == "message_start":
            start = data.get("message") or {}
            self._message |= {k: v for k, v in start.items() if k not in ("content", "usage")}
            self._usage |= start.get("usage") or {}
        elif kind == "content_block_start":
            return self._start(as_int(data.get("index")), data.get("content_block") or {})
        elif kind == "content_block_delta":
            return self._delta(as_int(data.get("index")), data.get("delta") or {})
        elif kind == "message_delta":
            self._message |= data.get("delta") or {}
            self._usage |= data.get("usage") or {}
        elif kind == "message_stop":
            self._stopped = True
        return []

    def _start(self, index: int, block: Block) -> list[Delta]:
        blocks = self._message["content"]
        while len(blocks) <= index:
            blocks.append({"type": "text", "text": ""})
        blocks[index] = dict(block)
        if block.get("type") == "tool_use":
            position = self._calls[index] = len(self._calls)
            self._json[index] = []
            function = {"name": block.get("name"), "arguments": ""}
            call = {"index": position, "id": block.get("id"), "type": "function"}
            return [{"tool_calls": [call | {"function": function}]}]
        if block.get("type") == "text" and block.get("text"):
            return [{"content": block["text"]}]
        return []

    def _delta(self, index: int, delta: Block) -> list[Delta]:
        blocks = self._message["content"]
        if index >= len(blocks):
            raise ProviderError("bad_response", "a stream delta for a block never started")
        if delta.get("type") == "text_delta":
            text = str(delta.get("text") or "")
            blocks[index]["text"] = blocks[index].get("text", "") + text
            return [{"content": text}] if text else []
        if delta.get("type") == "input_json_delta" and index in self._calls:
            piece = str(delta.get("partial_json") or "")
            self._json[index].append(piece)
            function = {"arguments": piece}
            return [{"tool_calls": [{"index": self._calls[index], "function": function}]}]
        return []  # thinking and signature deltas have no place in an OpenAI message

    def completion(self) -> Completion:
        if not self._stopped:
            raise ProviderError("bad_response", "the stream ended before message_stop")
        for index, pieces in self._json.items():
            try:
                self._message["content"][index]["input"] = json.loads("".join(pieces) or "{}")
            except ValueError as exc:
                raise ProviderError("bad_response", "streamed tool input is not JSON") from exc
        return self._adapter.parse_response(
            self._message | {"usage": self._usage}, self._message["model"]
        )


def _messages(messages: list[ChatMessage]) -> tuple[str, list[Block]]:
    """The top-level system prompt and the alternating user/assistant turns."""
    system: list[str] = []
    turns: list[Block] = []
    for message in messages:
        if message.role in ("system", "developer"):
            system.extend(block["text"] for block in _blocks(message.content, text_only=True))
            continue
        role, blocks = _turn(message)
        if not blocks:  # the Messages API refuses empty turns
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    return "\n\n".join(system), [_compact(turn) for turn in turns]


def _turn(message: ChatMessage) -> tuple[str, list[Block]]:
    if message.role == "tool":
        result: Block = {"type": "tool_result", "tool_use_id": message.tool_call_id or ""}
        if isinstance(message.content, str):
            result["content"] = message.content
        elif message.content:
            result["content"] = _blocks(message.content)
        return "user", [result]
    blocks = _blocks(message.content)
    if message.role == "assistant":
        blocks.extend(_tool_use(call) for call in message.tool_calls or [])
    return message.role, blocks


def _blocks(content: str | list[dict[str, Any]] | None, *, text_only: bool = False) -> list[Block]:
    """Content blocks of an OpenAI message content; empty text is dropped (Anthropic refuses it)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks: list[Block] = []
    for part in content:
        kind = part.get("type")
        if kind in ("text", "refusal"):
            text = part.get(kind) or ""
            if text:
                blocks.append({"type": "text", "text": text})
        elif kind == "image_url" and not text_only:
            blocks.append(_image(part.get("image_url")))
        else:
            raise ProviderError("unsupported", f"{kind} content parts")
    return blocks


def _image(image_url: Any) -> Block:
    """An image block: ``data:`` URLs are sent inline as base64, http(s) URLs by reference."""
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str):
        raise ProviderError("unsupported", "image_url parts without a url")
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        media_type, _, encoding = header.removeprefix("data:").partition(";")
        if encoding != "base64" or not data:
            raise ProviderError("unsupported", "data: image URLs that are not base64")
        return {
            "type": "image",
            "source": {"type": "base64", "media_type": media_type, "data": data},
        }
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise ProviderError("unsupported", "image URLs other than data:, http: and https:")


def _tool_use(call: dict[str, Any]) -> Block:
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


def _params(params: ChatParams) -> dict[str, Any]:
    extra = params.model_extra or {}
    if extra.get("n", 1) != 1:
        raise ProviderError("unsupported", "n > 1")
    if params.response_format and params.response_format.get("type") != "text":
        raise ProviderError("unsupported", "response_format (JSON mode)")
    out: dict[str, Any] = {
        "max_tokens": params.max_tokens or extra.get("max_completion_tokens") or DEFAULT_MAX_TOKENS
    }
    if params.temperature is not None:
        out["temperature"] = min(params.temperature, MAX_TEMPERATURE)
    if params.top_p is not None:
        out["top_p"] = params.top_p
    if params.stop:
        out["stop_sequences"] = [params.stop] if isinstance(params.stop, str) else params.stop
    if params.user:
        out["metadata"] = {"user_id": params.user}
    if params.tools:
        out["tools"] = [_tool(tool) for tool in params.tools]
        out["tool_choice"] = _tool_choice(params.tool_choice, extra.get("parallel_tool_calls"))
    out.update({key: extra[key] for key in _PASSED_THROUGH & extra.keys()})
    return out


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
    return out


def _tool_choice(choice: str | dict[str, Any] | None, parallel: Any) -> Block:
    """auto/none keep their names, required is ``any``, a named function is ``tool``."""
    if choice is None or choice == "auto":
        out: Block = {"type": "auto"}
    elif choice == "none":
        return {"type": "none"}
    elif choice == "required":
        out = {"type": "any"}
    elif isinstance(choice, dict):
        out = {"type": "tool", "name": (choice.get("function") or {}).get("name")}
    else:
        raise ProviderError("unsupported", f"tool_choice {choice!r}")
    if parallel is False:
        out["disable_parallel_tool_use"] = True
    return out


def _usage(usage: Any) -> Usage:
    """OpenAI counts cached tokens inside ``prompt_tokens``; Anthropic reports them apart."""
    if not isinstance(usage, dict):
        return Usage()
    cached = as_int(usage.get("cache_read_input_tokens"))
    written = as_int(usage.get("cache_creation_input_tokens"))
    return Usage(
        input_tokens=as_int(usage.get("input_tokens")) + cached + written,
        output_tokens=as_int(usage.get("output_tokens")),
        cached_tokens=cached,
    )
