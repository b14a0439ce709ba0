"""``queuegate replies``: a team's own reply and results queues."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.console import LazyConsole, err
from cli.options import ApiKey
from queuegate.runtime import run
from queuegate.settings import Settings

replies_app = typer.Typer(
    help="A team's own reply and results queues (each holds one of its slots).",
    no_args_is_help=True,
)
out = LazyConsole()


@replies_app.command("delete")
def delete(
    name: Annotated[
        str, typer.Argument(help="The queue's own name: a client's reply_queue=, e.g. nightly.")
    ],
    team: Annotated[str, typer.Option(help="The team whose queue it is (your credentials').")],
    transient: Annotated[
        bool,
        typer.Option(help="A client's own reply queue (replies.), not a named results queue."),
    ] = False,
    api_key: ApiKey = None,
) -> None:
    """Delete one of the team's reply queues, with any result unread, and free its slot."""
    from producer.reply_queues import delete_reply_queue

    dropped = run(
        lambda: delete_reply_queue(
            Settings(), name, team=team, durable=not transient, api_key=api_key
        )
    )
    if dropped is None:
        kind, hint = (
            ("reply queue", "name a client's own queue by its id, or leave out --transient")
            if transient
            else ("results queue", "name one opened with reply_queue=NAME, or add --transient")
        )
        err.print(
            f"team {team} has no {kind} named {name!r}, so nothing was deleted: {hint}",
            highlight=False,
        )
        raise typer.Exit(1)
    out.print(f"reply queue {name} of team {team} deleted ({dropped:,} unread results dropped)")
