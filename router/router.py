"""The router: serves a job along its fallback chain, with retries, breakers and streaming.

For each alias of the chain it picks a deployment (routing order, concurrency cap, circuit
breaker, 429 pause), calls it, and on a failure consults the one classification table
(router.providers.base.HANDLING): retry the same deployment after a backoff, move on to
another deployment or alias, or fail the job. A per-job budget bounds the calls and the
waiting, and nothing waits past the job's deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol
from urllib.parse import urlsplit

import redis.asyncio as aioredis

from queuegate import tracing
from queuegate.errors import (
    AllProvidersFailed,
    Billed,
    ContextLengthExceeded,
    DeadlineExceeded,
    InvalidRequest,
    RateLimited,
    StreamInterrupted,
    UnknownModel,
)
from queuegate.keys import Keys
from queuegate.messages import Attempt, ChatJob, UnsupportedParams, prompt_cache_ttl
from queuegate.openai_params import too_many_stops
from queuegate.provider_formats import ANTHROPIC_BODY
from queuegate.redis_client import redis_for
from queuegate.request_limits import MAX_NESTING, nests_deeper
from queuegate.settings import Settings
from router import transport
from router.catalog import Catalog, Deployment, ModelEntry
from router.health import Health, Verdict
from router.pricing import cost
from router.providers import (
    ADAPTERS,
    Completion,
    Piece,
    ProviderError,
    StreamParser,
    UpstreamRequest,
)
from router.providers.anthropic import native_usage
from router.providers.base import (
    UNSENT,
    ServerEvent,
    Usage,
    estimate_tokens,
    estimated_usage,
    kept,
    openai_usage,
    text_size,
    within,
)
from router.selection import Slots

log = logging.getLogger(__name__)

KEY_FILE_REREAD = 10.0
"""Seconds a key read from a secret file is used before the file is read again, so a secret
rotated in place is picked up that long after the file changes."""
NO_KEY = "no key is configured for this deployment"
"""What a job is told of a deployment whose key is missing: the variable or file the key is
read from is the operator's to know, and the worker's log tells them (``Router``)."""

DeltaSink = Callable[[Piece, str, str], Awaitable[None]]
"""Receives a streamed job's deltas (with the choice of each), in order, as they arrive,
each with the model the provider says is answering (``StreamParser.model``) and the alias
serving the job (``Routed.model_used``: a fallback's when one does, known from the first)."""


@dataclass(frozen=True)
class Routed:
    """A served job: the canonical response, who served it, and what it cost."""

    response: dict[str, Any]
    """An OpenAI ``chat.completion``, whichever provider served it (streamed ones too)."""
    model_used: str
    """The alias that served it (the requested one, or a fallback)."""
    deployment: str
    provider: str
    fallback_used: bool
    """Served by an alias other than the requested one."""
    attempts: list[Attempt]
    """Every call made, failed ones first, the successful one last."""
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    cost_usd: Decimal
    latency_ms: float
    """Time spent in the successful call."""
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    params_dropped: tuple[str, ...] = ()
    """Job parameters the serving provider could not take, left out (policy ``drop``)."""
    params_changed: tuple[str, ...] = ()
    """Job parameters sent to it with another value than asked (policy ``drop``)."""
    estimated: bool = False
    """The provider sent no counts to bill by: its tokens were counted from the text."""


class AttemptGate(Protocol):
    """Called before each attempt with the deployment about to be called; it may wait (the
    deployment's own rate limits) or raise a JobError, which ends the job. Told of each 429,
    so that it can slow down to what the provider really admits."""

    async def enter(self, deployment: Deployment) -> None: ...

    async def rate_limited(self, deployment: Deployment) -> None: ...


class _Spent(Exception):
    """The job's budget of calls is spent: it ends with the failures it has."""


_CALLER_REASONS = frozenset({"unsupported", "context_length"})
"""Failures that say the request itself is what no deployment takes."""


class _Redirect(Exception):
    """A failure that names where the job goes next (context-length, content-policy fallbacks)."""

    def __init__(self, aliases: list[str]) -> None:
        self.aliases = aliases


@dataclass(frozen=True)
class _Call:
    """A call ready to go: the deployment, its translated request, the key it carries."""

    deployment: Deployment
    request: UpstreamRequest = field(repr=False)
    key: str | None = field(repr=False)
    """Scrubbed from whatever the provider echoes back."""
    probe: bool = False
    """The call is its half-open circuit's one probe: its answer closes the circuit."""


@dataclass(slots=True)
class _Calling:
    """The bounds of a call in flight: its time limit, and when its deployment's own timeout
    ends it (for a stream, moved on at each read: ``_Job.read``)."""

    limit: transport.TimeLimit
    timeout: float
    own: float
    what: str = "no answer"
    """What did not come in time when ``own`` passes."""
    reading: bool = False
    """The stream has read some of its answer."""
    due: float = float("-inf")
    """The instant ``limit`` was last moved to: a move to it again is skipped (a stream
    whose chunk wait binds would move it twice a read, 3 µs each)."""


@dataclass
class _Job:
    """One job's way through the router: what it has spent and what it has tried."""

    job: ChatJob
    deadline: float | None
    sink: DeltaSink | None
    gate: AttemptGate | None = None
    team_policy: UnsupportedParams | None = None
    attempts: list[Attempt] = field(default_factory=list)
    """Calls that reached the network (or set out to)."""
    failures: list[str] = field(default_factory=list)
    reasons: set[str] = field(default_factory=set)
    """Why each deployment passed over did not serve: error classes, ``circuit``, ``budget``."""
    retry_at: dict[str, float] = field(default_factory=dict)
    """When each rate-limited deployment takes calls again (``time.monotonic()``), as its
    latest 429 or pause said."""
    waited: float = 0.0
    streamed: bool = False
    """A delta reached the sink: from now on a failure cannot fall back."""
    paused: bool = False
    """A deployment was passed over because a 429 paused it."""
    param: str | None = None
    """The request's field the latest provider to name one found at fault."""
    until: float | None = None
    """The latest a stream with a chunk wait (``ChatJob.chunk_wait``) runs to, whatever its
    chunks: the worker's time limit."""
    overdue: str = "the job's deadline passed"
    """What did not come in time when ``deadline`` passes."""
    calling: _Calling | None = None
    """The bounds of the call in flight."""

    def left(self, now: float | None = None) -> float:
        if self.deadline is None:
            return float("inf")
        return self.deadline - (time.monotonic() if now is None else now)

    def cut(self, calling: _Calling) -> bool:
        """Whether the job's bound ends ``calling`` before its deployment's own timeout."""
        return self.deadline is not None and self.deadline < calling.own

    def drop(self, entry: ModelEntry, catalog: Catalog) -> bool:
        """Whether parameters a provider cannot take are dropped rather than refused: the
        job's policy, else its team's, else the alias's, else the catalog's."""
        policy = (
            self.job.unsupported_params
            or self.team_policy
            or entry.unsupported_params
            or catalog.unsupported_params
        )
        return policy == "drop"

    def fail(self, name: str, err: ProviderError) -> None:
        self.failures.append(f"{name}: {err}")
        self.reasons.add(err.error_class)
        self.param = err.param or self.param

    def rate_limited_for(self, deployment: Deployment, seconds: float) -> None:
        self.retry_at[deployment.name] = time.monotonic() + seconds

    def retry_after_ms(self) -> float | None:
        """How long until the first of them takes calls again; None when none said."""
        if not self.retry_at:
            return None
        return max(0.0, min(self.retry_at.values()) - time.monotonic()) * 1000

    def summary(self, head: str) -> str:
        return f"{head}: {'; '.join(self.failures)}" if self.failures else head

    async def emit(self, piece: Piece, model: str, alias: str) -> None:
        assert self.sink is not None
        if not self.streamed and tracing.ON:
            tracing.event("first chunk")  # on the call's span: its time to the first token
        self.streamed = True
        self._next_chunk_due()
        await self.sink(piece, model, alias)

    def _next_chunk_due(self) -> None:
        """With a chunk wait, the job's deadline (and its call's limit) moves to a chunk wait
        from now: its caller reads each chunk within that of the one before, not the whole
        stream within the deadline it had for the first (``ChatJob.chunk_wait``)."""
        wait = self.job.chunk_wait
        if wait is None:
            return
        now = time.monotonic()
        due, what = now + wait, f"no chunk within {wait:.3g}s of the one before"
        if self.until is not None and self.until < due:
            due, what = self.until, "the job's time limit passed"
        self.deadline, self.overdue = due, what
        self._bound(now)

    def read(self) -> None:
        """The stream in flight received more of its answer: its deployment's timeout bounds
        the wait for the next, as a provider SDK's read timeout does, not the whole stream
        (the job's deadline does that)."""
        calling = self.calling
        if calling is None:
            return
        now = time.monotonic()
        calling.own = now + calling.timeout
        if not calling.reading:  # said once: a stream reads thousands of times
            calling.reading = True
            calling.what = f"nothing more within {calling.timeout:.3g}s"
        self._bound(now)

    def _bound(self, now: float) -> None:
        """Move the call in flight's limit to the first of its own timeout and the job's
        deadline, saying which passed."""
        calling = self.calling
        if calling is None:
            return
        due, what = calling.own, calling.what
        if self.deadline is not None and self.deadline < due:
            due, what = self.deadline, self.overdue
        if due != calling.due:
            calling.due = due
            calling.limit.move(due - now, what)


class Router:
    """Calls providers for chat jobs, walking each job's fallback chain::

        async with Router(catalog, os.environ, redis=client, keys=Keys(prefix)) as router:
            router.check(job)  # UnknownModel before any work is done
            routed = await router.complete(job, deadline=time.monotonic() + 30)

    It owns one pooled HTTP client per api_base, opened on enter and closed on exit, so open one
    Router per process (per event loop) and share it; it can be opened only once. Keys are read
    from ``env`` at each call, so a rotated key is picked up without a restart; each deployment
    whose key cannot be read on enter is named in a warning (a job is told only that it has
    none: ``NO_KEY``). ``redis`` holds
    the deployments' circuit breakers and 429 pauses, shared with every other worker; the
    caller owns and closes it, and may keep its own state there too (``router.redis``).
    """

    def __init__(
        self,
        catalog: Catalog,
        env: Mapping[str, str],
        *,
        redis: aioredis.Redis,
        keys: Keys,
        connections: int = transport.MAX_CONNECTIONS,
    ) -> None:
        self.catalog = catalog
        self._connections = connections
        """Per api_base: the calls that run at once; the others wait for one to end."""
        self.redis = redis
        self.health = Health(redis, keys, catalog)
        self._env = env
        self._key_files: dict[Path, tuple[float, str]] = {}
        """Keys read from secret files, with when each was read (monotonic)."""
        self._slots = Slots()
        self._upstreams: dict[str, transport.Upstream] | None = None
        self._closed = False

    async def __aenter__(self) -> Router:
        if self._upstreams is not None or self._closed:
            raise RuntimeError("a Router can be opened only once")
        bases = {d.api_base for entry in self.catalog.models.values() for d in entry.deployments}
        self._upstreams = {
            base: transport.Upstream(base, connections=self._connections) for base in bases
        }
        self._warn_keyless()
        return self

    def _warn_keyless(self) -> None:
        """One warning per deployment whose key cannot be read, naming where it is missing:
        every job it would serve fails over to the next deployment, or as ``no_api_key``,
        and its breaker and calls never show why (no call is made)."""
        deployments = {
            d.name: d for entry in self.catalog.models.values() for d in entry.deployments
        }
        for deployment in deployments.values():
            try:
                self._read_key(deployment)
            except _NoKey as missing:
                log.warning(
                    "deployment %s has no key: %s; until then its jobs go to the next "
                    "deployment, or fail as no_api_key",
                    deployment.name,
                    missing,
                )

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        upstreams, self._upstreams, self._closed = self._upstreams or {}, None, True
        await asyncio.gather(*(upstream.aclose() for upstream in upstreams.values()))
        await self.health.settled()

    def check(self, job: ChatJob) -> None:
        """Raise UnknownModel if the job's model or any of its fallbacks is not in the catalog,
        naming a fallback by its place (``fallbacks.1``), as the front door does."""
        for index, alias in enumerate(job.fallbacks or ()):
            if alias not in self.catalog.models:
                where = f"fallbacks.{index}"
                raise UnknownModel(f"{where}: unknown model {alias!r}", param=where)
        self.catalog.chain(job.model, job.fallbacks)

    def first_call(self, job: ChatJob) -> tuple[str, Deployment] | None:
        """The alias and deployment of the job's first call when nothing but the catalog
        decides it and nothing would make it wait: the first alias of its chain has one
        deployment, with no concurrency cap, whose closed verdict is trusted (no pause, no
        round trip to ask), and a connection to it is free (a call recorded with its claim
        is billed as lost should its worker die: one waiting for a connection is recorded
        once it holds one). None otherwise (a model the catalog lacks included)."""
        try:
            alias = self.catalog.chain(job.model, job.fallbacks)[0]
        except UnknownModel:
            return None
        deployments = self.catalog.resolve(alias).deployments
        if len(deployments) != 1:
            return None
        deployment = deployments[0]
        if deployment.max_in_flight is not None or not self.health.trusted(deployment):
            return None
        if self._upstreams is None or self._upstreams[deployment.api_base].free.locked():
            return None
        return alias, deployment

    async def complete(
        self,
        job: ChatJob,
        *,
        deadline: float | None = None,
        until: float | None = None,
        on_delta: DeltaSink | None = None,
        gate: AttemptGate | None = None,
        unsupported_params: UnsupportedParams | None = None,
        capped: Callable[[str], bool] | None = None,
    ) -> Routed:
        """Serve ``job`` from the first deployment along its chain that answers, leaving out
        each fallback ``capped`` says the team caps the spend of, asked as the job reaches it
        (a cap set meanwhile holds from then): a cap counts the jobs that ask for its alias,
        so a fallback to it would pass it unseen.

        ``deadline`` is a ``time.monotonic()`` instant: no call starts after it, and none is
        allowed to run past it. With ``on_delta``, a job with ``stream`` set is streamed: its
        deltas go to ``on_delta`` in order (after the first, an empty one for each provider
        event with none, its finish reason or usage, but the one that ends the stream), and
        the Routed still carries the whole response.
        A stream with a ``chunk_wait`` runs past ``deadline`` once its first delta is out,
        while each next one comes within that wait, up to ``until`` (a ``time.monotonic()``
        instant; None: no bound).
        ``gate.enter`` runs immediately before each call (a deployment's own rate limits).
        ``unsupported_params`` is the team's policy for parameters a provider cannot take
        (the job's own comes first, the catalog's after).
        Raises UnknownModel, InvalidRequest (the provider refused the request itself, or no
        deployment along the chain can take it), ContextLengthExceeded, DeadlineExceeded,
        RateLimited (with the provider's Retry-After), StreamInterrupted or
        AllProvidersFailed, each carrying the calls made.
        """
        if self._upstreams is None:
            raise RuntimeError("the Router is not open: use `async with Router(...) as router`")
        run = _Job(job, deadline, on_delta if job.stream else None, gate, unsupported_params)
        run.until = until
        chain = self.catalog.chain(job.model, job.fallbacks)
        too_many = too_many_stops(job.params.stop)
        if too_many is not None and self.catalog.caps_stop(job.model):
            # Refused as the front door refuses it (OpenAI answers a 400), not left to a
            # fallback: the same request is served or refused whichever door it came in by.
            raise InvalidRequest(f"stop: {too_many}", param="stop")
        tried: list[str] = []
        left_out: set[str] = set()
        while chain:
            alias = chain.pop(0)
            if alias in left_out:
                continue
            if capped is not None and alias != job.model and capped(alias):
                left_out.add(alias)
                run.failures.append(
                    f"{alias}: not a fallback of this job's: its team caps that model's spend, "
                    "or did when the job was priced (ask for it)"
                )
                continue
            tried.append(alias)
            try:
                routed = await self._serve_alias(run, alias)
            except _Redirect as redirect:
                chain = self.catalog.redirect(redirect.aliases, tried)
                continue
            except _Spent:
                run.reasons.add("budget")
                break
            if routed is not None:
                return routed
        raise _failure(run, tried)

    async def _serve_alias(self, run: _Job, alias: str) -> Routed | None:
        """Serve from one alias's deployments, retrying them; None when none of them can."""
        entry = self.catalog.resolve(alias)
        done: set[str] = set()
        calls: Counter[str] = Counter()
        ready_at: dict[str, float] = {}
        while True:
            left = [d for d in entry.deployments if d.name not in done]
            if not left:
                return None
            if len(run.attempts) >= self.catalog.resilience.budget.attempts:
                run.failures.append(f"the job's budget of {len(run.attempts)} calls is spent")
                raise _Spent
            picked = await self._pick(run, alias, entry, left=left, done=done, ready_at=ready_at)
            if picked is None:
                if not await self._wait(run, [d for d in left if d.name not in done], ready_at):
                    run.reasons.add("waiting")
                    return None
                continue
            deployment = picked.deployment
            calls[deployment.name] += 1
            try:
                return await self._attempt(run, alias, picked)
            except ProviderError as err:
                if err.error_class == "rate_limited" and err.retry_after is not None:
                    run.rate_limited_for(deployment, err.retry_after)
                retry = self.catalog.retry(deployment)
                if err.retries and calls[deployment.name] < retry.attempts:
                    floor = err.retry_after
                    if err.error_class == "rate_limited" and floor is None:
                        floor = self.catalog.resilience.rate_limit_pause
                    delay = retry.backoff(calls[deployment.name] - 1, floor)
                    ready_at[deployment.name] = time.monotonic() + delay
                else:
                    done.add(deployment.name)
                self._after_failure(run, entry, err)
            finally:
                # The slot _pick took.
                await self._slots.release(deployment)

    async def _pick(
        self,
        run: _Job,
        alias: str,
        entry: ModelEntry,
        *,
        left: list[Deployment],
        done: set[str],
        ready_at: dict[str, float],
    ) -> _Call | None:
        """The deployment to call now and its request, or None when each must wait."""
        if run.left() <= 0:
            # Once a call was made (it may have timed out at the deadline), it is not "before".
            head = (
                f"deadline passed after calling {run.attempts[-1].deployment}"
                if run.attempts
                else f"deadline passed before calling {left[0].name}"
            )
            raise DeadlineExceeded(run.summary(head), run.attempts)
        now = time.monotonic()
        for deployment in self._slots.order(entry.routing, left):
            if ready_at.get(deployment.name, 0.0) > now:
                continue
            try:
                call = self._prepare(run, entry, deployment)
            except ProviderError as err:
                # Nothing was sent, so it is no call: this deployment cannot take this job.
                done.add(deployment.name)
                run.fail(deployment.name, err)
                self._after_failure(run, entry, err)
                continue
            # The slot is taken before awaiting Redis, so concurrent jobs cannot all pass the cap.
            if not self._slots.take(deployment):
                continue
            verdict: Verdict = await self.health.allow(deployment)
            if verdict.allowed:
                # _attempt releases the slot. Copied only for a probe: a copy costs µs a job.
                return replace(call, probe=True) if verdict.state == "probe" else call
            await self._slots.release(deployment)
            if verdict.state == "paused":
                run.paused = True
                run.rate_limited_for(deployment, verdict.wait)
                ready_at[deployment.name] = now + verdict.wait
            else:  # open, or half open with another worker's probe in flight
                done.add(deployment.name)
                run.failures.append(f"{deployment.name}: circuit {verdict.state}")
                run.reasons.add("circuit")
        return None

    async def _wait(self, run: _Job, waiting: list[Deployment], ready_at: dict[str, float]) -> bool:
        """Wait for a backoff to end or a slot to free; False when that would take too long."""
        if not waiting:
            return True
        now = time.monotonic()
        backoffs = [ready_at[d.name] - now for d in waiting if ready_at.get(d.name, 0.0) > now]
        if len(backoffs) < len(waiting):
            ready = [d for d in waiting if ready_at.get(d.name, 0.0) <= now]
            if not all(self._slots.full(d) for d in ready):
                # A backoff ended since _pick looked (while it asked Redis of another
                # deployment's circuit): pick again. Waiting for a call to end instead would
                # hold a job with no deadline until another job's call, forever in a quiet
                # worker (a draining one held its last job for its whole grace).
                return True
            # Each is at its concurrency cap: wait for any call to end, or for the first
            # backoff, whichever comes first.
            limit = min([*backoffs, run.left()])
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(None if limit == float("inf") else max(0.0, limit)):
                    await self._slots.wait_freed()
            return True
        backoff = min(backoffs)
        budget = self.catalog.resilience.budget.wait - run.waited
        if backoff > min(budget, run.left()):
            run.failures.append(
                f"waiting {backoff:.3g}s more would pass the job's budget or deadline"
            )
            return False
        run.waited += backoff
        await asyncio.sleep(backoff)
        return True

    def _prepare(self, run: _Job, entry: ModelEntry, deployment: Deployment) -> _Call:
        adapter = ADAPTERS[deployment.provider]
        key = self._key(deployment)
        request = adapter.build_request(
            run.job,
            deployment.model,
            key,
            stream=run.sink is not None,
            drop=run.drop(entry, self.catalog),
        )
        return _Call(deployment, request, key)

    def _attempt(self, run: _Job, alias: str, call: _Call) -> Awaitable[Routed]:
        """One call in the slot ``_pick`` took (its caller releases it), in a span when
        tracing.

        Not a coroutine: a job waiting for one of the upstream's connections holds each frame
        of its chain, and a worker holds thousands when the provider is the slowest stage.
        """
        attempt = self._try_deployment(run, alias, call)
        return self._traced(run, alias, call, attempt) if tracing.ON else attempt

    async def _traced(
        self, run: _Job, alias: str, call: _Call, attempt: Awaitable[Routed]
    ) -> Routed:
        deployment = call.deployment
        with tracing.span(
            f"chat {deployment.model}",
            kind="CLIENT",
            attributes=_attempt_attributes(run, alias, call),
        ) as span:
            routed = await attempt
            span.set_attributes(
                {
                    "http.response.status_code": 200,
                    "gen_ai.usage.input_tokens": routed.input_tokens,
                    "gen_ai.usage.output_tokens": routed.output_tokens,
                    "queuegate.cost_usd": float(routed.cost_usd),
                    **tracing.response_attributes(routed.response),
                }
            )
            return routed

    async def _try_deployment(self, run: _Job, alias: str, call: _Call) -> Routed:
        """Records the attempt and the deployment's health; raises ProviderError to go on."""
        deployment = call.deployment
        parser = None
        if run.sink is not None:
            parser = ADAPTERS[deployment.provider].stream_parser(
                deployment.model, call.key, choices=run.job.params.choices
            )
        assert self._upstreams is not None
        free = self._upstreams[deployment.api_base].free
        # The gate goes immediately before the call, so every retry and fallback is admitted
        # too, and records the call as sent (billed as lost should this worker die before its
        # outcome): once the call holds one of the connections (see Upstream.free), so that a
        # call still waiting for one is never billed. Unless the deployment's own limits make
        # it wait at the gate: a call waiting for their tokens must not hold a connection the
        # other deployments at its address need. The job's deadline alone bounds both waits.
        if deployment.limited:
            await self._enter(run, deployment)
            await free.acquire()
        else:
            await free.acquire()
            try:
                await self._enter(run, deployment)
            except BaseException:
                free.release()
                raise
        started = time.monotonic()
        limit = transport.time_limit(min(deployment.timeout, run.left(started)))
        calling = _Calling(limit, deployment.timeout, started + deployment.timeout)
        run.calling = calling
        try:
            try:
                async with limit:
                    completion = await self._call(run, alias, call, parser)
            finally:
                run.calling = None
                free.release()
        except ProviderError as err:
            if err.error_class not in UNSENT:
                run.attempts.append(
                    _attempt_of(alias, deployment, started, err.status, err.error_class)
                )
            run.fail(deployment.name, err)
            # Cut by the job's own deadline (shorter than the deployment's timeout): that says
            # nothing of the provider's health, and must not open a breaker others share.
            # Told by which bound ended it, not by the clock after: a busy loop's timer fires
            # a few ms before the deadline by the wall clock, and the job seemed to have time.
            # (A stream's bounds move with its chunks: the ones its limit was last set by.)
            cut = limit.expired and run.cut(calling)
            if not cut:
                await self._report(call, err)
            elif call.probe:
                await self.health.inconclusive(deployment)
            if err.error_class == "rate_limited" and run.gate is not None:
                await run.gate.rate_limited(deployment)
            if run.streamed:
                assert parser is not None
                raise StreamInterrupted(
                    run.summary("the stream broke after it had started"),
                    run.attempts,
                    billed=self._billed(run, alias, call, parser),
                ) from err
            if cut:  # however early the loop's timer fired, the job's time is up
                head = f"deadline passed after calling {deployment.name}"
                raise DeadlineExceeded(run.summary(head), run.attempts) from err
            raise
        await self.health.success(deployment, probe=call.probe)
        run.attempts.append(_attempt_of(alias, deployment, started, 200, None))
        response, usage = _counted(run.job, completion, call.request.output_limit)
        return Routed(
            response=response,
            model_used=alias,
            deployment=deployment.name,
            provider=deployment.provider,
            fallback_used=alias != run.job.model,
            attempts=run.attempts,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cached_tokens=usage.cached_tokens,
            cost_usd=cost(deployment, usage),
            latency_ms=run.attempts[-1].latency_ms,
            cache_write_tokens=usage.cache_write_tokens,
            reasoning_tokens=usage.reasoning_tokens,
            params_dropped=call.request.dropped,
            params_changed=call.request.changed,
            estimated=usage.estimated,
        )

    @staticmethod
    async def _enter(run: _Job, deployment: Deployment) -> None:
        if run.gate is not None:
            await run.gate.enter(deployment)

    def _billed(self, run: _Job, alias: str, call: _Call, parser: StreamParser) -> Billed:
        """What the provider generated before the stream broke, which it bills: its output
        within what the request allowed, as an answer's (``_counted``)."""
        deployment = call.deployment
        received = parser.received(_prompt_size(run.job), prompt_cache_ttl(run.job))
        usage = within(received, call.request.output_limit)
        return Billed(
            model_used=alias,
            deployment=deployment.name,
            provider=deployment.provider,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cached_tokens=usage.cached_tokens,
            cache_write_tokens=usage.cache_write_tokens,
            cost_usd=cost(deployment, usage),
            estimated=usage.estimated,
        )

    async def _call(
        self, run: _Job, alias: str, call: _Call, parser: StreamParser | None
    ) -> Completion:
        assert self._upstreams is not None
        deployment = call.deployment
        upstream = self._upstreams[deployment.api_base]
        connect, first_byte = deployment.connect_timeout, deployment.first_byte_timeout
        if parser is None:
            status, body = await transport.post(
                upstream, call.request, call.key, connect=connect, first_byte=first_byte
            )
            adapter = ADAPTERS[deployment.provider]
            choices = run.job.params.choices

            def read() -> Completion:
                completion = adapter.parse_response(body, deployment.model, choices=choices)
                # An answer passed on as the provider wrote it was looked through as sent
                # (transport.post); one the adapter built, joining an Anthropic message's
                # blocks into one text, is looked through whole.
                return completion if completion.response is body else kept(completion, call.key)

            return _answer(read, status)
        events = transport.events(
            upstream,
            call.request,
            call.key,
            connect=connect,
            first_byte=first_byte,
            on_read=run.read,
        )
        answered = False
        async with aclosing(events):
            try:
                async for event in events:
                    answered = True
                    pieces = _fed(parser, event)
                    for piece in pieces:
                        await run.emit(piece, parser.model, alias)
                    if not pieces and run.streamed and not parser.ended:
                        # An event with nothing to relay (a finish reason, the usage) arrived
                        # all the same: its caller's wait for the next chunk starts again, as
                        # straight from the provider (ChatJob.chunk_wait). Not the one that
                        # ends the stream: the result, published right after it, ends it for
                        # the caller (a chunk for it would be one more publish and confirm).
                        await run.emit(Piece({}), parser.model, alias)
            except ProviderError as err:
                if not answered:
                    raise
                # Failed after the provider answered 2xx and began (Anthropic's message_start
                # reports the prompt it read and wrote to its cache, which it bills).
                raise err.answered(200) from err
        # Its events came after a 2xx.
        # Its events were looked through one by one: a key cut across two is in the whole.
        return _answer(lambda: kept(parser.completion(), call.key), 200)

    async def _report(self, call: _Call, err: ProviderError) -> None:
        deployment = call.deployment
        if err.error_class == "rate_limited":
            pause = err.retry_after
            if pause is None:
                pause = self.catalog.resilience.rate_limit_pause
            await self.health.rate_limited(deployment, pause)
        elif err.trips_breaker:
            await self.health.failure(deployment)
        else:  # it answered, if only to refuse this request
            await self.health.success(deployment, probe=call.probe)

    def _after_failure(self, run: _Job, entry: ModelEntry, err: ProviderError) -> None:
        """Fail the job, or send it to the fallbacks the failure names; else carry on."""
        if err.error_class == "context_length" and entry.context_fallbacks:
            raise _Redirect(entry.context_fallbacks)
        if err.error_class == "content_policy" and entry.content_policy_fallbacks:
            raise _Redirect(entry.content_policy_fallbacks)
        if not err.moves_on:
            raise InvalidRequest(run.failures[-1], run.attempts, param=err.param) from err

    def _key(self, deployment: Deployment) -> str | None:
        """The key a call to ``deployment`` carries (None: it takes none); ProviderError
        ("no_api_key") saying only ``NO_KEY`` when it is missing: before, the job's error
        named the operator's variable or file path, and only the job was told."""
        try:
            return self._read_key(deployment)
        except _NoKey:
            raise ProviderError("no_api_key", NO_KEY) from None

    def _read_key(self, deployment: Deployment) -> str | None:
        """As ``_key``; ``_NoKey`` saying where the key is missing and what to do."""
        if deployment.api_key_file is not None:
            return self._key_file(deployment.api_key_file)
        if deployment.api_key_env is None:
            return None
        key = self._env.get(deployment.api_key_env)
        if not key:
            raise _NoKey(
                f"{deployment.api_key_env} is not set: set it in the worker's environment and "
                "restart the worker"
            )
        return key

    def _key_file(self, path: Path) -> str:
        """The key in ``path``, read again every ``KEY_FILE_REREAD`` seconds (a mounted secret
        is rotated in place) rather than on every call; a failed read is never kept."""
        now = time.monotonic()
        held = self._key_files.get(path)
        if held is not None and now - held[0] < KEY_FILE_REREAD:
            return held[1]
        try:
            text = path.read_text("utf-8").strip()
        except OSError as exc:
            # The path and the OS's reason, never the file's content.
            raise _NoKey(
                f"cannot read {path} ({exc.strerror}): put the key there, readable by the "
                "worker (read again at the next call, no restart needed)"
            ) from None
        if not text:
            raise _NoKey(f"{path} is empty: put the key there (read again at the next call)")
        self._key_files[path] = (now, text)
        return text


class _NoKey(Exception):
    """A deployment's key cannot be read: where, and what to do, for the operator alone."""


@asynccontextmanager
async def open_router(
    catalog: Catalog, env: Mapping[str, str], settings: Settings
) -> AsyncIterator[Router]:
    """A Router with a Redis client of its own, both from ``settings``, closed on exit."""
    redis = redis_for(settings)
    try:
        async with Router(catalog, env, redis=redis, keys=Keys(settings.redis_prefix)) as router:
            yield router
    finally:
        await redis.aclose()


def _failure(run: _Job, tried: list[str]) -> Exception:
    """How a job that no deployment served ends: the caller's error when every deployment
    found the request itself impossible (or too long), a rate limit when only limits stood
    in the way, else the providers' failure."""
    errors = {attempt.error for attempt in run.attempts}
    if errors == {"rate_limited"} or (run.paused and errors <= {"rate_limited"}):
        return RateLimited(
            run.summary("every deployment is rate limited"),
            run.attempts,
            retry_after_ms=run.retry_after_ms(),
        )
    if run.reasons and run.reasons <= _CALLER_REASONS:
        if "context_length" in run.reasons:
            head = "the prompt is too long for every model along the chain"
            return ContextLengthExceeded(run.summary(head), run.attempts, param=run.param)
        head = "no deployment along the chain can serve this request"
        return InvalidRequest(run.summary(head), run.attempts, param=run.param)
    calls = len(run.attempts)
    failed = f"all {len(tried)} models" if len(tried) > 1 else tried[0]  # the one asked for
    return AllProvidersFailed(
        run.summary(f"{failed} failed after {calls} call{'s' * (calls != 1)}"),
        run.attempts,
    )


def _answer(read: Callable[[], Completion], status: int) -> Completion:
    """The completion ``read`` makes of an answer the provider sent with ``status`` (2xx).
    One whose answer nests deeper than a job's JSON may (``MAX_NESTING``) is a bad response:
    taken, the worker failed writing its outcome after the call, and the job went back to its
    queue, its claim held, unanswered and unbilled for good. A bad response is raised naming
    ``status``: the provider answered, and bills it, so the call is billed as one timed out
    once sent is (``workers.claims``)."""
    try:
        completion = read()
        if nests_deeper(completion.response, MAX_NESTING):
            raise ProviderError(
                "bad_response", f"the answer nests deeper than {MAX_NESTING} levels"
            )
    except ProviderError as err:
        raise err.answered(status) from err
    except Exception as exc:  # a parser's own failure on an answer it did not expect
        raise ProviderError("bad_response", "the answer could not be read", status=status) from exc
    return completion


def _fed(parser: StreamParser, event: ServerEvent) -> list[Piece]:
    """``parser.feed(event)``, any failure of it a bad response: the last guard of the
    parsers' own checks (``text_of``). Before, an exception of another kind (a TypeError on
    content 42) failed the worker with its call, which the provider bills, recorded nowhere:
    no attempt, no cost, no breaker failure."""
    try:
        return parser.feed(event)
    except ProviderError:
        raise
    except Exception as exc:
        raise ProviderError("bad_response", "a stream event could not be read") from exc


def _counted(
    job: ChatJob, completion: Completion, output_limit: int | None
) -> tuple[dict[str, Any], Usage]:
    """The answer and the usage it is billed by: the provider's counts, or, when it sent none
    to bill by (``Completion.usage``), the prompt's and the answer's text counted as a broken
    stream's is, the answer's usage then that count. Before, such an answer was free. Either
    way its output is billed within the request's ``output_limit`` (``within``): before, a
    provider claiming 10^7 output tokens for a job of ``max_tokens`` 50 was believed.

    The answer's usage (and an Anthropic answer's own) says the counts billed, which its
    usage row holds, over the provider's other fields: before, a count clamped or no count,
    a total that was no sum, or a stream's output estimated, said otherwise."""
    response, counted = completion.response, completion.usage
    usage = within(counted if counted is not None else _by_text(job, response), output_limit)
    if counted is not None:
        return billed_answer(response, usage), usage
    native = response.get(ANTHROPIC_BODY)
    response = response | {"usage": openai_usage(usage)}
    if isinstance(native, dict):  # its usage would be the Messages API answer's
        response[ANTHROPIC_BODY] = {k: v for k, v in native.items() if k != "usage"}
    return response, usage


def _by_text(job: ChatJob, response: dict[str, Any]) -> Usage:
    """The usage of an answer with no counts to bill by: its prompt's and its text's."""
    prompt = estimate_tokens(_prompt_size(job))
    # A prompt marked for a cache counted as written to it, as the estimate reserved it: a
    # provider that wrote it may have said so in a count that is no count.
    return estimated_usage(prompt, estimate_tokens(_answer_size(response)), prompt_cache_ttl(job))


def billed_answer(response: dict[str, Any], usage: Usage) -> dict[str, Any]:
    """``response`` whose usage, and an Anthropic answer's own, says ``usage``: the counts
    it is billed by, as its usage row holds them, over the provider's other fields."""
    response = response | {"usage": openai_usage(usage, response.get("usage"))}
    native = response.get(ANTHROPIC_BODY)
    said = native.get("usage") if isinstance(native, dict) else None
    if isinstance(native, dict) and isinstance(said, dict):
        response[ANTHROPIC_BODY] = native | {"usage": native_usage(said, usage)}
    return response


def _answer_size(response: dict[str, Any]) -> int:
    """The ``text_size`` of an answer's text: every choice's content, refusal, reasoning and
    tool calls (names and arguments; a legacy ``function_call``'s too)."""
    size = 0
    for choice in response.get("choices") or []:
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict):
            continue
        size += sum(_text_size(message.get(name)) for name in _ANSWER_TEXTS)
        calls = [message.get("function_call")]
        for call in message.get("tool_calls") or []:
            calls.append(isinstance(call, dict) and (call.get("function") or call.get("custom")))
        for called in calls:
            if isinstance(called, dict):
                size += sum(text_size(str(value)) for value in called.values())
    return size


_ANSWER_TEXTS = ("content", "refusal", "reasoning_content")


def _prompt_size(job: ChatJob) -> int:
    """The ``text_size`` of the job's message text (to estimate its tokens when none were
    counted)."""
    return sum(_text_size(message.content) for message in job.messages)


def _text_size(content: Any) -> int:
    """The ``text_size`` of a message's text: a string, or the text of its content parts."""
    if isinstance(content, str):
        return text_size(content)
    if isinstance(content, list):
        parts = (part for part in content if isinstance(part, dict))
        return sum(text_size(str(part.get("text") or "")) for part in parts)
    return 0


def _attempt_attributes(run: _Job, alias: str, call: _Call) -> dict[str, Any]:
    """A provider call's span attributes, by the GenAI conventions and queuegate's own: its
    alias, deployment, place among the job's calls, and whether it is a retry (of a
    deployment called before) or a fallback (another alias than the one asked for)."""
    deployment = call.deployment
    params = run.job.params
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": tracing.PROVIDER_NAMES.get(
            deployment.provider, deployment.provider
        ),
        "gen_ai.request.model": deployment.model,
        "server.address": urlsplit(deployment.api_base).hostname or "",
        "queuegate.model": alias,
        "queuegate.deployment": deployment.name,
        "queuegate.attempt": len(run.attempts) + 1,
        "queuegate.retry": any(a.deployment == deployment.name for a in run.attempts),
        "queuegate.fallback": alias != run.job.model,
    }
    if run.sink is not None:
        attributes["queuegate.stream"] = True
    for name, value in (
        ("max_tokens", params.max_tokens),
        ("temperature", params.temperature),
        ("top_p", params.top_p),
        ("seed", params.seed),
    ):
        if value is not None:
            attributes[f"gen_ai.request.{name}"] = value
    return attributes


def _attempt_of(
    alias: str, deployment: Deployment, started: float, status: int | None, error: str | None
) -> Attempt:
    return Attempt(
        model=alias,
        deployment=deployment.name,
        provider=deployment.provider,
        status=status,
        error=error,
        latency_ms=(time.monotonic() - started) * 1000,
    )
