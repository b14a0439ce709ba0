"""Token buckets in Redis: requests and tokens per minute, for several scopes at once.

A bucket refills continuously and holds one minute of its limit, or, for requests, the
``burst`` a provider tolerates (see ``lua/take.lua``). A take covers every scope a job falls
under (the team, the team on this model; or the deployment) in one script, so a job takes
from all of them or from none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from queuegate.errors import InvalidRequest
from queuegate.metrics import set_bucket_fill
from workers.admission.scripts import Call, Scripts


@dataclass(frozen=True)
class Limit:
    """One scope's bucket: its Redis key, what it is (for messages), and its limits."""

    key: str
    scope: str
    rpm: int | None
    tpm: int | None
    burst: int | None = None
    """Requests the bucket holds; None: a minute of ``rpm``."""
    team: str | None = None
    """The team whose bucket it is (the label of its metrics); None for a deployment's."""
    line: str | None = None
    """The key of the line of the teams waiting for the bucket, shared by teams (a
    deployment's): teams take from it in turn (``lua/take.lua``); None for a team's own."""


class Take(NamedTuple):
    """What a take got: ``taken``, and go after ``wait_ms``; or not, and ``wait_ms`` to go."""

    taken: bool
    wait_ms: int
    then_ran: bool = False
    """Whether the call given to run once the take is made (``Buckets.take``) ran and
    answered 1 (a claim's record of its call, ``lua/hold.lua``: still this owner's)."""
    again_ms: int = 0
    """Taken in a line (``take_call``): when the buckets will have as much again."""
    marks: tuple[int, ...] = ()
    """Reserved (taken into debt, to go after ``wait_ms``) for want of tokens: where the
    buckets stood, for ``Buckets.due`` to tell how much sooner refunds let it go."""


class Buckets:
    def __init__(self, scripts: Scripts) -> None:
        self._scripts = scripts

    async def take(
        self,
        limits: Sequence[Limit],
        tokens: int,
        within_ms: int = 0,
        *,
        name: str | None = None,
        then: Call | None = None,
        team: str = "",
        patience_ms: int = 0,
    ) -> Take:
        """Take one request and ``tokens`` from every bucket, or from none.

        When the buckets can admit the job within ``within_ms`` but not now, the job reserves
        its place: it is taken now, into debt, and ``wait_ms`` says when it may go. Raises
        InvalidRequest when the job is larger than a bucket could ever hold. ``name``: the
        take's, the same on every try (``Scripts.run_all``). ``then``: a call to run in the
        same round trip once the take is made (``Take.then_ran``).
        ``team``, ``patience_ms``: see ``take_call``.
        """
        if not limits:
            return Take(True, 0)
        first = take_call(limits, tokens, within_ms, team=team, patience_ms=patience_ms)
        calls = [first] + ([then] if then is not None else [])
        replies = await self._scripts.run_all(calls, name=name)
        ran = len(replies) > 1 and replies[1] == 1
        return taken(limits, tokens, replies[0])._replace(then_ran=ran)

    async def due(self, limits: Sequence[Limit], marks: Sequence[int]) -> int:
        """Milliseconds a reservation (its take's ``marks``) has still to wait, now that
        settles may have given back tokens its jobs did not use (its take's wait less the
        time since, or sooner; later only where the bucket was lost meanwhile, so the
        caller keeps the sooner of the two). Reads only, so it may run twice."""
        [reply] = await self._scripts.run_all(
            [_call(limits, "due", 0, 0, 0, marks=marks)], repeatable=True
        )
        return int(reply[1])

    async def refresh_fills(self, limits: Sequence[Limit]) -> None:
        """Set ``queuegate_bucket_fill_ratio`` of each team bucket of ``limits`` as of now
        (refilled since its last take), taking nothing: an idle team's bucket fills up."""
        if limits:
            calls = [_call([limit], "peek", 0, 0, 0) for limit in limits]
            for limit, reply in zip(limits, await self._scripts.run_all(calls), strict=True):
                taken([limit], 0, reply)

    async def drain(self, limits: Sequence[Limit]) -> None:
        """Empty every bucket of its requests: the next ones are admitted at the rate alone."""
        if limits:
            await self._scripts.run(_call(limits, "drain", 0, 0, 0))


def take_call(
    limits: Sequence[Limit],
    tokens: int,
    within_ms: int = 0,
    *,
    team: str = "",
    patience_ms: int = 0,
) -> Call:
    """The script call of ``Buckets.take``, to run with another; its reply goes to ``taken``.

    With ``team``, when ``limits`` are a deployment's (``lined``), the take waits ``team``'s
    turn in their line and is never made into debt (``within_ms`` is 0): refused, the team
    enters the line if the wait it is told is within ``patience_ms``, what it will wait."""
    if team and limits and limits[0].line is not None:
        return _call(limits, "take", 1, tokens, 0, line=(limits[0].line, team, patience_ms))
    return _call(limits, "take", 1, tokens, within_ms)


def lined(limits: Sequence[Limit]) -> bool:
    """Whether a take of ``limits`` waits its team's turn in their line: a deployment's, whose
    buckets every team shares (one bucket a take)."""
    return bool(limits) and limits[0].line is not None


def taken(limits: Sequence[Limit], tokens: int, reply: list[int]) -> Take:
    """What a take's reply says; InvalidRequest when the job is larger than a bucket holds.

    A team's first bucket's fill (its requests or tokens, whichever is emptier) goes to
    ``queuegate_bucket_fill_ratio`` on the way.
    """
    if reply[0] == -1:
        raise too_large(limits[int(reply[1]) - 1], tokens)
    team = limits[0].team
    if team is not None and len(reply) > 2:
        set_bucket_fill(team, int(reply[2]) / 1000)
    again_ms = int(reply[3]) if len(reply) > 3 else 0
    return Take(reply[0] == 1, int(reply[1]), again_ms=again_ms, marks=tuple(reply[4:]))


def settle_call(limits: Sequence[Limit], tokens_back: int, requests_back: int = 0) -> Call | None:
    """The script call that gives ``tokens_back`` to every bucket (negative: takes more, into
    debt if need be), and ``requests_back`` (a request taken for a call never made), to run
    with a job's other settles; None when it has nothing to do."""
    if not limits or not (tokens_back or requests_back):
        return None
    return _call(limits, "settle", requests_back, tokens_back, 0)


def refunded(calls: Sequence[Call]) -> list[str]:
    """The buckets ``calls`` refund tokens to (settles of jobs that used fewer than they took):
    a reservation waiting for them may go sooner. Not a give-back (a request back too: a take
    undone), which take.lua does not count as a refund, so no waiter could go sooner by it."""
    return [
        key
        for call in calls
        if call.script == "take"
        and call.args[0] == "settle"
        and int(call.args[1]) == 0
        and int(call.args[2]) > 0
        for key in call.keys
    ]


def too_large(limit: Limit, tokens: int) -> InvalidRequest:
    return InvalidRequest(
        f"the job needs about {tokens} tokens, more than {limit.scope} admits in a minute "
        f"({limit.tpm}): lower max_tokens or split the prompt"
    )


def _call(
    limits: Sequence[Limit],
    mode: str,
    requests: int,
    tokens: int,
    within_ms: int,
    *,
    line: tuple[str, str, int] | None = None,
    marks: Sequence[int] = (),
) -> Call:
    """``line``: the key of the line a take waits in, its team, and its patience; ``marks``:
    a reservation's, which "due" reads after the caps."""
    caps = [arg for limit in limits for arg in (limit.rpm or 0, limit.tpm or 0, limit.burst or 0)]
    keys = [limit.key for limit in limits]
    if line is None:
        return Call("take", keys, [mode, requests, tokens, within_ms, "", 0, *caps, *marks])
    key, team, patience_ms = line
    return Call("take", [*keys, key], [mode, requests, tokens, within_ms, team, patience_ms, *caps])
