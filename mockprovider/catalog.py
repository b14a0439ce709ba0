"""Catalog entries for deployments the mock serves, for tests and benchmarks."""

from __future__ import annotations

from typing import Any

MOCK_KEY_ENV = "QUEUEGATE_MOCK_KEY"


def mock_deployment(name: str, model: str, url: str, /, **fields: Any) -> dict[str, Any]:
    """A catalog deployment of upstream ``model`` at the mock on ``url``: OpenAI's format, the
    key from ``QUEUEGATE_MOCK_KEY``, $1 / $2 per million tokens; ``fields`` add or override."""
    return {
        "name": name,
        "provider": "openai",
        "model": model,
        "api_base": url,
        "api_key_env": MOCK_KEY_ENV,
        "input_per_mtok": "1",
        "output_per_mtok": "2",
    } | fields
