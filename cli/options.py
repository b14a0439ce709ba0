"""What several commands read from their options and stdin, checked the same way."""

from __future__ import annotations

import math
import socket
import sys
from datetime import date
from typing import Annotated, Any, Literal

import annotated_types
import typer

from queuegate.settings import MAX_PORT, Settings
from queuegate.signing import API_KEY_VARIABLES

ApiKey = Annotated[
    str | None,
    typer.Option(
        envvar=list(API_KEY_VARIABLES),
        show_default=False,
        show_envvar=True,
        help="The team's API key, where it proves itself with one (safer in the environment).",
    ),
]
"""Every team command's ``--api-key``: one option under one pair of variable names, where
``submit`` read QUEUEGATE_TEAM_API_KEY and the batch and replies commands QUEUEGATE_API_KEY."""
LogLevel = Annotated[
    Literal["debug", "info", "warning", "error"],
    typer.Option("--log-level", case_sensitive=False, help="debug, info, warning or error."),
]
"""Every ``--log-level``: another is a usage error in one line listing these (exit 2), not
logging's ``Unknown level`` raised as the command starts, a traceback of 190 lines."""
Port = Annotated[int, typer.Option(min=0, max=MAX_PORT, help="Port to listen on.")]
"""Every ``--port``: refused in one line (exit 2) outside a TCP port's range, where binding
would raise OverflowError, or the mock provider's server would listen on it modulo 65536."""
Joining = Annotated[bool, typer.Option("--joining", hidden=True, help="Started by a supervisor.")]
"""A process its supervisor started (``--processes``): checks made once by the supervisor
are not made again."""


def resolvable(host: str) -> str:
    """A ``--host`` option's callback: an address (or a name that resolves to one) to listen
    on; one that does not resolve is refused in one line before anything starts, where
    asyncio's resolver raised a traceback (UnicodeError for a label of 64 characters or more)
    and the front door's said another process listened there."""
    from queuegate.visible import clipped

    try:
        # As a listening socket reads it: "" is every address of this machine.
        socket.getaddrinfo(host or None, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError):
        raise typer.BadParameter(
            f"{clipped(host)!r} does not resolve to an address: give one of this machine's, "
            "e.g. 127.0.0.1, or 0.0.0.0 for all"
        ) from None
    return host


Host = Annotated[str, typer.Option(callback=resolvable, help="Address to listen on.")]


def team_name(name: str) -> str:
    """A team name argument's callback: a name no team can have is refused in one line, the
    name clipped, before anything is opened."""
    from queuegate.errors import ConfigError
    from queuegate.registry import check_team_name

    try:
        return check_team_name(name)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None


TeamName = Annotated[str, typer.Argument(callback=team_name, help="The team's name.")]


def only_team(names: list[str] | None) -> list[str] | None:
    """``--team``'s callback: unset (every team), or one name as ``team_name`` checks it, so a
    bad one is a usage error (exit 2) as it is where a team is an argument. Given twice, it
    is one too: a single option kept the last silently, reporting one team of the two."""
    if not names:
        return None
    if len(names) > 1:
        raise typer.BadParameter(
            f"given {len(names)} times: a report is of one team, or of every team without --team"
        )
    return [team_name(names[0])]


OnlyTeam = Annotated[
    list[str] | None, typer.Option(callback=only_team, metavar="TEAM", help="Only this team.")
]
"""``--team``, a list so that a second one is seen (``only_team``): read it with ``one``."""


def one(team: list[str] | None) -> str | None:
    """The team an ``OnlyTeam`` option names; None for every team."""
    return team[0] if team else None


def bounds(field: str) -> dict[str, Any]:
    """``min`` and ``max`` of an option that sets Settings' ``field``, the range Settings
    takes: a value outside it is a usage error in one line naming the option (exit 2), as a
    ``--port`` is, not Settings' refusal once the command runs (exit 1, naming the
    environment variable that was never set)."""
    limits: dict[str, Any] = {}
    for rule in Settings.model_fields[field].metadata:
        if isinstance(rule, annotated_types.Ge):
            limits["min"] = rule.ge
        elif isinstance(rule, annotated_types.Le):
            limits["max"] = rule.le
    return limits


def make_settings(**overrides: Any) -> Settings:
    """Settings from the environment, with the options given (None: not given)."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def split_teams(teams: str | None) -> list[str] | None:
    """``--teams a,b``'s names, each checked as ``teams add`` checks one; None when not given.

    Given with no name (``--teams "$TEAMS"`` of a variable left unset) is a usage error, not
    every team: a worker so started served them all."""
    from queuegate.errors import ConfigError
    from queuegate.registry import check_team_name

    if teams is None:
        return None
    names = [t.strip() for t in teams.split(",") if t.strip()]
    if not names:
        raise typer.BadParameter(
            "--teams names no team: give one or more, e.g. --teams research,search, or leave "
            "it out for every team"
        )
    try:
        return [check_team_name(name) for name in names]
    except ConfigError as exc:
        raise typer.BadParameter(f"--teams: {exc}") from None


def finite(value: float | None) -> float | None:
    """A float option's callback: nan and inf are no amount of anything."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a number: give a finite one")
    return value


def seconds(value: float) -> float:
    """A duration option's callback: a finite number of seconds above zero."""
    if not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"{value}: give a number of seconds above 0, e.g. 60")
    return value


def parse_month(text: str | None) -> date:
    """``YYYY-MM`` as its first day; this month when None."""
    from admin.usage import parse_month as month_of
    from queuegate.errors import ConfigError

    try:
        return month_of(text)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None


def read_password() -> str:
    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise typer.BadParameter("--password-stdin read an empty password: pipe one in")
    return password
