"""OpenAI chat completions, also spoken by OpenAI-compatible servers (vLLM, llama.cpp, Ollama).

The canonical job already is this wire format, so the request passes through unchanged apart
from the upstream model name, and the response is the canonical one.
"""

from __future__ import annotations

from typing import Any

from queuegate.messages import ChatJob
from router.providers.base import Completion, ProviderError, UpstreamRequest, Usage, as_int

PATH = "/v1/chat/completions"

_NOT_PASSED = frozenset({"model", "messages", "stream", "stream_options"})
"""Owned by the adapter: the deployment names the model, and streaming is not wired yet."""


class OpenAIAdapter:
    """Requests for ``/v1/chat/completions``; the key, when there is one, is a Bearer token."""

    def build_request(self, job: ChatJob, model: str, api_key: str | None) -> UpstreamRequest:
        params = job.params.model_dump(exclude_none=True)
        body: dict[str, Any] = {k: v for k, v in params.items() if k not in _NOT_PASSED}
        body["model"] = model
        body["messages"] = [m.model_dump(exclude_none=True) for m in job.messages]
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
