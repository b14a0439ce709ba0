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
from pathlib import Path

import httpx

from bench.measure import Figure, latency_figures, post_load
from bench.stack import cpu_seconds, free_port, peak_rss_mb

VENV = Path(os.environ.get("LITELLM_VENV", Path(__file__).parent / ".litellm-venv"))
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


def _tree(pid: int) -> list[int]:
    """The process and its descendants (LiteLLM's uvicorn workers are children)."""
    pids, frontier = [pid], [pid]
    while frontier:
        parent = frontier.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue
        pids += [int(c) for c in children]
        frontier += [int(c) for c in children]
    return pids


async def litellm(*, jobs: int, workers: int = 1) -> list[Figure]:
    binary = ensure_installed()
    mock_port, proxy_port = free_port(), free_port()
    mock = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "cli", "mock-provider", "--port", str(mock_port)),
        stdout=subprocess.DEVNULL,
    )
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as config:
        config.write(
            "model_list:\n"
            "  - model_name: gpt-4o-mini\n"
            "    litellm_params:\n"
            "      model: openai/gpt-4o-mini\n"
            f"      api_base: http://127.0.0.1:{mock_port}/v1\n"
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
    auth = {"Authorization": f"Bearer {master_key}"}
    proxy = await asyncio.create_subprocess_exec(
        *(str(binary), "--config", config.name, "--port", str(proxy_port)),
        *("--num_workers", str(workers)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    figures = []
    try:
        base = f"http://127.0.0.1:{proxy_port}"
        await _wait(f"{base}/health/liveliness", proxy)
        direct = f"http://127.0.0.1:{mock_port}/v1/chat/completions"
        through = f"{base}/v1/chat/completions"
        await post_load(through, 200, 16, auth)  # warm up
        for concurrency in (1, 64):
            mock_ms, _, _ = await post_load(direct, jobs, concurrency)
            pids = _tree(proxy.pid)
            cpu = sum(cpu_seconds(p) for p in pids)
            ms, elapsed, own = await post_load(through, jobs, concurrency, auth, OWN_OVERHEAD)
            cpu = sum(cpu_seconds(p) for p in _tree(proxy.pid)) - cpu
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
        for process in (proxy, mock):
            process.terminate()
            await process.wait()
        os.unlink(config.name)
    return figures


async def _wait(url: str, process: asyncio.subprocess.Process) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(3000):
            if process.returncode is not None:
                raise RuntimeError("LiteLLM Proxy exited during start-up")
            try:
                if (await client.get(url)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError("LiteLLM Proxy did not start within 300 s")
