"""Monthly budgets: a job's estimated cost is reserved before the call and settled after.

The counters live in Redis (nano-USD, per team and UTC month, optionally per model), updated
by ``lua/spend.lua`` so concurrent jobs cannot overshoot a budget by more than one job's
estimate error. When Redis has lost a counter it is rebuilt from ``usage_log`` (the month's
sum); jobs whose usage event accounting has not written yet are missed by that sum, which
errs by at most the jobs in flight.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

import asyncpg
import redis.asyncio as aioredis

from queuegate.errors import BudgetExhausted, ServiceUnavailable
from queuegate.keys import Keys
from queuegate.numbers import plain_decimal
from queuegate.registry import TeamConfig
from workers.admission.estimate import NANO, to_nano
from workers.admission.scripts import Call, Scripts

log = logging.getLogger(__name__)

COUNTER_TTL = 40 * 24 * 3600
"""Seconds a month's counters are kept: past the month's end, then Redis frees them."""


@dataclass(frozen=True)
class Reservation:
    """What a job holds of its budgets until it is settled."""

    keys: list[str]
    team: str
    month: str
    nano: int


class Budgets:
    def __init__(
        self, client: aioredis.Redis, scripts: Scripts, keys: Keys, pool: asyncpg.Pool
    ) -> None:
        self._client = client
        self._scripts = scripts
        self._keys = keys
        self._pool = pool

    async def reserve(
        self, team: str, model: str, config: TeamConfig, nano: int, *, then: Call | None = None
    ) -> tuple[Reservation | None, list[int] | None]:
        """Reserve ``nano`` against the team's budget and the model's cap: the reservation
        (None when the team has neither), and the reply of ``then``.

        ``then`` is a call to run in the same round trip once the reservation is made; it does
        not run (its reply is None) when there is nothing to reserve or the reserve fails.
        Raises BudgetExhausted when the budget or the cap cannot take ``nano``.
        """
        month = datetime.now(UTC).strftime("%Y-%m")
        model_cap = config.models[model].budget_usd if model in config.models else None
        scopes: list[tuple[str, str | None, Decimal]] = []
        if config.budget_usd is not None:
            scopes.append((self._keys.spend(team, month), None, config.budget_usd))
        if model_cap is not None:
            scopes.append((self._keys.spend(team, month, model), model, model_cap))
        if not scopes:
            return None, None
        threshold = (
            to_nano(config.budget_usd * Decimal(str(config.alert_threshold)))
            if config.budget_usd is not None
            else 0
        )
        keys = [key for key, _, _ in scopes]
        args: list[str | int] = ["reserve", nano, COUNTER_TTL, threshold, team, month]
        args += [to_nano(limit) for _, _, limit in scopes]
        calls = [self._call(team, month, keys, args)] + ([then] if then is not None else [])
        while True:
            replies = await self._scripts.run_all(calls)
            reply = replies[0]
            _alert(team, month, reply)
            if reply[0] == -2:
                _, scope_model, _ = scopes[int(reply[1]) - 1]
                await self._rebuild(keys[int(reply[1]) - 1], team, month, scope_model)
                continue
            if reply[0] == -1:
                _, scope_model, limit = scopes[int(reply[1]) - 1]
                spent = Decimal(int(reply[2])) / NANO
                what = f"its {model} cap" if scope_model else "its monthly budget"
                raise BudgetExhausted(
                    f"team {team} has spent or reserved ${spent:.4f} of {what} "
                    f"(${plain_decimal(limit)}) for {month}; this job needs about "
                    f"${Decimal(nano) / NANO:.6f}: raise the budget (queuegate teams set "
                    f"{team} --budget ...) or wait for next month"
                )
            return Reservation(keys, team, month, nano), replies[1] if then is not None else None

    def settle_call(self, reservation: Reservation, actual_nano: int) -> Call | None:
        """The script call that replaces the reserved estimate with what the job really cost,
        to run with the job's other settles (its reply then goes to ``settled``); None when
        there is nothing to replace."""
        delta = actual_nano - reservation.nano
        if not delta:
            return None
        args: list[str | int] = [
            "settle",
            delta,
            COUNTER_TTL,
            0,
            reservation.team,
            reservation.month,
        ]
        return self._call(reservation.team, reservation.month, reservation.keys, args)

    def settled(self, reservation: Reservation, reply: list[int]) -> None:
        _alert(reservation.team, reservation.month, reply)

    def _call(self, team: str, month: str, keys: list[str], args: list[str | int]) -> Call:
        return Call(
            "spend", [self._keys.budget_alerted(team, month), self._keys.alerts, *keys], args
        )

    async def _rebuild(self, key: str, team: str, month: str, model: str | None) -> None:
        start = datetime.strptime(month, "%Y-%m").replace(tzinfo=UTC)
        try:
            spent: Decimal = await self._pool.fetchval(
                "SELECT coalesce(sum(cost_usd), 0) FROM usage_log"
                " WHERE team = $1 AND ts >= $2"
                " AND ts < ($2 AT TIME ZONE 'UTC' + interval '1 month') AT TIME ZONE 'UTC'"
                " AND ($3::text IS NULL OR model_requested = $3)",
                team,
                start,
                model,
            )
        except (OSError, asyncpg.PostgresError) as exc:
            raise ServiceUnavailable(
                f"cannot rebuild team {team}'s spend for {month} from PostgreSQL ({exc})"
            ) from exc
        # NX: another worker may have rebuilt it (and counted jobs since) in the meantime.
        await self._client.set(key, to_nano(spent), ex=COUNTER_TTL, nx=True)
        log.info(
            "rebuilt team %s's spend for %s from PostgreSQL: $%s", team, month, plain_decimal(spent)
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
