"""The router: serves a job from the first deployment along its fallback chain that answers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from types import TracebackType
from typing import Any, Protocol

import httpx

from queuegate.errors import AllProvidersFailed, DeadlineExceeded, InvalidRequest
from queuegate.messages import Attempt, ChatJob
from router import transport
from router.catalog import Catalog, Deployment
from router.pricing import cost
from router.providers import ADAPTERS, Completion, ProviderError

MAX_CONNECTIONS = 1000
"""Per api_base: a worker runs up to about this many calls at once, all kept alive."""
KEEPALIVE_EXPIRY = 30.0
"""Seconds an idle connection is kept; providers close theirs after about a minute."""


@dataclass(frozen=True)
class Routed:
    """A served job: the canonical response, who served it, and what it cost."""

    response: dict[str, Any]
    """An OpenAI ``chat.completion``, whichever provider served it."""
    model_used: str
    """The alias that served it (the requested one, or a fallback)."""
    deployment: str
    provider: str
    fallback_used: bool
    """Served by something other than the first deployment of the requested alias."""
    attempts: list[Attempt]
    """Every call made, failed ones first, the successful one last."""
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    cost_usd: Decimal
    latency_ms: float
    """Time spent in the successful call."""


class AttemptGate(Protocol):
    """Called before each attempt with the deployment about to be called; it may wait (the
    deployment's own rate limits) or raise a JobError, which ends the job."""

    async def enter(self, deployment: Deployment) -> None: ...


class Router:
    """Calls providers for chat jobs, walking each job's fallback chain; one attempt per deployment.

        async with Router(load_catalog(path, os.environ), os.environ) as router:
            router.check(job)  # UnknownModel before any work is done
            routed = await router.complete(job, deadline=time.monotonic() + 30)

    It owns one pooled HTTP client per api_base, opened on enter and closed on exit, so open one
    Router per process (per event loop) and share it; it can be opened only once. Keys are read
    from ``env`` at each call, so a rotated key is picked up without a restart.
    """

    def __init__(self, catalog: Catalog, env: Mapping[str, str]) -> None:
        self.catalog = catalog
        self._env = env
        self._clients: dict[str, httpx.AsyncClient] | None = None
        self._closed = False

    async def __aenter__(self) -> Router:
        if self._clients is not None or self._closed:
            raise RuntimeError("a Router can be opened only once")
        bases = {d.api_base for entry in self.catalog.models.values() for d in entry.deployments}
        self._clients = {base: _client(base) for base in bases}
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        clients, self._clients, self._closed = self._clients or {}, None, True
        await asyncio.gather(*(client.aclose() for client in clients.values()))

    def check(self, job: ChatJob) -> None:
        """Raise UnknownModel if the job's model or any of its fallbacks is not in the catalog."""
        self.catalog.chain(job.model, job.fallbacks)

    async def complete(
        self, job: ChatJob, *, deadline: float | None = None, gate: AttemptGate | None = None
    ) -> Routed:
        """Serve ``job`` from the first deployment along its chain that answers.

        ``deadline`` is a ``time.monotonic()`` instant: no call starts after it, and none is
        allowed to run past it. Raises UnknownModel, InvalidRequest (the provider refused the
        request itself: no fallback would accept it), DeadlineExceeded or AllProvidersFailed,
        each carrying the attempts made. ``gate.enter`` runs before each attempt.
        """
        clients = self._clients
        if clients is None:
            raise RuntimeError("the Router is not open: use `async with Router(...) as router`")
        targets = [
            (alias, deployment)
            for alias in self.catalog.chain(job.model, job.fallbacks)
            for deployment in self.catalog.resolve(alias).deployments
        ]
        attempts: list[Attempt] = []
        failures: list[str] = []
        for position, (alias, deployment) in enumerate(targets):
            if gate is not None:
                await gate.enter(deployment)
            timeout = deployment.timeout
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DeadlineExceeded(
                        _summary(f"deadline passed before calling {deployment.name}", failures),
                        attempts,
                    )
                timeout = min(timeout, left)
            started = time.monotonic()
            try:
                async with transport.time_limit(timeout):
                    status, completion = await self._call(
                        clients[deployment.api_base], deployment, job
                    )
            except ProviderError as err:
                attempts.append(_attempt(alias, deployment, started, err.status, err.error_class))
                failures.append(f"{deployment.name}: {err}")
                if not err.moves_on:
                    raise InvalidRequest(failures[-1], attempts) from err
                continue
            attempts.append(_attempt(alias, deployment, started, status, None))
            return Routed(
                response=completion.response,
                model_used=alias,
                deployment=deployment.name,
                provider=deployment.provider,
                fallback_used=position > 0,
                attempts=attempts,
                input_tokens=completion.usage.input_tokens,
                output_tokens=completion.usage.output_tokens,
                cached_tokens=completion.usage.cached_tokens,
                cost_usd=cost(deployment, completion.usage),
                latency_ms=attempts[-1].latency_ms,
            )
        raise AllProvidersFailed(
            _summary(f"all {len(targets)} deployments failed", failures), attempts
        )

    async def _call(
        self, client: httpx.AsyncClient, deployment: Deployment, job: ChatJob
    ) -> tuple[int, Completion]:
        adapter = ADAPTERS[deployment.provider]
        key = self._key(deployment)
        request = adapter.build_request(job, deployment.model, key)
        status, body = await transport.post(client, request, key)
        return status, adapter.parse_response(body, deployment.model)

    def _key(self, deployment: Deployment) -> str | None:
        if deployment.api_key_file is not None:
            try:
                text = deployment.api_key_file.read_text("utf-8").strip()
            except OSError as exc:
                # The path and the OS's reason, never the file's content.
                raise ProviderError(
                    "no_api_key", f"cannot read {deployment.api_key_file} ({exc.strerror})"
                ) from exc
            if not text:
                raise ProviderError("no_api_key", f"{deployment.api_key_file} is empty")
            return text
        if deployment.api_key_env is None:
            return None
        key = self._env.get(deployment.api_key_env)
        if not key:
            raise ProviderError("no_api_key", f"{deployment.api_key_env} is not set")
        return key


def _client(api_base: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=api_base,
        limits=httpx.Limits(
            max_connections=MAX_CONNECTIONS,
            max_keepalive_connections=MAX_CONNECTIONS,
            keepalive_expiry=KEEPALIVE_EXPIRY,
        ),
        # No per-phase timeouts: transport.time_limit bounds each call's total, capped at the
        # job's deadline, which per-phase limits cannot express.
        timeout=None,
        # Proxies and CA bundles come from what we are given, not from the process environment.
        trust_env=False,
    )


def _attempt(
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


def _summary(head: str, failures: list[str]) -> str:
    return f"{head}: {'; '.join(failures)}" if failures else head
