"""One job at a time through the HTTP front door (the openai SDK) and through the AMQP path
(GatewayClient), against the same worker and the mock at 0 ms, in the same run.

    .venv/bin/python -m bench.frontdoor [--jobs 300]

Rounds alternate the two paths, so both meet the same machine load; the front door runs as
its own process (``queuegate api``), like the worker and the mock.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import httpx
import openai
from openai.types.chat import ChatCompletionMessageParam

from bench.measure import CHAT_BODY, percentile
from bench.stack import TEAM, free_port, running_stack
from producer import GatewayClient
from queuegate.db import create_pool
from queuegate.registry import TeamConfig
from queuegate.tenancy import add_api_key

WARM_UP = 50
ROUND = 25


async def measure(jobs: int) -> dict[str, list[float]]:
    async with running_stack(workers=1, team=TeamConfig()) as stack:
        pool = await create_pool(stack.settings)
        try:
            _, key = await add_api_key(pool, TEAM)
        finally:
            await pool.close()
        port = free_port()
        await stack.spawn("frontdoor", "api", "--port", str(port), "--log-level", "warning")
        url = f"http://127.0.0.1:{port}"
        await _wait_ready(url)
        messages: list[ChatCompletionMessageParam] = [
            {"role": "user", "content": "Summarise the benefits of a message queue."}
        ]
        async with (
            GatewayClient(stack.settings, team=TEAM) as amqp,
            openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0) as sdk,
            httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}) as raw,
        ):

            async def via_sdk() -> None:
                await sdk.chat.completions.create(
                    model="gpt-4o-mini", messages=messages, max_tokens=16
                )

            async def via_httpx() -> None:
                response = await raw.post("/v1/chat/completions", json=CHAT_BODY)
                response.raise_for_status()

            async def via_amqp() -> None:
                result = await amqp.chat("gpt-4o-mini", [dict(m) for m in messages], max_tokens=16)
                if result.status != "ok":
                    raise RuntimeError(f"bench job failed: {result.error}")

            paths = {
                "http front door (openai SDK)": via_sdk,
                "http front door (httpx)": via_httpx,
                "amqp (GatewayClient)": via_amqp,
            }
            times: dict[str, list[float]] = {name: [] for name in paths}
            for call in paths.values():
                for _ in range(WARM_UP):
                    await call()
            while len(times["amqp (GatewayClient)"]) < jobs:
                for name, call in paths.items():
                    for _ in range(ROUND):
                        started = time.perf_counter()
                        await call()
                        times[name].append((time.perf_counter() - started) * 1000)
        return times


async def _wait_ready(url: str) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(200):
            try:
                if (await client.get(f"{url}/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)
    raise TimeoutError(f"the front door did not start at {url}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=300)
    args = parser.parse_args()
    times = asyncio.run(measure(args.jobs))
    print(f"{'path':32} {'jobs':>5} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}")
    for name, ms in times.items():
        print(
            f"{name:32} {len(ms):>5} {percentile(ms, 50):>8.2f} {percentile(ms, 90):>8.2f} "
            f"{percentile(ms, 99):>8.2f}"
        )


if __name__ == "__main__":
    main()
