"""``queuegate audit``: retention of captured prompts and responses."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.console import out
from cli.options import make_settings
from queuegate.runtime import run

audit_app = typer.Typer(help="Captured prompts and responses: retention.", no_args_is_help=True)


@audit_app.command("prune")
def audit_prune(
    older_than: Annotated[str, typer.Option(help="Age like 90d, 12h or 30m.")] = "90d",
) -> None:
    """Delete captured prompts and responses older than the given age (usage rows stay)."""
    from accounting.audit import parse_age, prune_content
    from queuegate.db import create_pool

    age = parse_age(older_than)
    settings = make_settings()

    async def go() -> int:
        pool = await create_pool(settings)
        try:
            return await prune_content(pool, age)
        finally:
            await pool.close()

    out.print(f"deleted {run(go):,} captured jobs older than {older_than}")
