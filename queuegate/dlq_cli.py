"""``queuegate dlq``: list, show, replay and purge dead-lettered messages."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import Progress

from queuegate.runtime import run
from queuegate.settings import Settings

dlq_app = typer.Typer(
    help="Inspect, replay and purge dead-lettered messages.", no_args_is_help=True
)

out = Console()
err = Console(stderr=True)

SHOW_BODY_LIMIT = 4000
"""Characters of a body ``show`` prints; a 10 MB body would bury the reason."""


@dlq_app.command("list")
def dlq_list(
    limit: Annotated[int, typer.Option(help="Show at most this many, oldest first.")] = 100,
) -> None:
    """The dead letters, with why each is there."""
    from queuegate.dlq import peek
    from queuegate.tables import dead_letter_table

    letters, total = run(lambda: peek(Settings(), limit=limit))
    out.print(dead_letter_table(letters, total=total))


@dlq_app.command("show")
def dlq_show(job_id: Annotated[str, typer.Argument(help="The message (job) id.")]) -> None:
    """One dead letter: reason, headers and body."""
    from queuegate.dlq import peek

    letters, _ = run(lambda: peek(Settings()))
    letter = next((x for x in letters if x.message_id == job_id), None)
    if letter is None:
        err.print(f"no dead letter with id {job_id}: list them with queuegate dlq list")
        raise typer.Exit(1)
    out.print(f"[bold]{letter.message_id}[/]  reason: [red]{letter.reason}[/]", highlight=False)
    out.print(f"from queue: {letter.queue}  deaths: {letter.deaths}  reply_to: {letter.reply_to}")
    if letter.detail:
        out.print(f"detail: {letter.detail}", highlight=False)
    out.print("headers:", json.dumps(dict(letter.headers), default=str, indent=2))
    text = letter.body.decode(errors="replace")
    cut = (
        f" (first {SHOW_BODY_LIMIT:,} of {len(text):,} characters)"
        if len(text) > SHOW_BODY_LIMIT
        else ""
    )
    out.print(f"body{cut}:")
    out.print(text[:SHOW_BODY_LIMIT], highlight=False, markup=False)


@dlq_app.command("replay")
def dlq_replay(
    job_ids: Annotated[list[str] | None, typer.Argument(help="Ids to replay.")] = None,
    replay_all: Annotated[bool, typer.Option("--all", help="Replay every dead letter.")] = False,
) -> None:
    """Send dead letters back to their queue, keeping their job id (nothing counts twice)."""
    from queuegate.dlq import replay

    if not job_ids and not replay_all:
        err.print("name the job ids to replay, or pass --all")
        raise typer.Exit(2)
    with Progress(console=err, transient=True) as progress:
        task = progress.add_task("replaying", total=len(job_ids) if job_ids else None)
        done = run(
            lambda: replay(
                Settings(),
                None if replay_all else set(job_ids or ()),
                on_replayed=lambda _: progress.advance(task),
            )
        )
    out.print(f"replayed {len(done):,} dead letters")
    missing = set(job_ids or ()) - {x.message_id for x in done}
    if missing and not replay_all:
        err.print(f"not in the dead-letter queue: {', '.join(sorted(missing))}")
        raise typer.Exit(1)


@dlq_app.command("purge")
def dlq_purge(
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete every dead letter for good."""
    from queuegate.dlq import purge

    if not yes:
        typer.confirm("delete every dead letter for good?", abort=True)
    out.print(f"purged {run(lambda: purge(Settings())):,} dead letters")
