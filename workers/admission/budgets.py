"""Monthly budgets: a job's estimated cost is reserved before the call and settled after.

The ledgers live in Redis (nano-USD, per team and UTC month, optionally per model), updated
by ``lua/spend.lua`` so concurrent jobs cannot overshoot a budget by more than one job's
estimate error. Each job holds one entry, which lapses ``lease`` seconds after its reserve
(a worker that died mid-job never settles it) and ``SETTLED_TTL`` after its settle; accounting
reconciles every ledger with usage_log (queuegate/spend.py), which also recovers a settle
lost to a Redis error. When Redis has lost a ledger its base is rebuilt from ``usage_log``
(the month's sum); jobs whose usage event accounting has not written yet are missed by that
sum until the next reconciliation.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from decimal import Decimal

import asyncpg
import redis.asyncio as aioredis

from queuegate.db import DB_ERRORS
from queuegate.errors import ServiceUnavailable
from queuegate.keys import Keys
from queuegate.numbers import plain_decimal
from queuegate.registry import TeamConfig
from queuegate.spend import (
    LEDGER_TTL,
    NANO,
    budget_scopes,
    current_month,
    exhausted,
    month_spend,
    to_nano,
)
from workers.admission.scripts import Call, Scripts

log = logging.getLogger(__name__)

SETTLED_TTL = 3600
"""Seconds a settled job's entry counts before it lapses: accounting reconciles it into the
ledger's base long before, unless it is down that long (then the ledger is short of those
jobs until it returns)."""


@dataclass(frozen=True)
class Reservation:
    """What a job holds of its budgets until it is settled."""

    keys: list[str]
    """Each scope's ledger and expiry set, in the order spend.lua takes them."""
    team: str
    month: str
    job_id: str
    nano: int


class Budgets:
    def __init__(
        self,
        client: aioredis.Redis,
        scripts: Scripts,
        keys: Keys,
        pool: asyncpg.Pool,
        *,
        lease: float,
    ) -> None:
        self._client = client
        self._scripts = scripts
        self._keys = keys
        self._pool = pool
        self._lease_ms = math.ceil(lease * 1000)

    async def reserve(
        self,
        team: str,
        model: str,
        config: TeamConfig,
        nano: int,
        job_id: str,
        *,
        then: Call | None = None,
    ) -> tuple[Reservation | None, list[int] | None]:
        """Reserve ``nano`` for job ``job_id`` against the team's budget and the model's cap:
        the reservation (None when the team has neither), and the reply of ``then``.

        ``then`` is a call to run in the same round trip once the reservation is made; it does
        not run (its reply is None) when there is nothing to reserve or the reserve fails.
        Raises BudgetExhausted when the budget or the cap cannot take ``nano``.
        """
        month = current_month()
        scopes = budget_scopes(config, model)
        if not scopes:
            return None, None
        threshold = (
            to_nano(config.budget_usd * Decimal(str(config.alert_threshold)))
            if config.budget_usd is not None
            else 0
        )
        keys = [
            key
            for scope_model, _ in scopes
            for key in (
                self._keys.spend(team, month, scope_model),
                self._keys.spend_expiry(team, month, scope_model),
            )
        ]
        args: list[str | int] = ["reserve", nano, LEDGER_TTL, threshold, team, month]
        args += [job_id, self._lease_ms, *(to_nano(limit) for _, limit in scopes)]
        calls = [self._call(team, month, keys, args)] + ([then] if then is not None else [])
        while True:
            replies = await self._scripts.run_all(calls)
            reply = replies[0]
            _alert(team, month, reply)
            if reply[0] == -2:
                scope_model, _ = scopes[int(reply[1]) - 1]
                await self._rebuild(team, month, scope_model)
                continue
            if reply[0] == -1:
                scope = scopes[int(reply[1]) - 1]
                raise exhausted(
                    team, month, model=model, scope=scope, spent=int(reply[2]), needed=nano
                )
            reservation = Reservation(keys, team, month, job_id, nano)
            return reservation, replies[1] if then is not None else None

    def settle_call(self, reservation: Reservation, actual_nano: int) -> Call:
        """The script call that replaces the reserved estimate with what the job really cost,
        to run with the job's other settles (its reply then goes to ``settled``)."""
        args: list[str | int] = [
            "settle",
            actual_nano,
            LEDGER_TTL,
            0,
            reservation.team,
            reservation.month,
            reservation.job_id,
            SETTLED_TTL * 1000,
        ]
        return self._call(reservation.team, reservation.month, reservation.keys, args)

    def settled(self, reservation: Reservation, reply: list[int]) -> None:
        _alert(reservation.team, reservation.month, reply)

    def _call(self, team: str, month: str, keys: list[str], args: list[str | int]) -> Call:
        return Call(
            "spend", [self._keys.budget_alerted(team, month), self._keys.alerts, *keys], args
        )

    async def _rebuild(self, team: str, month: str, model: str | None) -> None:
        try:
            spent = await month_spend(self._pool, team, month, model)
        except DB_ERRORS as exc:
            raise ServiceUnavailable(
                f"cannot rebuild team {team}'s spend for {month} from PostgreSQL ({exc})"
            ) from exc
        ledger = self._keys.spend(team, month, model)
        # NX: another worker may have rebuilt it (and counted jobs since) in the meantime.
        if await self._client.hsetnx(ledger, "base", to_nano(spent)):
            await self._client.expire(ledger, LEDGER_TTL)
            log.warning(
                "team %s's spend ledger for %s was missing (Redis lost it): rebuilt from "
                "PostgreSQL at $%s; jobs in flight count from the next reconciliation",
                team,
                month,
                plain_decimal(spent),
            )


def _alert(team: str, month: str, reply: list[int]) -> None:
    """Log the alert a reserve or settle emitted when it crossed the team's threshold."""
    if len(reply) > 2 and reply[0] == 0 and reply[2] == 1:
        log.warning(
            "team %s crossed its budget alert threshold for %s: $%s spent or reserved",
            team,
            month,
            plain_decimal(Decimal(int(reply[1])) / NANO),
        )
