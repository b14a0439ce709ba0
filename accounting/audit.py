"""Retention of captured content: ``audit_content`` rows older than a cut-off are deleted.

The usage rows themselves (``usage_log``: who, what model, tokens, cost) are the spend record
and are kept; only prompts and responses expire.
"""

from __future__ import annotations

import re
from datetime import timedelta

import asyncpg

from queuegate.errors import ConfigError

_AGE = re.compile(r"^(\d+)([dhm])$")
_UNITS = {"d": "days", "h": "hours", "m": "minutes"}


def parse_age(text: str) -> timedelta:
    """``90d``, ``12h`` or ``30m`` as a timedelta."""
    match = _AGE.match(text.strip())
    if match is None:
        raise ConfigError(f"{text!r} is not an age: use a number and d, h or m, e.g. 90d")
    return timedelta(**{_UNITS[match[2]]: int(match[1])})


async def prune_content(pool: asyncpg.Pool, older_than: timedelta) -> int:
    """Delete captured content of jobs finished more than ``older_than`` ago; return how many."""
    status: str = await pool.execute(
        "DELETE FROM audit_content WHERE ts < now() - $1::interval", older_than
    )
    return int(status.rsplit(" ", 1)[1])
