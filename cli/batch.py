"""``queuegate batch``: submit batch files, collect their results, follow and cancel them."""

from __future__ import annotations

import os
import re
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cli.console import LazyConsole
from cli.options import ApiKey
from queuegate.errors import BatchError, BatchInvalid, NotText
from queuegate.json_lines import json_line
from queuegate.numbers import usd_text
from queuegate.runtime import run
from queuegate.settings import Settings
from queuegate.visible import clipped, clipped_path

batch_app = typer.Typer(
    help="Run OpenAI- or Anthropic-format batch files through the queue, resumably.",
    no_args_is_help=True,
)
out = LazyConsole()
err = LazyConsole(stderr=True)

if TYPE_CHECKING:
    from rich.table import Table

    from queuegate.messages import ErrorInfo
    from router import Catalog

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
PROBLEMS_SHOWN = 20
"""Problems printed; with --skip-invalid all of them also go to a file."""

Team = Annotated[str, typer.Option(help="The team the batch runs for (your credentials').")]


def parse_duration(text: str) -> timedelta:
    """``90s``, ``30m``, ``24h``, ``2d``."""
    match = _DURATION.match(text)
    if not match:
        raise typer.BadParameter(f"{clipped(text)!r} is not a duration: use e.g. 30m, 24h or 2d")
    try:
        window = timedelta(seconds=float(match[1]) * _UNITS[match[2]])
    except OverflowError:
        window = timedelta.max
    # A batch already past its deadline would publish nothing and fail every line.
    if not timedelta(0) < window < timedelta.max:
        raise typer.BadParameter(
            f"{clipped(text)!r}: give the batch some time, e.g. 30m, 24h or 2d"
        )
    return window


@batch_app.command("submit")
def submit(
    file: Annotated[Path, typer.Argument(help="OpenAI or Anthropic batch file (JSONL).")],
    team: Team,
    model: Annotated[
        str | None, typer.Option(help="A catalog alias for every request, over the file's.")
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="The batch's name; the file's by default.")
    ] = None,
    skip_invalid: Annotated[
        bool, typer.Option("--skip-invalid", help="Publish the valid requests, skip the rest.")
    ] = False,
    deadline: Annotated[str, typer.Option(help="Time the batch has, e.g. 24h or 90m.")] = "24h",
    skipped: Annotated[
        Path | None,
        typer.Option(help="Invalid lines (number, reason) go here; <batch>.skipped.jsonl."),
    ] = None,
    api_key: ApiKey = None,
) -> None:
    """Validate a batch file and publish its requests; re-run it to resume.

    Each request is checked as the front door's endpoint of its API checks a body: one it
    refuses is never published, named here, and answered a failed line by collect."""
    from producer.batch import submit_batch
    from producer.batch.checks import batch_checks
    from producer.batch.jobs import check_batch_name, default_name
    from queuegate.progress import progress
    from queuegate.request_limits import Limits
    from router import load_catalog

    settings = Settings()
    window = parse_duration(deadline)
    # Checked before anything is published: a failure later would lose the skipped list.
    batch = check_batch_name(default_name(file) if name is None else name)
    target = skipped or Path(f"{batch}.skipped.jsonl")
    check_writable(target, "--skipped")
    catalog = load_catalog(settings.catalog, os.environ)
    aliases = set(catalog.models)
    try:
        with progress(err.console, "published") as update:
            report = run(
                lambda: submit_batch(
                    settings,
                    file,
                    team=team,
                    name=name,
                    model=model,
                    skip_invalid=skip_invalid,
                    deadline=window,
                    models=aliases,
                    anthropic_models=anthropic_only(catalog),
                    checks=batch_checks(Limits.of(settings, catalog)),
                    api_key=api_key,
                    on_progress=update,
                )
            )
    except NotText:
        raise  # its one line says where
    except BatchInvalid as exc:
        _print_problems(file, sorted(exc.problems + _reasons(exc.refused)))
        raise
    _print_problems(file, sorted(report.skipped + _reasons(report.refused)))
    if report.skipped:
        target.write_bytes(
            b"".join(
                json_line({"line": number, "reason": reason}) for number, reason in report.skipped
            )
        )
        err.print(
            f"the {len(report.skipped):,} skipped lines are listed in {target}",
            highlight=False,
            markup=False,
            soft_wrap=True,  # the path whole, for a copy or a script
        )
    line = (
        f"batch {report.name}: {report.total:,} requests, {report.published:,} published now, "
        f"{report.already:,} before"
    )
    if report.skipped:
        line += f", {len(report.skipped):,} invalid skipped"
    if report.refused:
        line += f", {len(report.refused):,} refused (collect answers them failed)"
    if report.stopped:
        line += f"; stopped: {report.stopped}"
    out.print(line, highlight=False)
    out.print(
        f"collect with: queuegate batch collect {report.name} --team {team} "
        f"--out {report.name}.results.jsonl"
    )


def check_writable(path: Path, option: str) -> None:
    """Refuse, in one line, a path that cannot be written: before anything is published or
    consumed, so nothing is lost to it."""
    from producer.batch.files import reason

    parent = path.parent if str(path.parent) else Path(".")
    try:
        if path.is_dir() or not parent.is_dir():
            problem = (
                "is a directory" if path.is_dir() else f"has no directory {clipped_path(parent)}"
            )
        elif not os.access(path if path.exists() else parent, os.W_OK):
            problem = "is not writable"
        else:
            return
    except OSError as exc:  # a path too long to look at
        problem = f"cannot be written ({reason(exc)})"
    raise BatchError(f"{option} {clipped_path(path)} {problem}: pick another path")


def anthropic_only(catalog: Catalog) -> set[str]:
    """Aliases whose deployments, and their fallbacks', are all Anthropic's."""

    def chain(alias: str, seen: set[str]) -> set[str]:
        entry = catalog.models.get(alias)
        if entry is None or alias in seen:
            return set()
        seen.add(alias)
        kinds: set[str] = {d.provider for d in entry.deployments}
        for other in (*entry.fallbacks, *entry.context_fallbacks, *entry.content_policy_fallbacks):
            kinds |= chain(other, seen)
        return kinds

    return {alias for alias in catalog.models if chain(alias, set()) == {"anthropic"}}


def _reasons(refused: list[tuple[int, ErrorInfo]]) -> list[tuple[int, str]]:
    return [(number, error.message) for number, error in refused]


def _print_problems(file: Path, problems: list[tuple[int, str]]) -> None:
    for number, reason in problems[:PROBLEMS_SHOWN]:
        err.print(f"{file}:{number}: {reason}", highlight=False, markup=False, soft_wrap=True)
    if len(problems) > PROBLEMS_SHOWN:
        err.print(f"... and {len(problems) - PROBLEMS_SHOWN:,} more", highlight=False)


@batch_app.command("collect")
def collect(
    name: Annotated[str, typer.Argument(help="The batch's name.")],
    team: Team,
    out_file: Annotated[Path, typer.Option("--out", help="Results file (appended to).")],
    errors: Annotated[
        Path | None, typer.Option(help="Failed requests here instead of in --out.")
    ] = None,
    file: Annotated[
        Path | None,
        typer.Option(
            "--file",
            exists=True,
            dir_okay=False,
            help="The file the batch was submitted from, if moved: results its full queue "
            "refused are asked for again with it, and the requests submit refused answered.",
        ),
    ] = None,
    api_key: ApiKey = None,
) -> None:
    """Write a batch's results as they arrive, in its own format; re-run it to resume."""
    from producer.batch import collect as collect_batch
    from producer.batch.checks import batch_checks
    from queuegate.progress import progress
    from queuegate.request_limits import Limits
    from router import load_catalog

    settings = Settings()
    # The requests submit refused are answered with the reasons of the same checks.
    checks = batch_checks(Limits.of(settings, load_catalog(settings.catalog, os.environ)))
    with progress(err.console, "collected") as update:
        report = run(
            lambda: collect_batch(
                settings,
                name,
                out_file,
                errors,
                team=team,
                api_key=api_key,
                on_progress=update,
                source=file,
                checks=checks,
            )
        )
    c = report.counts
    refused = f", {report.refused:,} refused at submit" if report.refused else ""
    out.print(
        f"batch {name}: {c.done:,} done, {c.failed:,} failed, {c.expired:,} expired, "
        f"{c.canceled:,} canceled{refused}; {report.written:,} lines written now; "
        f"${usd_text(c.spend_usd)}",
        highlight=False,
    )


@batch_app.command("status")
def status(
    name: Annotated[str, typer.Argument(help="The batch's name.")],
    team: Team,
    api_key: ApiKey = None,
) -> None:
    """Counts, spend, rate and ETA of a batch."""
    from producer.batch import batch_status

    report = run(lambda: batch_status(Settings(), name, team=team, api_key=api_key))
    out.print(_status_table(report))


@batch_app.command("cancel")
def cancel(
    name: Annotated[str, typer.Argument(help="The batch's name.")],
    team: Team,
    api_key: ApiKey = None,
) -> None:
    """Answer the batch's requests not served yet 'canceled', without calling a provider."""
    from producer.batch import cancel_batch

    report = run(lambda: cancel_batch(Settings(), name, team=team, api_key=api_key))
    out.print(_status_table(report))
    out.print(f"batch {name} is canceled; collect writes what was served and the rest canceled")


@batch_app.command("list")
def list_(team: Team, api_key: ApiKey = None) -> None:
    """The team's batches the gateway still keeps (collected ones are gone)."""
    from rich.table import Table

    from producer.batch import batch_list

    batches = run(lambda: batch_list(Settings(), team=team, api_key=api_key))
    table = Table(title=f"batches of team {team}")
    numbers = ("collected", "answered", "total")
    for column in ("name", "format", *numbers, "state", "deadline (UTC)"):
        table.add_column(column, justify="right" if column in numbers else "left")
    for b in batches:
        table.add_row(
            b.name,
            b.format,
            f"{b.written:,}",
            f"{b.written + b.waiting:,}",
            f"{b.total:,}",
            b.state,
            f"{b.deadline:%m-%d %H:%M}",
        )
    out.print(table if batches else f"team {team} has no batch")


@batch_app.command("delete")
def delete(
    name: Annotated[str, typer.Argument(help="The batch's name.")],
    team: Team,
    api_key: ApiKey = None,
) -> None:
    """Forget a batch and drop its results queue, with any result not collected; one with
    requests not answered yet is refused: cancel it first."""
    from producer.batch import delete_batch

    run(lambda: delete_batch(Settings(), name, team=team, api_key=api_key))
    out.print(f"batch {name} deleted")


def _status_table(status: object) -> Table:
    from rich.table import Table

    from producer.batch import BatchStatus

    assert isinstance(status, BatchStatus)
    c = status.counts
    table = Table(title=f"batch {status.name} ({status.format}, team {status.team})")
    table.add_column("")
    table.add_column("", justify="right")
    rows = [
        ("total", f"{c.total:,}"),
        ("published", f"{c.published:,}"),
        ("not published", f"{c.total - c.published:,}"),
        ("queued", f"{status.queued:,}"),
        ("answered, to collect", f"{status.waiting:,}"),
        # The rest is counted as lines are collected: the gateway sums nothing before.
        ("collected: done", f"{c.done:,}"),
        ("collected: failed", f"{c.failed:,}"),
        ("collected: expired", f"{c.expired:,}"),
        ("collected: canceled", f"{c.canceled:,}"),
        ("collected spend (USD)", usd_text(c.spend_usd)),
        ("collect rate", f"{status.rate:,.1f}/s" if status.rate else "-"),
        ("collect ETA", f"{status.eta_s:,.0f} s" if status.eta_s is not None else "-"),
        ("deadline", f"{status.deadline:%Y-%m-%d %H:%M:%S} UTC"),
    ]
    if c.canceled_flag:
        rows.append(("state", "canceled"))
    for label, value in rows:
        table.add_row(label, value)
    table.show_header = False
    return table
