"""API keys on the command line: ``queuegate admin-key``, and the tables and notice that
``teams add-key`` and ``teams keys`` share with it."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated

import typer

from cli.console import err, out
from cli.options import make_settings
from queuegate.errors import ConfigError
from queuegate.runtime import run
from queuegate.visible import clipped

if TYPE_CHECKING:
    from rich.table import Table

    from admin.keys import IssuedKey, KeyInfo

admin_key_app = typer.Typer(
    help="Keys for cross-team admin calls to the HTTP front door: issue, list, revoke.",
    no_args_is_help=True,
)


def show_key(what: str, issued: IssuedKey, revoke: str) -> None:
    """Print a new key, the only time it is ever shown."""
    out.print(f"{what} ({issued.key_id}): {issued.key}", highlight=False, soft_wrap=True)
    err.print(f"[yellow]shown once: queuegate keeps no copy; revoke it with {revoke}[/]")


def keys_table(keys: Sequence[KeyInfo], *, title: str, labels: bool = False) -> Table:
    from queuegate.tables import add_text_column, compact_table, fit

    table = compact_table(title)
    for header in ("key id", *(["label"] if labels else []), "created (UTC)", "revoked (UTC)"):
        add_text_column(table, header)
    for key in keys:
        table.add_row(
            key.key_id,
            *([key.label or "-"] if labels else []),
            _when(key.created_at),
            "-" if key.revoked_at is None else _when(key.revoked_at),
        )
    if not keys:
        table.add_row("(none)", *[""] * (len(table.columns) - 1))
    return fit(table)


def _when(moment: datetime) -> str:
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M:%S}"


@admin_key_app.command("issue")
def admin_key_issue(
    label: Annotated[str, typer.Option(help="Who or what holds it, for list and revoke.")] = "",
) -> None:
    """A new admin key, allowed every team's admin calls; shown once, stored hashed."""
    from admin.keys import issue_admin_key
    from queuegate.db import create_pool

    settings = make_settings()

    async def go() -> IssuedKey:
        async with await create_pool(settings) as pool:
            return await issue_admin_key(pool, label)

    issued = run(go)
    show_key("admin key", issued, f"queuegate admin-key revoke {issued.key_id}")


@admin_key_app.command("list")
def admin_key_list() -> None:
    """Every admin key, live and revoked (never the keys themselves)."""
    from admin.keys import admin_keys
    from queuegate.db import create_pool

    settings = make_settings()

    async def go() -> list[KeyInfo]:
        async with await create_pool(settings) as pool:
            return await admin_keys(pool)

    out.print(keys_table(run(go), title="admin keys", labels=True))


@admin_key_app.command("revoke")
def admin_key_revoke(key_id: str) -> None:
    """Revoke an admin key at once."""
    from admin.keys import revoke_admin_key
    from queuegate.db import create_pool

    settings = make_settings()

    async def go() -> bool:
        async with await create_pool(settings) as pool:
            return await revoke_admin_key(pool, key_id)

    if not run(go):
        raise ConfigError(
            f"no live admin key {clipped(key_id)}: nothing revoked; the keys are listed by "
            "queuegate admin-key list"
        )
    out.print(f"admin key {key_id} is revoked")
