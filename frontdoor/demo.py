"""The front door's part of ``queuegate demo``: one call through HTTP with the openai SDK."""

from __future__ import annotations

from rich.console import Console

from frontdoor.serve import serving
from queuegate.db import create_pool
from queuegate.errors import GatewayError
from queuegate.registry import add_team
from queuegate.settings import Settings
from queuegate.tenancy import add_api_key
from router import Catalog


async def demo_http_call(settings: Settings, catalog: Catalog, team: str, console: Console) -> None:
    """Issue ``team`` a key, serve the front door on a free port, and ask it once with the
    ``openai`` SDK, as an app would."""
    try:
        import openai
    except ImportError as exc:
        raise GatewayError("the demo's HTTP call needs the openai SDK: pip install openai") from exc
    pool = await create_pool(settings)
    try:
        await add_team(pool, team)
        _, key = await add_api_key(pool, team)
    finally:
        await pool.close()
    async with (
        serving(settings, catalog) as url,
        openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0) as client,
    ):
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "Why put an HTTP front door on a queue?"}],
            max_tokens=64,
        )
    answer = raw.parse()
    console.print(f"\nthrough the HTTP front door at {url}/v1, with the openai SDK:")
    console.print(
        f"  [bold]{answer.model}[/] for {team}: {answer.choices[0].message.content}\n"
        f"  job {raw.headers['x-queuegate-job-id']}, "
        f"{float(raw.headers['x-queuegate-latency-ms']):.1f} ms, "
        f"{raw.headers['x-queuegate-cost-usd']} USD",
        highlight=False,
    )
