"""Whose a request is, for the bounds a front-door process keeps per caller: a team's, all its
API keys together, so that a team holding several keys takes no more than a team holding one
(``frontdoor.held``, ``frontdoor.body``); an administrator's key, which acts for no team, its
own.

    held.prove(scope, caller)        # a Caller, a KeyOwner or a dashboard Session
    whose(caller)                    # "team research", or "admin key 3f2a…"
"""

from __future__ import annotations

from collections import Counter
from typing import Protocol

TEAM = "team "
"""The prefix of a team's share (``whose``)."""


class Keyed(Protocol):
    """A caller proven by one of its keys: a team's (``team``), or an administrator's (None)."""

    @property
    def team(self) -> str | None: ...

    @property
    def key_id(self) -> str: ...


def whose(caller: Keyed) -> str:
    """The share ``caller``'s requests count against."""
    return f"{TEAM}{caller.team}" if caller.team is not None else f"admin key {caller.key_id}"


def teams(share: str) -> str | None:
    """The team whose share ``share`` is; None for any other (a key's, an address's)."""
    return share.removeprefix(TEAM) if share.startswith(TEAM) else None


def sharer(share: str) -> tuple[str, str]:
    """Who holds ``share``, as a refusal names it ("team research" or "this API key"), and
    what its share counts together (all a team's keys)."""
    team = teams(share)
    if team is None:
        return "this API key", ""
    return f"team {team}", ", all its API keys together"


def less(counts: Counter[str], share: str, by: int) -> None:
    """``counts[share]`` less ``by``, forgotten at 0 (so that the counters hold only the
    shares in use now)."""
    counts[share] -= by
    if not counts[share]:
        del counts[share]


__all__ = ["TEAM", "Keyed", "less", "sharer", "teams", "whose"]
