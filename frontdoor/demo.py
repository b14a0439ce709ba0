"""The front door's part of ``queuegate demo``: one call through HTTP with the openai SDK, and
the dashboard's address with a key that signs in to it."""

from __future__ import annotations

import asyncpg
from rich.console import Console

from admin.keys import issue_admin_key
from queuegate.errors import GatewayError
from queuegate.tenancy import add_api_key


async def demo_http_call(pool: asyncpg.Pool, url: str, team: str, console: Console) -> None:
    """Issue ``team`` (registered) a key and ask the front door at ``url`` once with the
    ``openai`` SDK, as an app would."""
    try:
        import openai
    except ImportError as exc:
        raise GatewayError("the demo's HTTP call needs the openai SDK: pip install openai") from exc
    _, key = await add_api_key(pool, team)
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0) as client:
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


async def show_dashboard(pool: asyncpg.Pool, url: str, console: Console) -> None:
    """Issue an administrator key of the demo's own and print where to paste it."""
    admin = await issue_admin_key(pool, "demo")
    console.print(
        f"\n[bold]the dashboard:[/] {url}/dashboard\n"
        f"  sign in with this admin key (shown once, valid until the next demo):\n"
        f"  {admin.key}\n"
        "  the demo's gateway serves it until Ctrl-C",
        highlight=False,
    )
