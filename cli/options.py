"""What several commands read from their options and stdin, checked the same way."""

from __future__ import annotations

import sys
from datetime import date
from typing import Annotated, Any

import typer

from queuegate.settings import Settings

LogLevel = Annotated[str, typer.Option("--log-level", help="debug, info, warning or error.")]


def make_settings(**overrides: Any) -> Settings:
    """Settings from the environment, with the options given (None: not given)."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def split_teams(teams: str | None) -> list[str] | None:
    return [t.strip() for t in teams.split(",") if t.strip()] if teams else None


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
