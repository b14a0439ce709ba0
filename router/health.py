"""Deployment health shared by every worker through Redis: circuit breakers and 429 pauses.

One Lua script (``router/lua/health.lua``, registered once per Router) reads and changes a
deployment's state atomically, so two workers never both probe a half-open circuit. A call
that answered costs no round trip of its own: it is counted with the worker's next one. And a
worker that has just been told a deployment is closed and unpaused trusts that for
``TRUST_CLOSED`` seconds instead of asking again before every call: another worker's 429 or
opened circuit reaches it that much later, while its own failures count at once. A call in
the trust's second half asks again without waiting for the answer, which renews the trust or
ends it, so calls at a steady rate never wait for Redis here. Calls that find the trust lapsed
while one of them is already asking share that one answer.

Best effort by design: while Redis is down every deployment counts as healthy, and jobs are
still served (without shared breakers) rather than failed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Literal, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from queuegate.deployment_health import DeploymentHealth, read_health
from queuegate.keys import Keys
from queuegate.metrics import BreakerState, set_breaker_state
from queuegate.outage import OutageLog
from queuegate.redis_client import lua_source, text
from router.catalog import Catalog, Deployment

log = logging.getLogger(__name__)

State = Literal["closed", "probe", "open", "half_open", "paused"]
Op = Literal["allow", "success", "failure", "rate_limit", "release"]

NOT_COUNTED = ("rate_limit", "release")
"""Ops that carry no answered calls into the window (health.lua counts them only with the
others)."""

PROBE_GRACE = 1.0
"""Seconds a probe may outlive its deployment's timeout before another caller may probe."""

TRUST_CLOSED = 0.05
"""Seconds a closed, unpaused verdict is reused: at hundreds of calls a second per deployment
it saves a round trip on almost every call, and a pause or an open circuit set by another
worker costs at most this long of calls that a retry or a fallback then absorbs."""


@dataclass(frozen=True)
class Verdict:
    """Whether a call to a deployment may start now, and if not, for how long it may not."""

    state: State
    wait: float
    """Seconds until it may be allowed again (0 when allowed)."""

    @property
    def allowed(self) -> bool:
        return self.state in ("closed", "probe")


_ALLOWED = Verdict("closed", 0.0)

_BREAKER: dict[State, BreakerState] = {
    "closed": "closed",
    "probe": "half_open",
    "half_open": "half_open",
    "open": "open",
}
"""The circuit's state each verdict tells (``paused`` tells none), for metrics."""


@dataclass(frozen=True)
class _Asking:
    """An ``allow`` on its way to Redis, which calls arriving meanwhile wait for."""

    answer: asyncio.Task[Verdict]
    reports: int
    """Failures and 429s met when it was asked: after another one its answer is stale."""


class Health:
    """Circuit breaker and pause of every deployment of a catalog, in Redis under ``keys``."""

    def __init__(self, client: aioredis.Redis, keys: Keys, catalog: Catalog) -> None:
        self._client = client
        self._keys = keys
        self._catalog = catalog
        self._script = client.register_script(lua_source("router", "health"))
        self._outage = OutageLog(log, "Redis", "circuit breakers and 429 pauses are not shared")
        self._unreported: dict[str, int] = {}
        """Successes per deployment not yet counted in Redis."""
        self._closed_until: dict[str, float] = {}
        """Per deployment, the monotonic time until which its last closed verdict holds."""
        self._reports: dict[str, int] = {}
        """Per deployment, failures and 429s met so far: a closed verdict asked for before
        the latest of them is stale by the time it arrives, and is not trusted."""
        self._asking: dict[str, _Asking] = {}
        self._gauged: dict[str, int] = {}
        """Deployments whose breaker gauge this worker set open or half-open, by the count
        of gauge sets when it did: read again by ``refresh_gauges``, for no call may come to
        see their state lapse."""
        self._gauge_sets = 0

    async def settled(self) -> None:
        """Once the asks under way have ended: a refresh no call awaits may still be on its
        round trip, and its owner must not close Redis under it."""
        pending = [asking.answer for asking in self._asking.values()]
        if pending:
            await asyncio.wait(pending)

    def trusted(self, deployment: Deployment) -> bool:
        """Whether a call to ``deployment`` is allowed now without asking Redis: its closed,
        unpaused verdict is still trusted."""
        return self._closed_until.get(deployment.name, 0.0) > time.monotonic()

    async def allow(self, deployment: Deployment) -> Verdict:
        """May a call start? A ``probe`` verdict makes this caller the half-open circuit's probe."""
        name = deployment.name
        left = self._closed_until.get(name, 0.0) - time.monotonic()
        if left > 0:
            if left < TRUST_CLOSED / 2 and name not in self._asking:
                # Asked again before the trust lapses, by no call: at a steady rate of calls
                # none waits for Redis (one in ten did, one at a time).
                self._ask(deployment, self._refresh(deployment))
            return _ALLOWED
        reports = self._reports.get(name, 0)
        asking = self._asking.get(name)
        if asking is not None and asking.reports == reports:
            # When the trust lapses, every call arriving within one round trip would ask.
            verdict = await asyncio.shield(asking.answer)
            # The probe is whoever asked for it; a later call is told the circuit's state.
            return verdict if verdict.state != "probe" else await self._run("allow", deployment)
        answer = self._ask(deployment, self._run("allow", deployment))
        # Shielded: a caller cancelled meanwhile does not take the others' answer with it.
        return await asyncio.shield(answer)

    def _ask(
        self, deployment: Deployment, asking: Coroutine[Any, Any, Verdict]
    ) -> asyncio.Task[Verdict]:
        """Run ``asking`` as the deployment's ask under way, which later calls share."""
        name = deployment.name
        answer = asyncio.create_task(asking)
        mine = self._asking[name] = _Asking(answer, self._reports.get(name, 0))
        answer.add_done_callback(lambda _: self._answered(name, mine))
        return answer

    async def _refresh(self, deployment: Deployment) -> Verdict:
        verdict = await self._run("allow", deployment)
        if verdict.state == "probe":
            # No call waits to be the probe: let the next caller be, at once.
            await self._run("release", deployment)
        return verdict

    def _answered(self, name: str, asking: _Asking) -> None:
        # A stale ask may end after a fresh one took its place.
        if self._asking.get(name) is asking:
            del self._asking[name]

    async def success(self, deployment: Deployment, *, probe: bool = False) -> None:
        """A call answered. A probe's answer closes the circuit now; any other only counts in
        the window, so it waits for this worker's next ``allow`` or ``failure``."""
        if probe:
            await self._run("success", deployment)
        else:
            self._unreported[deployment.name] = self._unreported.get(deployment.name, 0) + 1

    async def failure(self, deployment: Deployment) -> None:
        await self._run("failure", deployment)

    async def inconclusive(self, deployment: Deployment) -> None:
        """This worker's probe said nothing of the provider (its job's deadline cut it): the
        next caller probes at once, rather than once the probe's time has lapsed."""
        await self._run("release", deployment)

    async def rate_limited(self, deployment: Deployment, pause: float) -> None:
        """Pause the deployment for everyone for ``pause`` seconds (a longer pause stays)."""
        await self._run("rate_limit", deployment, pause)

    async def status(self, deployment: Deployment) -> DeploymentHealth:
        """What every worker sees of a deployment now (read only; raises RedisError)."""
        return (await read_health(self._client, self._keys, [deployment.name]))[deployment.name]

    async def refresh_gauges(self) -> None:
        """Bring the breaker gauges this worker set open or half-open up to the shared state
        (raises RedisError): once calls to a deployment stop, its state lapses in Redis and
        nothing else would tell the gauge, which said open for good. One round trip, none
        while every gauge says closed."""
        if not self._gauged:
            return
        seen = dict(self._gauged)
        health = await read_health(self._client, self._keys, list(seen))
        for name, now in health.items():
            # Unless a call set it meanwhile: its verdict may be newer than this read.
            if self._gauged.get(name) == seen[name]:
                self._gauge(name, _BREAKER.get(cast(State, now.state), "closed"))

    def _gauge(self, name: str, state: BreakerState) -> None:
        set_breaker_state(name, state)
        self._gauge_sets += 1
        if state == "closed":
            self._gauged.pop(name, None)
        else:
            self._gauged[name] = self._gauge_sets

    async def _run(self, op: Op, deployment: Deployment, pause: float = 0.0) -> Verdict:
        policy = self._catalog.breaker(deployment)
        args = [
            op,
            _ms(policy.window),
            policy.failures,
            repr(policy.ratio),
            _ms(policy.cooldown),
            _ms(deployment.timeout + PROBE_GRACE),
            _ms(pause),
            # Lost if this call fails: while Redis is away the window is not shared anyway.
            self._unreported.pop(deployment.name, 0) if op not in NOT_COUNTED else 0,
        ]
        keys = [self._keys.breaker(deployment.name), self._keys.paused(deployment.name)]
        reports = self._reports.get(deployment.name, 0)
        if op in ("failure", "rate_limit"):
            self._reports[deployment.name] = reports + 1
        if op != "allow":
            self._closed_until.pop(deployment.name, None)
        try:
            state, millis = await self._script(keys=keys, args=args)
        except RedisError as exc:
            self._outage.failed(exc)
            return _ALLOWED
        self._outage.recovered()
        verdict = Verdict(cast(State, text(state)), millis / 1000)
        if verdict.state in _BREAKER:
            self._gauge(deployment.name, _BREAKER[verdict.state])
        fresh = self._reports.get(deployment.name, 0) == reports
        if op == "allow" and verdict.state == "closed" and fresh:
            self._closed_until[deployment.name] = time.monotonic() + TRUST_CLOSED
        elif op == "allow":
            # Asked before the trust lapsed (``_refresh``): it ends with this answer.
            self._closed_until.pop(deployment.name, None)
        if op == "failure" and verdict.state == "open" and verdict.wait > 0:
            log.warning("circuit of deployment %s opened", deployment.name)
        return verdict


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))
