"""Chaos: a private Redis stops while duplicates of jobs arrive, and starts again (with its
data kept, AOF, or lost).

Every delivery misses its claim while Redis is away, and is held (``fail_closed``), by
admission or, for a team without limits, by its missed claim alone; once Redis answers, each
job is claimed before it is called or refused: one call per job id, every client of a request
given the one answer, a different request under a used id never given the other's, and a
call never recorded as a refusal over budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path

import pytest

from bench.chaos import PrivateRedis
from mockprovider import Behavior, MockConfig
from producer import GatewayClient
from queuegate.messages import ChatResult
from queuegate.registry import TeamConfig, set_team_config
from queuegate.settings import Settings
from queuegate.spend import NANO
from tests.chaos.harness import usage_rows
from tests.support import Gateway, running_gateway, wait_until
from tests.teams import register

IDS = 8
"""Job ids, each published by three clients with the same body."""
OTHER = "dup-0"
"""The id a fourth client publishes too, with another body."""
FITS = 3
"""Jobs the tight budget admits."""
REFUSED = {"budget_exhausted", "idempotency_conflict"}


def _job_id(text: str) -> str:
    """The job id a prompt names (``_hello``)."""
    found = re.match(r"job (dup-\d+):", text)
    assert found is not None, text
    return found[1]


LONG = "a " * 40
"""A body whose answer is cut at the jobs' max_tokens: a job (without fallbacks, estimated at
its own model's price) costs its estimate, within the 3 tokens a message's estimate adds, so
a budget admits as many jobs by their settled spend as by their estimates (a job held back by
others' reservations waits for their settles)."""


def _hello(i: int, body: str = LONG) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"job dup-{i}: {body}"}]


def _answer(result: ChatResult | BaseException) -> str:
    """The provider's answer (its response id), or the error code."""
    assert isinstance(result, ChatResult), result
    if result.response is not None:
        return str(result.response["id"])
    assert result.error is not None
    return result.error.code


@asynccontextmanager
async def _gateway(
    settings: Settings, tmp_path: Path, *, kept: bool, budget: Decimal | None
) -> AsyncIterator[tuple[PrivateRedis, Gateway]]:
    """A worker on a private Redis, fail closed, for a team with a budget and a rate limit
    (admission holds its jobs while Redis is away), or with neither (``budget`` None: only
    their missed claims hold them), and a slow provider."""
    persistent = ("--appendonly", "yes", "--appendfsync", "always", "--dir", str(tmp_path))
    async with PrivateRedis(*(persistent if kept else ())) as redis:
        s = settings.model_copy(update={"redis_url": redis.url, "redis_outage": "fail_closed"})
        limits = TeamConfig() if budget is None else TeamConfig(rpm=100_000, budget_usd=budget)
        await register(s, "alpha", limits)
        async with running_gateway(
            s, mock_config=MockConfig(default=Behavior(latency_ms=500))
        ) as gw:
            yield redis, gw


async def _through_outage(
    redis: PrivateRedis,
    gw: Gateway,
    clients: list[GatewayClient],
    other: GatewayClient,
    caplog: pytest.LogCaptureFixture,
) -> list[tuple[str, str, ChatResult | BaseException]]:
    """Stop Redis; publish each job id from every client of ``clients`` (and ``OTHER`` from
    ``other``, with another body); once all wait, start Redis again. Each delivery's job id,
    body and result."""
    admission = gw.worker.admission
    assert admission is not None
    await redis.stop()
    handles = []
    for i in range(IDS):
        for client in clients:
            job = client.job(
                "gpt-4o-mini", _hello(i), job_id=f"dup-{i}", max_tokens=20, fallbacks=[]
            )
            handles.append((f"dup-{i}", "same", await client.submit(job)))
    job = other.job("gpt-4o-mini", _hello(0, "other"), job_id=OTHER, max_tokens=20, fallbacks=[])
    handles.append((OTHER, "other", await other.submit(job)))
    # Every delivery held, uncalled, waiting for Redis: by admission, for a team with limits;
    # past the circuit breakers, which let calls go once they find Redis away, for one without
    seen = (
        (lambda: admission.outage.down)
        if admission.config("alpha").rpm
        else (lambda: "circuit breakers and 429 pauses are not shared" in caplog.text)
    )
    await wait_until(lambda: gw.worker.in_flight == len(handles) and seen(), timeout=30)
    # ... and still uncalled a while later, had anything let them go unclaimed meanwhile
    with contextlib.suppress(TimeoutError):
        await wait_until(lambda: gw.mock.stats.calls > 0, timeout=2)
    assert gw.mock.stats.calls == 0
    await redis.start()
    results = await asyncio.gather(
        *(h.result(timeout=60) for _, _, h in handles), return_exceptions=True
    )
    return [
        (job_id, body, result) for (job_id, body, _), result in zip(handles, results, strict=True)
    ]


def _answers(
    results: list[tuple[str, str, ChatResult | BaseException]],
) -> dict[tuple[str, str], list[str]]:
    """Each request's answers (response ids or error codes) by job id and body; every
    client answered."""
    answers: dict[tuple[str, str], list[str]] = {}
    for job_id, body, result in results:
        answers.setdefault((job_id, body), []).append(_answer(result))
    return answers


def _calls(gw: Gateway) -> Counter[str]:
    """Provider calls by job id."""
    return Counter(_job_id(call.messages[-1]["content"]) for call in gw.mock.stats.log)


@pytest.mark.parametrize(
    ("kept", "budget"),
    [(True, Decimal(100)), (False, Decimal(100)), (True, None)],
    ids=["aof", "data-lost", "no-limits"],
)
async def test_duplicates_waiting_for_redis_are_called_once_when_it_returns(
    settings: Settings,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    kept: bool,
    budget: Decimal | None,
) -> None:
    # Given a worker on a private Redis, and four clients (of a team with limits and a
    # budget, or with neither, whose jobs wait for their claims alone)
    async with (
        _gateway(settings, tmp_path, kept=kept, budget=budget) as (redis, gw),
        gw.client("alpha") as a,
        gw.client("alpha") as b,
        gw.client("alpha") as c,
        gw.client("alpha") as other,
    ):
        # When Redis stops, each job id arrives from three clients (and one id from a fourth,
        # with another body), and Redis starts again while they wait
        results = await _through_outage(redis, gw, [a, b, c], other, caplog)

        # Expect one provider call per job id
        assert gw.mock.stats.calls == IDS, _calls(gw)
        # ... every client of a request given the same answer
        answers = _answers(results)
        assert all(len(set(given)) == 1 for given in answers.values()), answers
        # ... the other request under a used id never given the first's: one of the two is
        # called, the other refused
        first, second = set(answers[(OTHER, "same")]), set(answers[(OTHER, "other")])
        assert first != second
        assert "idempotency_conflict" in first | second, answers
        # ... and one usage row per job id, the refusal's beside them
        assert await usage_rows(gw.pool, IDS + 1, timeout=30) == (IDS + 1, IDS + 1)
        called = await gw.pool.fetchval(
            "SELECT count(*) FROM usage_log WHERE job_id NOT LIKE '%/refused/%'"
        )
        assert called == IDS


async def test_a_job_called_is_never_answered_by_a_duplicates_budget_refusal(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a worker on a private Redis that will lose its data, whose team's budget admits
    # only FITS jobs (and a half), and four clients
    async with (
        _gateway(settings, tmp_path, kept=False, budget=Decimal(100)) as (redis, gw),
        gw.client("alpha") as a,
        gw.client("alpha") as b,
        gw.client("alpha") as c,
        gw.client("alpha") as other,
    ):
        admission = gw.worker.admission
        assert admission is not None
        ahead = admission.ahead(a.job("gpt-4o-mini", _hello(0), max_tokens=20, fallbacks=[]))
        assert ahead is not None
        budget = Decimal(ahead.estimate.cost_nano) * (FITS * 2 + 1) / 2 / NANO
        await set_team_config(gw.pool, "alpha", TeamConfig(rpm=100_000, budget_usd=budget))
        await wait_until(lambda: admission.config("alpha").budget_usd == budget)

        # When Redis stops, each job id arrives from three clients, and Redis starts again,
        # empty, while they wait
        results = await _through_outage(redis, gw, [a, b, c], other, caplog)

        # Expect each job called once at most
        calls = _calls(gw)
        assert set(calls.values()) <= {1}, calls
        # ... every client of a request given the same answer
        answers = _answers(results)
        assert all(len(set(given)) == 1 for given in answers.values()), answers
        # ... and only the jobs answered called
        served = {job_id for (job_id, _), given in answers.items() if set(given) - REFUSED}
        assert set(calls) == served, (calls, answers)
        assert 0 < len(served) <= FITS + 1
        # ... and no call on a row of a job refused over budget
        await usage_rows(gw.pool, IDS + 1, timeout=30)
        rows = await gw.pool.fetch(
            "SELECT job_id, error_code, attempts FROM usage_log WHERE job_id NOT LIKE '%/refused/%'"
        )
        assert len(rows) == IDS
        for row in rows:
            refused = row["error_code"] == "budget_exhausted"
            assert refused == (row["job_id"] not in calls), dict(row)
            assert row["attempts"] == (0 if refused else 1), dict(row)
