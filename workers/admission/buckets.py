"""Token buckets in Redis: requests and tokens per minute, for several scopes at once.

A bucket holds one minute of its limit and refills continuously (see ``lua/take.lua``).
A take covers every scope a job falls under (the team, the team on this model; or the
deployment) in one script, so a job takes from all of them or from none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from queuegate.errors import InvalidRequest
from workers.admission.scripts import Scripts


@dataclass(frozen=True)
class Limit:
    """One scope's bucket: its Redis key, what it is (for messages), and its limits."""

    key: str
    scope: str
    rpm: int | None
    tpm: int | None


class Buckets:
    def __init__(self, scripts: Scripts) -> None:
        self._scripts = scripts

    async def take(self, limits: Sequence[Limit], tokens: int) -> int:
        """Take one request and ``tokens`` from every bucket; 0, or the milliseconds to wait.

        Raises InvalidRequest when the job is larger than a bucket could ever hold.
        """
        if not limits:
            return 0
        reply = await self._scripts.take(
            keys=[limit.key for limit in limits], args=["take", 1, tokens, *_caps(limits)]
        )
        if reply[0] == -1:
            raise too_large(limits[int(reply[1]) - 1], tokens)
        return int(reply[0])

    async def settle(self, limits: Sequence[Limit], tokens_back: int) -> None:
        """Give ``tokens_back`` to every bucket (negative: take more, into debt if need be)."""
        if limits and tokens_back:
            await self._scripts.take(
                keys=[limit.key for limit in limits],
                args=["settle", 0, tokens_back, *_caps(limits)],
            )


def too_large(limit: Limit, tokens: int) -> InvalidRequest:
    return InvalidRequest(
        f"the job needs about {tokens} tokens, more than {limit.scope} admits in a minute "
        f"({limit.tpm}): lower max_tokens or split the prompt"
    )


def _caps(limits: Sequence[Limit]) -> list[int]:
    return [cap for limit in limits for cap in (limit.rpm or 0, limit.tpm or 0)]
