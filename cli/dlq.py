"""``queuegate dlq``: list, show, replay, drop and purge dead-lettered messages."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cli.console import LazyConsole, err
from queuegate.errors import ConfigError
from queuegate.runtime import run
from queuegate.settings import Settings
from queuegate.visible import clipped, echoed, visible

if TYPE_CHECKING:
    from rich.table import Table

    from queuegate.dlq import DeadLetter

dlq_app = typer.Typer(
    help="Inspect, replay, drop and purge dead-lettered messages.", no_args_is_help=True
)

out = LazyConsole()

SHOW_BODY_LIMIT = 4000
"""Characters of a body ``show`` prints; a long body would bury the reason."""

TeamFilter = Annotated[str | None, typer.Option("--team", help="Only the letters of this team.")]
ReasonFilter = Annotated[
    str | None,
    typer.Option("--reason", help="Only letters dead for this reason (expired, unauthorized…)."),
]


@dlq_app.command("list")
def dlq_list(
    limit: Annotated[int, typer.Option(min=1, help="Show at most this many, oldest first.")] = 100,
    team: TeamFilter = None,
    reason: ReasonFilter = None,
    wide: Annotated[bool, typer.Option("--wide", help="Also deaths, size and detail.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Every field, as JSON lines.")] = False,
) -> None:
    """The dead letters, with why each is there. Listing changes none of them."""
    from queuegate.dlq import peek

    letters, total = run(lambda: peek(Settings(), limit=limit, team=team, reason=reason))
    if as_json:
        for letter in letters:
            out.print_json(json.dumps(_as_dict(letter)), indent=None)
        return
    # --wide is for a wide terminal or a pipe: not squeezed into the default 80 columns.
    out.print(dead_letter_table(letters, total=total, wide=wide), width=160 if wide else None)


def dead_letter_table(letters: Sequence[DeadLetter], *, total: int, wide: bool) -> Table:
    """One row per letter; the job id whole (``dlq show`` and ``replay`` take it), the rest
    short enough for 80 columns unless ``wide``."""
    from rich import box

    from queuegate.tables import SafeTable

    table = SafeTable(title=f"dead letters: {len(letters):,} of {total:,}", box=box.SIMPLE_HEAD)
    longest = max((len(x.message_id or "-") for x in letters), default=6)
    table.add_column("job id", no_wrap=True, min_width=longest)
    table.add_column("reason", overflow="fold")
    table.add_column("from", overflow="fold")
    table.add_column("age", justify="right", no_wrap=True)
    if wide:
        table.add_column("deaths", justify="right")
        table.add_column("bytes", justify="right")
        table.add_column("detail", overflow="fold")
    now = datetime.now(UTC)
    for letter in letters:
        row = [
            letter.message_id or "-",
            letter.reason + (f" → {letter.then.split(':', 1)[0]}" if letter.then else ""),
            _origin(letter),
            _age(letter.at, now),
        ]
        if wide:
            row += [str(letter.deaths), f"{len(letter.body):,}", letter.detail[:200]]
        table.add_row(*row)
    if not letters:
        table.add_row("(none)", *[""] * (len(table.columns) - 1))
    return table


@dlq_app.command("show")
def dlq_show(
    job_id: Annotated[str, typer.Argument(help="The job id, or a prefix only it starts with.")],
    team: TeamFilter = None,
) -> None:
    """One dead letter: reason, origin, headers and body."""
    from rich.markup import escape

    from queuegate.dlq import find, kept_why, peek

    letters, _ = run(lambda: peek(Settings(), team=team))
    letter = find(letters, job_id)

    def shown(text: str) -> str:  # publishers choose these: written out, never markup
        return escape(visible(text))

    out.print(
        f"[bold]{shown(letter.message_id or '-')}[/]  reason: [red]{shown(letter.reason)}[/]",
        highlight=False,
    )
    if letter.detail:
        out.print(f"detail: {shown(letter.detail)}", highlight=False)
    if letter.then:
        out.print(f"replayed, then: {shown(letter.then)}", highlight=False)
    if (why := kept_why(letter)) is not None:
        out.print(f"not replayable: {shown(why)}", highlight=False)
    out.print(
        f"from queue: {shown(letter.queue or '(unknown: not replayable)')}  deaths: "
        f"{letter.deaths}  published by: {shown(letter.user_id or '-')}  reply_to: "
        f"{shown(letter.reply_to or '-')}",
        highlight=False,
    )
    out.print("headers:", json.dumps(dict(letter.headers), default=str, indent=2), markup=False)
    body = letter.body.decode(errors="replace")[:SHOW_BODY_LIMIT]
    size, kept = letter.truncated or len(letter.body), len(body.encode())
    out.print(f"body (first {kept:,} of {size:,} bytes):" if kept < size else "body:")
    out.print(visible(body), highlight=False, markup=False)


@dlq_app.command("replay")
def dlq_replay(
    job_ids: Annotated[list[str] | None, typer.Argument(help="Ids to replay.")] = None,
    replay_all: Annotated[bool, typer.Option("--all", help="Replay every dead letter.")] = False,
) -> None:
    """Send dead letters back to their queue, keeping their job id (nothing counts twice).

    Published as the operator (your broker user): workers accept it for the queue's team once
    they have proven the job's first publisher again. A letter answered with an error when it
    died (unknown_model, invalid_request, unauthorized, idempotency_conflict) stays: its
    request, submitted anew under a new job id, is what gets served.
    """
    from rich.progress import Progress

    from queuegate.dlq import replay

    if not job_ids and not replay_all:
        err.print("name the job ids to replay, or pass --all")
        raise typer.Exit(2)
    # Drawn on a terminal only: elsewhere its last frame is an empty line of stderr.
    with Progress(console=err.console, transient=True, disable=not err.is_terminal) as progress:
        task = progress.add_task("replaying", total=len(job_ids) if job_ids else None)
        done, refused = run(
            lambda: replay(
                Settings(),
                None if replay_all else set(job_ids or ()),
                on_replayed=lambda _: progress.advance(task),
            )
        )
    missing = set(job_ids or ()) - {x.message_id for x in done} - {x.message_id for x, _ in refused}
    if done or not missing:
        out.print(f"replayed {len(done):,} dead letters")
    for letter, why in refused:
        err.print(f"not replayed {echoed(letter.message_id or '-')}: {why}", markup=False)
    if missing and not replay_all:
        raise ConfigError(
            f"not among the dead letters: {', '.join(map(repr, map(clipped, sorted(missing))))}"
            ": list them with queuegate dlq list"
        )
    if refused:
        raise typer.Exit(1)


@dlq_app.command("drop")
def dlq_drop(
    job_id: Annotated[str, typer.Argument(help="The job id, whole (dlq list shows it).")],
    team: Annotated[
        str | None,
        typer.Option(help="The team whose letter it is: needed when teams share the id."),
    ] = None,
) -> None:
    """Delete one dead letter for good (copies of its job, under the same id, with it): one
    replay refuses, say, once its caller has sent the request anew. The others stay, in
    their order; an id no letter has is refused, nothing deleted, and so is one in several
    teams' queues (teams choose their own job ids) unless --team says whose.
    """
    from queuegate.dlq import drop

    dropped = run(lambda: drop(Settings(), job_id, team=team))
    for letter in dropped:
        out.print(
            f"dropped {echoed(letter.message_id or '-')} ({letter.reason}, from {_origin(letter)})",
            markup=False,
            highlight=False,
        )


@dlq_app.command("purge")
def dlq_purge(
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete every dead letter for good."""
    from queuegate.dlq import purge

    if not yes:
        typer.confirm("delete every dead letter for good?", abort=True)
    out.print(f"purged {run(lambda: purge(Settings())):,} dead letters")


def _origin(letter: DeadLetter) -> str:
    if letter.team is not None:
        return letter.team
    if letter.queue:
        return letter.queue.rsplit(".", 1)[-1]  # accounting
    return "?"


def _age(at: datetime | None, now: datetime) -> str:
    if at is None:
        return "-"
    seconds = (now - (at if at.tzinfo else at.replace(tzinfo=UTC))).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{max(0, int(seconds))}s"


def _as_dict(letter: DeadLetter) -> dict[str, Any]:
    return {
        "job_id": letter.message_id,
        "reason": letter.reason,
        "detail": letter.detail,
        "then": letter.then,
        "answered": letter.answered,
        "unanswered": letter.unanswered,
        "queue": letter.queue,
        "team": letter.team,
        "deaths": letter.deaths,
        "at": letter.at.isoformat() if letter.at else None,
        "bytes": letter.truncated or len(letter.body),
        "published_by": letter.user_id,
        "reply_to": letter.reply_to,
    }
