"""Spend ledgers in Redis, kept true to PostgreSQL: the month's sum, reconciliation, drift.

Workers reserve and settle each job's cost in its team's ledger (``workers/admission``,
``lua/spend.lua``): ``base + open``, where ``base`` is what usage_log held at the last
reconciliation and ``open`` the sum of one entry per job since (``reserved`` the part of it
still reservations, not yet settled). Accounting reconciles every
budgeted team's ledger on a schedule::

    corrections = await reconcile(client, pool, keys, budgeted, month, token=token)

In one PostgreSQL snapshot it reads the month's sum and which of the ledger's jobs (listed
once the snapshot is taken) have usage rows; then, in one script, it sets ``base`` to that sum
and drops those jobs' entries (``CHUNK`` at a time, each call's base the sum less the rows of
the entries later calls drop). A job written after the snapshot keeps its entry (it is not in
the sum), so nothing in flight is counted twice or missed, even between the calls, and
whatever drifted (a reservation whose worker died, a settle lost to a Redis error, a ledger
Redis lost) is corrected. ``spend_drift`` says how far a ledger is from PostgreSQL at any
moment (the jobs in flight, between reconciliations).

Each ledger has a generation, given when it is made (first use, or after Redis lost it). A
worker that sees a ledger's generation change reconciles it itself, passing ``restore``:
the jobs it settled into the lost ledger whose usage rows accounting may not have written
yet. Those the snapshot does not hold are put back as entries (where the ledger has none
for them), so a Redis loss does not forget what accounting is behind on.
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, NamedTuple

import asyncpg
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from queuegate.errors import BudgetExhausted
from queuegate.keys import Keys
from queuegate.numbers import plain_decimal
from queuegate.redis_client import lua_source, text
from queuegate.registry import TeamConfig
from queuegate.usage_log import accounted

log = logging.getLogger(__name__)

NANO = Decimal(1_000_000_000)
LEDGER_TTL = 40 * 24 * 3600
"""Seconds a month's ledgers are kept: past the month's end, then Redis frees them."""
LOCK_TTL = 60
"""Seconds a reconciler's lock outlives its last round: another accountant takes over after
this when it died holding it (one round takes well under a second)."""
CHUNK = 1000
"""Job ids per reconcile script call (Lua's unpack takes a few thousand at most)."""

_SUM = (
    "SELECT coalesce(sum(cost_usd), 0) FROM usage_log"
    " WHERE team = $1 AND ts >= $2"
    " AND ts < ($2 AT TIME ZONE 'UTC' + interval '1 month') AT TIME ZONE 'UTC'"
    " AND ($3::text IS NULL OR model_requested = $3)"
)


class _Month(NamedTuple):
    """A month as ``current_month`` names it, and its bounds in epoch seconds."""

    text: str
    start: float
    end: float


class _Calendar:
    """The month last named, replaced whole (one attribute) when time leaves it."""

    def __init__(self) -> None:
        self.month = _Month("", 0.0, 0.0)

    def at(self, now: float) -> str:
        month = self.month
        if not month.start <= now < month.end:
            start = datetime.fromtimestamp(now, UTC).replace(
                day=1, hour=0, minute=0, second=0, microsecond=0
            )
            end = (start + timedelta(days=32)).replace(day=1)
            month = self.month = _Month(start.strftime("%Y-%m"), start.timestamp(), end.timestamp())
        return month.text


_CALENDAR = _Calendar()


def current_month() -> str:
    """The month it is now (UTC), ``YYYY-MM``: a budget's ledger and a usage row's month."""
    # Asked for every job: formatting the date each time cost 3-5 µs a call, 0.2-0.3 here.
    return _CALENDAR.at(time.time())


def to_nano(usd: Decimal) -> int:
    """USD as whole nano-dollars, rounded up so a reservation never falls short."""
    return math.ceil(usd * NANO)


def from_nano(nano: int) -> Decimal:
    """Nano-dollars as exact USD."""
    return Decimal(nano) / NANO


async def month_spend(
    db: asyncpg.Pool | asyncpg.Connection, team: str, month: str, model: str | None = None
) -> Decimal:
    """What usage_log holds of the team's spend in ``month`` (UTC), or on one model alias."""
    start = datetime.strptime(month, "%Y-%m").replace(tzinfo=UTC)
    spent: Decimal = await db.fetchval(_SUM, team, start, model)
    return spent


async def ledger_spent(
    client: aioredis.Redis, keys: Keys, team: str, month: str, model: str | None = None
) -> Decimal | None:
    """What the ledger counts as spent and reserved (USD); None when Redis has no ledger."""
    return ledger_total(await client.hmget(keys.spend(team, month, model), ["base", "open"]))


def ledger_total(fields: Sequence[Any]) -> Decimal | None:
    """Spent and reserved (USD) from a ledger's ``base`` and ``open`` fields (as HMGET answers
    them); None when Redis has no ledger."""
    base, open_ = fields
    if base is None:
        return None
    return from_nano(int(base) + int(open_ or 0))


def budget_scopes(config: TeamConfig, model: str) -> list[tuple[str | None, Decimal]]:
    """The ledgers a job of ``model`` is held to, each as (model, limit): the team's monthly
    budget (model None), then the model's cap, each when the team sets it."""
    scopes: list[tuple[str | None, Decimal]] = []
    if config.budget_usd is not None:
        scopes.append((None, config.budget_usd))
    cap = config.models[model].budget_usd if model in config.models else None
    if cap is not None:
        scopes.append((model, cap))
    return scopes


def capped_fallback(config: TeamConfig, asked: str, alias: str) -> bool:
    """Whether ``alias`` is left out of the chain of a job asking for ``asked``: a fallback
    whose spend the team caps. A cap counts the jobs that ask for its alias (its ledger, its
    reconciliation with usage_log), so a job of another alias served by it would pass the cap
    unseen."""
    if alias == asked or not config.models:
        return False
    limits = config.models.get(alias)
    return limits is not None and limits.budget_usd is not None


def ledger_scopes(team: str, config: TeamConfig) -> list[Scope]:
    """The ledgers ``config`` holds team ``team`` to: its budget's, then each capped model's."""
    scopes = [Scope(team)] if config.budget_usd is not None else []
    return scopes + [
        Scope(team, model)
        for model, limits in config.models.items()
        if limits.budget_usd is not None
    ]


def ledger_keys(keys: Keys, team: str, month: str, models: Sequence[str | None]) -> list[str]:
    """Each ledger's key then its expiry set's, per model (None: the team's ledger), in the
    order the ledger scripts take them."""
    return [
        key
        for model in models
        for key in (keys.spend(team, month, model), keys.spend_expiry(team, month, model))
    ]


async def ledgers_in_force(
    client: aioredis.Redis,
    keys: Keys,
    team: str,
    month: str,
    models: Sequence[str | None],
    *,
    settled: bool = False,
) -> list[int | None]:
    """What each ledger (the team's, model None, or its ledger on a model) counts as spent and
    reserved now, nano-USD, as a worker's next reserve compares it with the limit: the
    lapsed entries it would reap left out (``ledger_spent`` counts them until a reserve reaps
    them), at most as many as it reaps; None where Redis has no ledger. ``settled``: the open
    reservations left out too, as a reserve leaves them out of its refusal (a job they keep
    out waits for them). Read only."""
    return await _in_force(client, ledger_keys(keys, team, month, models), settled=settled)


async def teams_in_force(
    client: aioredis.Redis, keys: Keys, teams: Sequence[str], month: str
) -> list[int | None]:
    """``ledgers_in_force`` of each team's budget ledger, in one call."""
    ledgers = [key for team in teams for key in ledger_keys(keys, team, month, [None])]
    return await _in_force(client, ledgers)


async def _in_force(
    client: aioredis.Redis, ledgers: list[str], *, settled: bool = False
) -> list[int | None]:
    if not ledgers:
        return []
    script = client.register_script(lua_source("queuegate", "spent"))
    reply = await script(keys=ledgers, args=["settled" if settled else "all"])
    return [None if spent < 0 else int(spent) for spent in reply]


def exhausted(
    team: str, month: str, *, model: str, scope: tuple[str | None, Decimal], spent: int, needed: int
) -> BudgetExhausted:
    """The refusal of a job of ``model`` needing ``needed`` nano-USD of a scope (from
    ``budget_scopes``) that has ``spent`` already (settled: the open reservations of jobs in
    flight only hold a job back until they settle)."""
    scope_model, limit = scope
    what = f"its {model} cap" if scope_model else "its monthly budget"
    raise_it = f"the cap (queuegate teams set {team} --model {model}:budget=...)"
    if not scope_model:
        raise_it = f"the budget (queuegate teams set {team} --budget ...)"
    return BudgetExhausted(
        f"team {team} has spent ${plain_decimal(from_nano(spent))} of {what} "
        f"(${plain_decimal(limit)}) for {month}; this job needs about "
        f"${plain_decimal(from_nano(needed))}: raise {raise_it} or wait for next month"
    )


async def spend_drift(
    client: aioredis.Redis,
    pool: asyncpg.Pool,
    keys: Keys,
    team: str,
    month: str,
    *,
    model: str | None = None,
) -> Decimal:
    """Redis's spend minus PostgreSQL's, USD to the nano-dollar Redis counts in: 0 once every
    job is written and reconciled."""
    redis_spent = await ledger_spent(client, keys, team, month, model) or Decimal(0)
    pg_spent = from_nano(to_nano(await month_spend(pool, team, month, model)))
    return redis_spent - pg_spent


@dataclass(frozen=True)
class Scope:
    """One ledger to reconcile: a team's, or its ledger on one model (a budget cap)."""

    team: str
    model: str | None = None


@dataclass(frozen=True)
class Correction:
    """What one reconciliation changed in a ledger, USD."""

    scope: Scope
    month: str
    before: Decimal | None
    """Spent and reserved before; None when Redis had lost the ledger."""
    after: Decimal
    """``before`` as the reconciliation left it: what other jobs reserved or settled meanwhile
    (between its script calls, when it drops more entries than one call takes) left out."""
    generation: str
    """The ledger's generation: new when Redis had lost it."""
    restored: int = 0
    """Entries put back from ``restore``."""

    @property
    def drift(self) -> Decimal:
        """What the ledger had counted beyond PostgreSQL and the jobs still open (negative:
        short of them)."""
        return (self.before or Decimal(0)) - self.after


def reconciler_token() -> str:
    """A reconciler's name for the lock: one per process, kept across its rounds, so a round
    that failed holding the lock (Redis lost mid-round) does not keep the next one out."""
    return secrets.token_hex(8)


_TAKE_LOCK = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[2]))
return 1
"""


async def reconcile(
    client: aioredis.Redis,
    pool: asyncpg.Pool,
    keys: Keys,
    scopes: Sequence[Scope],
    month: str,
    *,
    token: str,
    restore: Mapping[Scope, Mapping[str, tuple[int, int]]] | None = None,
    restoring: int = 0,
) -> list[Correction] | None:
    """Bring each scope's ledger for ``month`` in line with usage_log (module docstring).

    ``restore`` maps a scope to the entries to put back, job id to (nano-USD, milliseconds
    until the entry lapses), unless the snapshot holds the job's usage row. ``restoring``:
    milliseconds a ledger made here (Redis had lost it) holds its reserves back, for the
    other workers to put theirs back (``lua/reconcile.lua``); 0: none.

    None when another reconciler (another ``token``) holds the lock: one at a time, or an
    older snapshot could be applied after a newer one. A scope PostgreSQL refuses a value of
    (asyncpg's DataError) is logged and left out, the others reconciled. Raises RedisError or
    asyncpg's other errors (queuegate.db).
    """
    if not await client.eval(_TAKE_LOCK, 1, keys.spend_reconciler, token, LOCK_TTL):
        return None
    script = client.register_script(lua_source("queuegate", "reconcile"))
    corrections: list[Correction] = []
    try:
        for scope in scopes:
            try:
                correction = await _reconcile_scope(
                    client,
                    pool,
                    scope,
                    script=script,
                    keys=keys,
                    month=month,
                    token=token,
                    restore=(restore or {}).get(scope),
                    restoring=restoring,
                )
            except asyncpg.DataError as exc:
                # A value PostgreSQL refuses fails this ledger alone: the others must still
                # be reconciled, or their stale entries lapse and their budgets overshoot.
                log.error(
                    "cannot reconcile team %s's spend ledger%s for %s: %s",
                    scope.team,
                    f" on {scope.model}" if scope.model else "",
                    month,
                    exc,
                )
                continue
            if correction is None:
                return None
            corrections.append(correction)
    finally:
        # Released only if still ours (compare and delete).
        with contextlib.suppress(RedisError):  # when Redis is away, the lock lapses
            await client.eval(
                "if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end",
                1,
                keys.spend_reconciler,
                token,
            )
    return corrections


async def _reconcile_scope(
    client: aioredis.Redis,
    pool: asyncpg.Pool,
    scope: Scope,
    *,
    script: AsyncScript,
    keys: Keys,
    month: str,
    token: str,
    restore: Mapping[str, tuple[int, int]] | None,
    restoring: int,
) -> Correction | None:
    """One scope's round of ``reconcile``; None when the lock was lost to another."""
    ledger, expiry = ledger_keys(keys, scope.team, month, [scope.model])
    wanted = dict(restore or {})
    async with (
        pool.acquire() as conn,
        conn.transaction(isolation="repeatable_read", readonly=True),
    ):
        # The first read takes the snapshot; the ledger's jobs are listed after it. A job is
        # settled before its usage row is written, so every job whose row the snapshot holds
        # is listed, and its entry dropped as its row enters base. Listed before the snapshot,
        # a job that reserved and was written in between kept its entry beside its row: counted
        # twice until the next round.
        spent = await month_spend(conn, scope.team, month, scope.model)
        ids = [text(i) for i in await client.zrange(expiry, 0, -1)]
        ids += [job for job in wanted if job not in ids]
        costs = await accounted(conn, [(scope.team, i) for i in ids])
    written = [job for _, job in costs]
    for job in written:
        wanted.pop(job, None)
    back: list[str | int] = [x for job, (nano, ms) in wanted.items() for x in (job, nano, ms)]
    # Each call sets base to the snapshot's sum less the rows of the jobs whose entries the
    # later calls drop: between the calls, while other jobs reserve and settle, each job
    # counts once, by its entry or by its row.
    pending = sum(costs.values(), Decimal(0))
    found, before, change, generation = 1, 0, 0, ""
    for start in range(0, max(1, len(written)), CHUNK):
        first = start == 0
        chunk = written[start : start + CHUNK]
        pending -= sum((costs[scope.team, job] for job in chunk), Decimal(0))
        reply = await script(
            keys=[ledger, expiry, keys.spend_reconciler],
            args=[
                token,
                to_nano(spent - pending),
                LEDGER_TTL,
                secrets.token_hex(8),
                restoring,
                len(wanted) if first else 0,
                *(back if first else []),
                *chunk,
            ],
        )
        if reply[0] == -1:
            return None
        if first:
            found, before = reply[0], reply[1]
        # What this call changed: what other jobs reserved or settled between the calls is
        # no correction.
        change += reply[2] - reply[1]
        generation = text(reply[3])
    return Correction(
        scope,
        month,
        from_nano(before) if found else None,
        from_nano(before + change),
        generation,
        len(wanted),
    )
