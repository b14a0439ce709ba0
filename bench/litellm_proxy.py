"""LiteLLM Proxy (no database) against the same mock provider, for figures beside ours.

It is installed into its own virtual environment (``bench/.litellm-venv``, or the one named
by ``LITELLM_VENV``) on first use, so it never touches queuegate's dependencies.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench.measure import Figure, latency_figures, post_load
from bench.stack import (
    cpu_seconds,
    free_port,
    peak_rss_mb,
    process_tree,
    wait_http,
    wait_ready,
)

VENV = Path(os.environ.get("LITELLM_VENV", Path(__file__).parent / ".litellm-venv"))
START_TIMEOUT = 300.0
"""Seconds LiteLLM Proxy has to answer its liveliness check."""
WORKER_HEALTHCHECK = 120
"""Seconds uvicorn lets a LiteLLM worker leave its health check unanswered."""
OWN_OVERHEAD = "x-litellm-overhead-duration-ms"
"""The response header in which LiteLLM Proxy reports its own time."""


def ensure_installed() -> Path:
    binary = VENV / "bin" / "litellm"
    if not binary.exists():
        print(f"installing litellm[proxy] into {VENV} (once; a few minutes)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        pip = [str(VENV / "bin" / "pip"), "install", "--quiet", "litellm[proxy]"]
        subprocess.run(pip, check=True)
    return binary


@dataclass(frozen=True)
class Proxy:
    """A running LiteLLM Proxy: where to send requests, and its processes."""

    url: str
    """Its OpenAI chat completions endpoint."""
    headers: dict[str, str] = field(repr=False)
    process: asyncio.subprocess.Process

    def pids(self) -> list[int]:
        """The proxy and its uvicorn workers (children once there is more than one)."""
        return process_tree(self.process.pid)


@asynccontextmanager
async def running_litellm(mock_url: str, *, workers: int) -> AsyncIterator[Proxy]:
    """LiteLLM Proxy (no database) with ``workers`` uvicorn workers, serving gpt-4o-mini from
    the mock provider at ``mock_url``; stopped on exit."""
    binary = ensure_installed()
    port = free_port()
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as config:
        config.write(
            "model_list:\n"
            "  - model_name: gpt-4o-mini\n"
            "    litellm_params:\n"
            "      model: openai/gpt-4o-mini\n"
            f"      api_base: {mock_url}/v1\n"
            "      api_key: bench-key\n"
            "litellm_settings:\n"
            "  telemetry: false\n"
        )
    master_key = f"sk-bench-{secrets.token_hex(16)}"
    env = {
        **os.environ,
        "LITELLM_LOG": "ERROR",
        "LITELLM_TELEMETRY": "False",
        "LITELLM_MASTER_KEY": master_key,
    }
    process = await asyncio.create_subprocess_exec(
        *(str(binary), "--config", config.name, "--port", str(port)),
        *("--num_workers", str(workers)),
        # uvicorn restarts a worker that misses its 5 s health check: on a loaded machine a
        # worker still importing LiteLLM misses it, and the workers restart without end.
        *("--timeout_worker_healthcheck", str(WORKER_HEALTHCHECK)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        await wait_ready(f"{base}/health/liveliness", START_TIMEOUT, process)
        auth = {"Authorization": f"Bearer {master_key}"}
        yield Proxy(f"{base}/v1/chat/completions", auth, process)
    finally:
        process.terminate()
        await process.wait()
        os.unlink(config.name)


async def litellm(*, jobs: int, workers: int = 1) -> list[Figure]:
    mock_port = free_port()
    mock = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "cli", "mock-provider", "--port", str(mock_port)),
        stdout=subprocess.DEVNULL,
    )
    figures = []
    try:
        mock_url = f"http://127.0.0.1:{mock_port}"
        await wait_http(mock_url)
        async with running_litellm(mock_url, workers=workers) as proxy:
            direct, through, auth = f"{mock_url}/v1/chat/completions", proxy.url, proxy.headers
            await post_load(through, 200, 16, auth)  # warm up
            for concurrency in (1, 64):
                mock_ms, _, _ = await post_load(direct, jobs, concurrency)
                pids = proxy.pids()
                cpu = sum(cpu_seconds(p) for p in pids)
                ms, elapsed, own = await post_load(through, jobs, concurrency, auth, OWN_OVERHEAD)
                cpu = sum(cpu_seconds(p) for p in proxy.pids()) - cpu
                figures.append(
                    Figure(
                        "litellm proxy",
                        f"{workers} worker{'s' if workers > 1 else ''}, c={concurrency}",
                        {
                            **latency_figures(ms),
                            "direct_p50_ms": latency_figures(mock_ms)["p50_ms"],
                            "own_overhead_p50_ms": latency_figures(own)["p50_ms"] if own else None,
                            "per_s": round(jobs / elapsed),
                            "cpu_s/1k proxy": round(cpu * 1000 / jobs, 3),
                            "peak_rss_mb": round(sum(peak_rss_mb(p) for p in pids)),
                        },
                    )
                )
    finally:
        mock.terminate()
        await mock.wait()
    return figures
