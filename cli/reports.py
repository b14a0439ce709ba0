"""Reports: usage from PostgreSQL, live status, and the deployments' health."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cli.console import err, out, print_table
from cli.options import OnlyTeam, finite, make_settings, one, parse_month, split_teams
from queuegate.errors import ServiceUnavailable, UnknownTeam
from queuegate.messages import JobStatus
from queuegate.runtime import run, stop_on_signals, until_set
from queuegate.settings import Settings
from queuegate.visible import clipped, echoed, visible

if TYPE_CHECKING:  # the commands that read PostgreSQL import its client when they run
    import asyncpg

    from admin.status import Registered
    from queuegate.status import Status


def usage(
    month: Annotated[str | None, typer.Option(help="YYYY-MM; this month when unset.")] = None,
    by: Annotated[str, typer.Option(help="Group by team, or by team and model.")] = "team",
    daily: Annotated[
        bool, typer.Option("--daily", help="A day-by-day trend instead of the month.")
    ] = False,
    days: Annotated[int, typer.Option(min=1, max=366, help="Days in the --daily trend.")] = 30,
    team: OnlyTeam = None,
    model: Annotated[str | None, typer.Option(help="Only this requested model alias.")] = None,
    status: Annotated[
        JobStatus | None, typer.Option(help="Only jobs that ended so: ok or error.")
    ] = None,
    top: Annotated[int | None, typer.Option(min=1, help="Only the N most expensive.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of a table.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="CSV instead of a table.")] = False,
    wide: Annotated[
        bool, typer.Option("--wide", help="Every column (errors, tokens in and out, budget).")
    ] = False,
) -> None:
    """Requests, tokens, cost and budget remaining per team and month, from PostgreSQL."""
    from admin.usage import UsageFilter, month_end, usage_rows
    from queuegate.db import create_pool
    from queuegate.reporting import records, table, to_csv, to_json

    if as_json and as_csv:
        raise typer.BadParameter("choose one of --json and --csv")
    if by not in ("team", "model"):
        raise typer.BadParameter(f"--by {clipped(by)!r}: use team or model")
    day = parse_month(month)
    settings = make_settings()
    last = datetime.now(UTC).date() if month is None else month_end(day)
    chosen = one(team)

    async def go() -> list[Any]:
        async with await create_pool(settings) as pool:
            return await usage_rows(
                pool,
                "day" if daily else "model" if by == "model" else "team",
                month=day,
                last_day=last,
                days=days,
                where=UsageFilter(chosen, model, status),
                top=top,
            )

    rows = records(run(go))
    if as_json:
        sys.stdout.write(to_json(rows))
    elif as_csv:
        sys.stdout.write(to_csv(rows))
    elif not rows:
        when = f"{day:%Y-%m}"
        if daily:
            when = f"the {days} days to {'today' if month is None else last}"
        kept = _kept(chosen, model, status, " for ")
        out.print(f"no usage in {when}{kept}", highlight=False, markup=False)
    else:
        what = f"daily usage, {days} days" if daily else f"usage by {by} in {day:%Y-%m}"
        what += _kept(chosen, model, status, ", ")
        print_table(table(rows, title=what, wide=wide), wide=wide)


def _kept(team: str | None, model: str | None, status: str | None, lead: str) -> str:
    """What the filters keep, for a title: ``, team alpha, model gpt-4o, error jobs``."""
    kept = [f"team {team}"] if team else []
    kept += [f"model {echoed(model)}"] if model else []  # any text: no alias is checked
    kept += [f"{status} jobs"] if status else []
    return lead + ", ".join(kept) if kept else ""


STALE_EXIT = 3
"""Exit status of a stale status: printed with figures missing (PostgreSQL's budgets) or
with no worker reporting, the reason on stderr: a script reads the figures it has, and knows
they are not all there."""


def status(
    teams: Annotated[
        str | None,
        typer.Option(help="Comma-separated teams; the registry's enabled teams if unset."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of tables.")] = False,
    watch: Annotated[
        bool,
        typer.Option(
            "--watch",
            help="Refresh in place until Ctrl-C (into a pipe or file, each refresh whole after "
            "the last); with --json, one JSON line each.",
        ),
    ] = False,
    interval: Annotated[
        float, typer.Option(min=0.2, callback=finite, help="Seconds between refreshes.")
    ] = 2.0,
    wide: Annotated[
        bool, typer.Option("--wide", help="Also errors per second and the p50 wait.")
    ] = False,
) -> None:
    """Queue depth, in-flight jobs, rates, waits and spend per team; breakers and 429 pauses of
    every deployment of the catalog.

    Reads the broker, Redis and the registry in PostgreSQL: every enabled team is listed with
    its queue depth, whether or not a worker serves it (and every disabled team whose queue
    still holds jobs, marked disabled), its spend never less than the month's
    in usage_log (Redis may have lost its own count). With PostgreSQL unreachable the rest
    is printed, budgets "unknown", the reason on stderr, and the exit status is 3, as when no
    worker reports; --watch marks itself stale with the reason and goes on refreshing
    (--watch --json: "stale": true, the "reason" and "stale_since" in each line).
    """
    from rich.markup import escape

    from queuegate.reporting import status_view, to_json
    from queuegate.status import StatusReader, status_record
    from router import load_catalog

    settings = make_settings()
    wanted = split_teams(teams)
    listed = load_catalog(settings.catalog, os.environ).deployment_names

    async def read(reader: StatusReader, registry: _Registry) -> Status:
        found = await registry.read()
        shown = wanted if wanted is not None else found.teams
        current = await reader.read(
            shown,
            found.budgets,
            listed,
            stale=found.unread,
            accounted=found.accounted,
            disabled=[team for team in found.disabled if wanted is None or team in wanted],
        )
        # A team named that the registry does not list may be a mistyped name: said as every
        # report says it, not shown as an idle team's row, whether or not it has queues (a
        # worker of an earlier version declared those of any name it was given). Not looked
        # up while the registry cannot be read: each look would wait out the outage again.
        named, known = set(wanted or ()), {*(found.teams or ()), *found.disabled}
        if found.unread is None:
            await registry.check_known(
                [t.team for t in current.teams if t.team in named and t.team not in known]
            )
        invalid = [team for team in found.invalid if wanted is None or team in wanted]
        return dataclasses.replace(current, invalid_teams=invalid)

    async def once() -> Status:
        async with StatusReader(settings) as reader, _Registry(settings) as registry:
            return await read(reader, registry)

    async def forever() -> None:
        stop = stop_on_signals()
        async with StatusReader(settings) as reader, _Registry(settings) as registry:
            with _refreshes(as_json=as_json, wide=wide) as show:
                last: Status | None = None
                since: datetime | None = None
                while not stop.is_set():
                    # An outage marks the last figures stale and the next refresh tries
                    # again, as the dashboard's Live page does: a watch outlives it.
                    try:
                        last = await read(reader, registry)
                        reason = last.reason
                    except ServiceUnavailable as exc:
                        reason = str(exc)
                    since = None if reason is None else since or datetime.now(UTC)
                    show(last, reason, since)
                    await until_set(interval, stop)

    if watch:
        run(forever)
        return
    current = run(once)
    if as_json:
        sys.stdout.write(to_json(status_record(current)))
    else:
        print_table(status_view(current, wide=wide), wide=wide)
    if current.invalid_teams:
        err.print(
            f"[yellow]not served:[/] {escape(', '.join(current.invalid_teams))}: their registry "
            "rows are invalid; queuegate teams show NAME says what to correct",
            highlight=False,
        )
    if current.reason is not None:
        err.print(f"[yellow]stale:[/] {escape(visible(current.reason))}", highlight=False)
        raise typer.Exit(STALE_EXIT)


@contextlib.contextmanager
def _refreshes(
    *, as_json: bool, wide: bool
) -> Iterator[Callable[[Status | None, str | None, datetime | None], None]]:
    """How each refresh of ``status --watch`` is shown: the tables redrawn in place on a
    terminal, else printed whole one after another (rich's Live, off a terminal, prints its
    last frame only as it ends: a pipe got nothing, and never closed it); or with --json one
    document a line, flushed (a pipe to jq would see none until the end)."""
    from queuegate.reporting import to_json, watch_view
    from queuegate.status import watch_record

    if as_json:

        def line(last: Status | None, reason: str | None, since: datetime | None) -> None:
            sys.stdout.write(to_json(watch_record(last, reason, since)))
            sys.stdout.flush()

        yield line
        return
    if not out.console.is_terminal:
        yield lambda *seen: print_table(watch_view(*seen, wide=wide), wide=wide)
        return
    from rich.live import Live

    with Live(console=out.console) as live:
        yield lambda *seen: live.update(watch_view(*seen, wide=wide))


LET_GO = 1.0
"""Seconds past its own wait that a registry read is given to let go of its connection."""


class _Registry:
    """The registry's enabled teams and budgets (admin.status), or none and why when
    PostgreSQL cannot be read: the budgets are then unknown, which status must not show as
    "no budget". One pool serves every refresh of a watch (asyncpg's pool reconnects after an
    outage); opened on the first read that finds PostgreSQL, so a watch started during an
    outage still finds it later."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._pool: asyncpg.Pool | None = None

    async def __aenter__(self) -> _Registry:
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._pool is not None:
            await self._pool.close()

    async def read(self) -> Registered:
        from admin.status import REGISTRY_WAIT, UNREADABLE, Registered, registered, unreadable
        from queuegate.db import create_pool

        if self._pool is None:
            try:
                async with asyncio.timeout(REGISTRY_WAIT):
                    self._pool = await create_pool(self._settings, max_size=1)
            except UNREADABLE as exc:
                return Registered(unread=unreadable(self._settings, exc))
        pool = self._pool
        reading = asyncio.ensure_future(registered(pool, self._settings))
        await asyncio.wait([reading], timeout=REGISTRY_WAIT + LET_GO)
        if reading.done():
            return reading.result()
        # Its read timed out, but the connection it cut is released only once the server
        # answers: a PostgreSQL that hung mid-watch held every refresh until it came back.
        # Dropped instead; the next refresh opens a new pool.
        self._pool = None
        pool.terminate()
        return Registered(unread=unreadable(self._settings, TimeoutError()))

    async def check_known(self, teams: list[str]) -> None:
        """UnknownTeam for the first of ``teams`` the registry does not hold; nothing when it
        cannot be read (the status then says why its budgets are unknown)."""
        import asyncpg

        from admin.filters import known_team
        from admin.status import REGISTRY_WAIT
        from queuegate.db import UNREACHABLE

        if self._pool is None or not teams:
            return
        try:
            async with asyncio.timeout(REGISTRY_WAIT):
                for team in teams:
                    await known_team(self._pool, team)
        except asyncpg.UndefinedTableError:  # not migrated yet: no team is registered
            raise UnknownTeam(teams[0]) from None
        except UNREACHABLE:  # TimeoutError included: the row is shown, as it cannot be told
            return


def deployments(
    catalog: Annotated[Path | None, typer.Option(help="Model catalog YAML.")] = None,
    wide: Annotated[
        bool, typer.Option("--wide", help="Also each deployment's provider and model.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of a table.")] = False,
) -> None:
    """Circuit breaker and 429 pause of every deployment, as every worker sees them."""
    from redis.exceptions import RedisError

    from queuegate.deployment_health import read_health
    from queuegate.errors import ServiceUnavailable
    from queuegate.keys import Keys
    from queuegate.redis_client import redis_for, redis_unreachable
    from queuegate.reporting import to_json
    from queuegate.services import REDIS_CHECK_WAIT
    from router import load_catalog
    from router.tables import deployments_table

    settings = make_settings(catalog=catalog)
    cat = load_catalog(settings.catalog, os.environ)

    async def go() -> Any:
        client = redis_for(settings)
        try:
            # The same reader as `queuegate status` and the dashboard's Live page.
            async with asyncio.timeout(REDIS_CHECK_WAIT):
                health = await read_health(
                    client, Keys(settings.redis_prefix), cat.deployment_names
                )
            return [
                (alias, deployment, health[deployment.name])
                for alias, entry in cat.models.items()
                for deployment in entry.deployments
            ]
        # TimeoutError, the wait passed, is an OSError.
        except (RedisError, OSError) as exc:
            raise ServiceUnavailable(redis_unreachable(settings, cause=exc)) from exc
        finally:
            await client.aclose()

    rows = run(go)
    if as_json:
        sys.stdout.write(
            to_json(
                [
                    {
                        "alias": alias,
                        "deployment": deployment.name,
                        "provider": deployment.provider,
                        "model": deployment.model,
                        **dataclasses.asdict(health),
                    }
                    for alias, deployment, health in rows
                ]
            )
        )
    else:
        print_table(deployments_table(rows, wide=wide), wide=wide)
