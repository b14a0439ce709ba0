"""OpenAI chat completions, also spoken by OpenAI-compatible servers (vLLM, llama.cpp, Ollama).

The canonical job already is this wire format, so the request passes through unchanged apart
from the upstream model name, and the response is the canonical one. Streams ask for
``stream_options.include_usage``, so the last chunk carries the token usage.
"""

from __future__ import annotations

import time
from typing import Any

from queuegate.messages import ChatJob
from queuegate.provider_formats import as_int
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

PATH = "/v1/chat/completions"

_NOT_PASSED = frozenset({"model", "messages", "stream", "stream_options"})
"""Owned by the adapter: the deployment names the model, the router decides on streaming."""


class OpenAIAdapter:
    """Requests for ``/v1/chat/completions``; the key, when there is one, is a Bearer token."""

    def build_request(
        self, job: ChatJob, model: str, api_key: str | None, *, stream: bool = False
    ) -> UpstreamRequest:
        params = job.params.model_dump(exclude_none=True)
        body: dict[str, Any] = {k: v for k, v in params.items() if k not in _NOT_PASSED}
        body["model"] = model
        body["messages"] = [m.model_dump(exclude_none=True) for m in job.messages]
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return UpstreamRequest(path=PATH, body=body, headers=headers)

    def parse_response(self, body: Any, model: str) -> Completion:
        if not isinstance(body, dict) or not isinstance(body.get("choices"), list):
            raise ProviderError("bad_response", "no choices in the chat.completion body")
        if not body["choices"]:
            raise ProviderError("bad_response", "empty choices in the chat.completion body")
        usage = body.get("usage")
        if not isinstance(usage, dict):  # OpenAI-compatible servers may leave it out
            usage = {}
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else 0
        return Completion(
            response=body,
            usage=Usage(
                input_tokens=as_int(usage.get("prompt_tokens")),
                output_tokens=as_int(usage.get("completion_tokens")),
                cached_tokens=as_int(cached),
            ),
        )

    def stream_parser(self, model: str) -> OpenAIStream:
        return OpenAIStream(self, model)


class OpenAIStream:
    """``chat.completion.chunk`` events until ``[DONE]``; the deltas are already canonical."""

    def __init__(self, adapter: OpenAIAdapter, model: str) -> None:
        self._adapter = adapter
        self._head: dict[str, Any] = {"model": model}
        self._content: list[str] = []
        self._calls: dict[int, dict[str, Any]] = {}
        self._finish: str | None = None
        self._usage: Any = None

    def feed(self, event: ServerEvent) -> list[Delta]:
        if event.data.strip() == "[DONE]":
            return []
        chunk = json_data(event)
        if "error" in chunk:
            raise stream_error(chunk["error"])
        for field in ("id", "created", "model", "system_fingerprint"):
            if chunk.get(field) is not None:
                self._head[field] = chunk[field]
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        deltas = []
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue  # n > 1 is not streamed through the gateway
            self._finish = choice.get("finish_reason") or self._finish
            delta = choice.get("delta") or {}
            if delta.get("content"):
                self._content.append(delta["content"])
            for call in delta.get("tool_calls") or []:
                self._add_call(call)
            if delta.get("content") or delta.get("tool_calls"):
                deltas.append(delta)
        return deltas

    def _add_call(self, part: dict[str, Any]) -> None:
        call = self._calls.setdefault(
            as_int(part.get("index")), {"type": "function", "function": {"arguments": ""}}
        )
        if part.get("id"):
            call["id"] = part["id"]
        function = part.get("function") or {}
        if function.get("name"):
            call["function"]["name"] = function["name"]
        call["function"]["arguments"] += function.get("arguments") or ""

    def completion(self) -> Completion:
        if self._finish is None:
            raise ProviderError("bad_response", "the stream ended before its finish_reason")
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(self._content) if self._content or not self._calls else None,
        }
        if self._calls:
            message["tool_calls"] = [self._calls[i] for i in sorted(self._calls)]
        body = {
            "object": "chat.completion",
            "created": int(time.time()),
            **self._head,
            "choices": [{"index": 0, "message": message, "finish_reason": self._finish}],
        }
        if self._usage is not None:
            body["usage"] = self._usage
        return self._adapter.parse_response(body, self._head["model"])
