"""Batch files for tests: the providers' documented examples, generated ones, reading results."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson

from queuegate.settings import Settings

# From OpenAI's Batch API guide (platform.openai.com/docs/guides/batch), as published.
OPENAI_EXAMPLE = [
    {
        "custom_id": "request-1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "gpt-3.5-turbo-0125",
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Hello world!"},
            ],
            "max_tokens": 1000,
        },
    },
    {
        "custom_id": "request-2",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "gpt-3.5-turbo-0125",
            "messages": [
                {"role": "system", "content": "You are an unhelpful assistant."},
                {"role": "user", "content": "Hello world!"},
            ],
            "max_tokens": 1000,
        },
    },
]

# From Anthropic's Message Batches guide (docs.anthropic.com), as published.
ANTHROPIC_EXAMPLE = [
    {
        "custom_id": "my-first-request",
        "params": {
            "model": "claude-opus-4-20250514",
            "max_tokens": 1024,
            "messages": [{"role": "user", "content": "Hello, world"}],
        },
    },
    {
        "custom_id": "my-second-request",
        "params": {
            "model": "claude-opus-4-20250514",
            "max_tokens": 1024,
            "messages": [{"role": "user", "content": "Hi again, friend"}],
        },
    },
]


def openai_line(i: int, model: str = "gpt-4o-mini") -> dict[str, Any]:
    return {
        "custom_id": f"req-{i}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": f"Question {i}"}]},
    }


def write_jsonl(path: Path, entries: list[Any]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in entries))
    return path


def read_jsonl(*paths: Path) -> list[dict[str, Any]]:
    return [
        orjson.loads(raw)
        for path in paths
        if path.exists()
        for raw in path.read_bytes().splitlines()
        if raw.strip()
    ]


def cli_env(settings: Settings, api_key: str | None = None) -> dict[str, str]:
    """The environment that points a ``queuegate`` subprocess at this test's namespace."""
    key = {"QUEUEGATE_API_KEY": api_key} if api_key else {}
    return {
        **os.environ,
        "QUEUEGATE_AMQP_URL": settings.amqp_url,
        "QUEUEGATE_REDIS_URL": settings.redis_url,
        "QUEUEGATE_DATABASE_URL": settings.database_url,
        "QUEUEGATE_NAMESPACE": settings.namespace,
        "QUEUEGATE_DATABASE_SCHEMA": settings.database_schema,
        **key,
    }


def start_cli(
    settings: Settings, *args: str, api_key: str | None = None
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "cli", *args],
        env=cli_env(settings, api_key),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def cli_to_a_gone_reader(
    settings: Settings, *args: str, api_key: str | None = None
) -> subprocess.Popen[bytes]:
    """A ``queuegate`` command whose stdout and stderr go to a pipe whose reader is gone, as
    ``2>&1 | head -1`` once head has its line."""
    reader, writer = os.pipe()
    os.close(reader)
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "cli", *args],
            env=cli_env(settings, api_key),
            stdout=writer,
            stderr=writer,
        )
    finally:
        os.close(writer)


def kill(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGKILL)
    process.communicate()
