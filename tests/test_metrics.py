"""Prometheus metrics: their values agree with PostgreSQL, and the HTTP endpoints answer."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import time
from collections import Counter, defaultdict
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from mockprovider import Behavior, MockConfig
from queuegate import metrics
from queuegate.keys import Keys
from queuegate.livestats import read_view
from queuegate.metrics_server import MetricsServer
from queuegate.registry import TeamConfig, set_team_config
from queuegate.settings import Settings
from queuegate.status import StatusReader
from tests.support import running_gateway, wait_until
from tests.teams import register
from workers import Worker
from workers.admission.buckets import Limit, take_call
from workers.admission.scripts import Scripts

HELLO = [{"role": "user", "content": "Hello metrics"}]


def _sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _snapshot(keys: set[tuple[str, str, str]]) -> dict[str, dict[tuple[str, str, str], float]]:
    """Jobs, tokens and cost per (team, model, status) key, as the registry has them now."""
    values: dict[str, dict[tuple[str, str, str], float]] = defaultdict(dict)
    for team, model, status in keys:
        values["jobs"][(team, model, status)] = _sample(
            "queuegate_jobs_total", {"team": team, "model": model, "status": status}
        )
    for team, model, _ in keys:
        for direction in ("input", "output"):
            values[direction][(team, model, "")] = _sample(
                "queuegate_tokens_total", {"team": team, "model": model, "direction": direction}
            )
        values["cost"][(team, model, "")] = _sample(
            "queuegate_cost_usd_total", {"team": team, "model": model}
        )
    return values


async def test_job_counts_tokens_and_cost_match_postgresql(settings: Settings) -> None:
    # Given a gateway serving two teams, and a known mix of jobs, one of them refused
    plan = [("alpha", "gpt-4o-mini")] * 4 + [("alpha", "claude-haiku")] * 2
    plan += [("beta", "local-llama")] * 3 + [("alpha", "no-such-model")]
    keys = {(team, model, "ok") for team, model in plan if model != "no-such-model"}
    keys.add(("alpha", "-", "unknown_model"))  # an alias outside the catalog is not a label
    before = _snapshot(keys)
    written_before = _sample("queuegate_accounting_events_total", {"outcome": "written"})
    async with (
        running_gateway(settings, teams=("alpha", "beta")) as gw,
        gw.client("alpha") as alpha,
        gw.client("beta") as beta,
    ):
        clients = {"alpha": alpha, "beta": beta}

        # When every job is answered and accounted
        await asyncio.gather(
            *(clients[team].chat(model, HELLO, timeout=10) for team, model in plan)
        )
        rows = await gw.usage_rows(len(plan))
    # Read once worker and accounting have stopped: each counts a job after announcing it
    after = _snapshot(keys)
    written = _sample("queuegate_accounting_events_total", {"outcome": "written"})

    # Expect the metrics' increments to equal the sums over the usage rows
    jobs: Counter[tuple[str, str, str]] = Counter()
    tokens: dict[str, Counter[tuple[str, str, str]]] = {"input": Counter(), "output": Counter()}
    cost: defaultdict[tuple[str, str, str], Decimal] = defaultdict(Decimal)
    for row in rows:
        model = row["model_requested"] if row["model_requested"] != "no-such-model" else "-"
        jobs[(row["team"], model, row["error_code"] or row["status"])] += 1
        tokens["input"][(row["team"], model, "")] += row["input_tokens"]
        tokens["output"][(row["team"], model, "")] += row["output_tokens"]
        cost[(row["team"], model, "")] += row["cost_usd"]
    for key in keys:
        assert after["jobs"][key] - before["jobs"][key] == jobs[key], key
    for direction in ("input", "output"):
        for key, total in tokens[direction].items():
            assert after[direction][key] - before[direction][key] == total, (direction, key)
    for key, usd in cost.items():
        assert after["cost"][key] - before["cost"][key] == pytest.approx(float(usd), rel=1e-9)
    assert jobs[("alpha", "-", "unknown_model")] == 1
    # ... and accounting's count of events written equal to the rows
    assert written - written_before == len(rows)


async def test_the_accounting_beside_a_worker_on_one_host_serves_on_a_port_of_its_own(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    # Given a worker's default metrics port taken, as by a worker on this host
    with socket.socket() as worker_port:
        with contextlib.suppress(OSError):  # else another process on this host holds it
            worker_port.bind(("0.0.0.0", 9464))
            worker_port.listen()
        # When the accounting starts with QUEUEGATE_METRICS_PORT unset
        env = {
            **os.environ,
            "QUEUEGATE_NAMESPACE": settings.namespace,
            "QUEUEGATE_DATABASE_SCHEMA": settings.database_schema,
        }
        env.pop("QUEUEGATE_METRICS_PORT", None)
        accounting = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli", "accounting",
            env=env, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert accounting.stderr is not None
        try:
            # Expect it to serve its metrics on 9463, its own default (before: it stopped,
            # 9464 taken)
            async with asyncio.timeout(20):
                said = (await accounting.stderr.readline()).decode()
                while said and "/readyz on" not in said:
                    said = (await accounting.stderr.readline()).decode()
            assert said.rstrip().endswith("/readyz on http://0.0.0.0:9463"), said
            # ... and none of a worker's metrics there (before: its usage batch size and, as
            # a worker's carried accounting's lag, exported at 0 by every process)
            async with httpx.AsyncClient() as http:
                text = (await http.get("http://127.0.0.1:9463/metrics")).text
            for workers_own in ("queuegate_usage_batch_size", "queuegate_redis_evicts_keys"):
                assert workers_own not in text
        finally:
            accounting.terminate()
            await accounting.communicate()


async def test_readyz_follows_the_worker_and_metrics_are_served(settings: Settings) -> None:
    # Given a metrics server reporting on a worker that has not started yet
    workers: list[Worker] = []
    async with (
        MetricsServer("127.0.0.1", 0, lambda: bool(workers) and workers[0].is_ready()) as server,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http,
    ):
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/readyz")).status_code == 503

        # When the worker consumes, expect it ready and our metrics exposed
        async with running_gateway(settings) as gw:
            workers.append(gw.worker)
            assert (await http.get("/readyz")).status_code == 200
            metrics = await http.get("/metrics")
            assert metrics.status_code == 200
            assert "# HELP queuegate_jobs_total" in metrics.text
            assert "# HELP queuegate_bucket_wait_seconds" in metrics.text

        # ... and not ready once it has drained and stopped
        assert (await http.get("/readyz")).status_code == 503


async def _scrape(server: MetricsServer) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample the live ``/metrics`` endpoint serves, by name and labels."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http:
        text = (await http.get("/metrics")).text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _at(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def test_a_bucket_wait_and_the_buckets_fill_are_recorded_where_status_reads_them(
    settings: Settings,
) -> None:
    # Given team alpha allowed 60 requests a minute, one at a time, and a metrics endpoint
    await register(settings, "alpha", TeamConfig(rpm=60, burst=1))
    async with (
        MetricsServer("127.0.0.1", 0, lambda: True) as server,
        running_gateway(settings) as gw,
        gw.client("alpha") as client,
    ):
        before = await _scrape(server)
        # When two jobs arrive at once, so the second waits about a second for the bucket
        results = await asyncio.gather(*(client.chat("gpt-4o-mini", HELLO) for _ in range(2)))
        assert {r.status for r in results} == {"ok"}
        after = await _scrape(server)

        # Expect both jobs' bucket waits observed, the second's near a second, and the
        # bucket's fill (empty now) exported
        wait = "queuegate_bucket_wait_seconds"
        count = (_at(after, f"{wait}_count", team="alpha") or 0) - (
            _at(before, f"{wait}_count", team="alpha") or 0
        )
        waited = (_at(after, f"{wait}_sum", team="alpha") or 0) - (
            _at(before, f"{wait}_sum", team="alpha") or 0
        )
        assert count == 2
        assert 0.5 < waited < 5
        # (empty when the second took, refilling since: the workers read it as of now)
        assert (_at(after, "queuegate_bucket_fill_ratio", team="alpha") or 0) < 0.5

        # ... and in the live stats `queuegate status` reads
        keys = Keys(settings.redis_prefix)
        client_redis = aioredis.from_url(settings.redis_url)
        try:
            async with asyncio.timeout(10):
                # Polled: workers write their live stats every stats_interval, unannounced.
                while "alpha" not in (await read_view(client_redis, keys)).bucket_fill:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        finally:
            await client_redis.aclose()


async def test_an_idle_teams_bucket_reads_refilled_in_status_and_metrics(
    settings: Settings,
) -> None:
    # Given team alpha allowed 60 requests a minute, 2 at once, its live stats written often
    settings = settings.model_copy(update={"stats_interval": 0.1})
    await register(settings, "alpha", TeamConfig(rpm=60, burst=2))
    async with (
        MetricsServer("127.0.0.1", 0, lambda: True) as server,
        running_gateway(settings) as gw,
        gw.client("alpha") as client,
        StatusReader(settings) as reader,
    ):
        # When 3 jobs drain its bucket (the third waits for it), then nothing more comes
        results = await asyncio.gather(*(client.chat("gpt-4o-mini", HELLO) for _ in range(3)))
        assert {r.status for r in results} == {"ok"}
        drained = time.monotonic()

        # Expect the bucket read full again, in the metric and in `queuegate status`, once
        # it has had its 2 s to refill, though nothing took from it since
        async def fills() -> tuple[float | None, float | None]:
            metric = _at(await _scrape(server), "queuegate_bucket_fill_ratio", team="alpha")
            [team] = (await reader.read(["alpha"])).teams
            return metric, team.bucket_fill

        async with asyncio.timeout(15):
            # Polled: workers refresh it every stats_interval, unannounced.
            while not all(f is not None and f > 0.95 for f in await fills()):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert time.monotonic() - drained > 1.5  # refilled by the rate, not at once


async def test_a_team_short_of_tokens_reads_so_in_status_and_metrics(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given team alpha allowed 6,000 requests and 1,000 tokens a minute, beta 1,000 tokens
    # and no request limit, their live stats written often
    settings = settings.model_copy(update={"stats_interval": 0.1})
    configs = {"alpha": TeamConfig(rpm=6000, tpm=1000), "beta": TeamConfig(tpm=1000)}
    for team, config in configs.items():
        await register(settings, team, config)
    async with (
        MetricsServer("127.0.0.1", 0, lambda: True) as server,
        running_gateway(settings),
        StatusReader(settings) as reader,
    ):
        # When jobs took 900 of each team's tokens (one request), as jobs waiting for tokens
        # leave their buckets
        keys = Keys(settings.redis_prefix)
        for team, config in configs.items():
            limit = Limit(keys.team_bucket(team), f"team {team}", config.rpm, config.tpm)
            await Scripts(redis_client, keys).run(take_call([limit], 900))

        # Expect each bucket read as its tokens' fill (about 0.1, refilling 1.7 % a second),
        # not its requests' (alpha's full) nor none (beta), in the metric and in `status`
        async def fills() -> list[float | None]:
            samples = await _scrape(server)
            read = (await reader.read(list(configs))).teams
            return [_at(samples, "queuegate_bucket_fill_ratio", team=t) for t in configs] + [
                team.bucket_fill for team in read
            ]

        async with asyncio.timeout(5):
            # Polled: workers refresh it every stats_interval, unannounced.
            while not all(f is not None and f < 0.2 for f in await fills()):  # noqa: ASYNC110
                await asyncio.sleep(0.05)


def _broken_primary(tmp_path: Path) -> Path:
    """A catalog whose alias ``primary`` has one deployment (``broken-dep``, on the mock's
    model ``broken``), tried twice a job, whose breaker opens after two failures, and which
    falls back to a healthy alias."""
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(
        """
resilience:
  retry: {attempts: 2, base_delay: 0.01, max_delay: 0.02}
  breaker: {failures: 2, ratio: 0.5, window: 60, cooldown: 60}
models:
  primary:
    fallbacks: [backup]
    deployments:
      - {name: broken-dep, provider: openai, model: broken, api_base: "${QUEUEGATE_MOCK_URL}",
         api_key_env: QUEUEGATE_MOCK_KEY, input_per_mtok: 1, output_per_mtok: 2}
  backup:
    deployments:
      - {name: backup-dep, provider: openai, model: steady, api_base: "${QUEUEGATE_MOCK_URL}",
         api_key_env: QUEUEGATE_MOCK_KEY, input_per_mtok: 1, output_per_mtok: 2}
"""
    )
    return catalog


async def test_a_breaker_opening_retries_and_fallbacks_are_recorded(
    settings: Settings, tmp_path: Path
) -> None:
    # Given an alias whose deployment fails every call (two attempts each), whose breaker
    # opens after two failures, and which falls back to a healthy alias
    catalog = _broken_primary(tmp_path)
    broken = MockConfig(models={"broken": Behavior(error_rate=1.0)})
    async with (
        MetricsServer("127.0.0.1", 0, lambda: True) as server,
        running_gateway(settings, catalog=catalog, mock_config=broken) as gw,
        gw.client("alpha") as client,
    ):
        before = await _scrape(server)
        # When a job is served
        result = await client.chat("primary", HELLO)
        assert result.status == "ok" and result.gateway.fallback_used
        after = await _scrape(server)

    # Expect the open breaker, the retries and the fallback on the live endpoint
    assert _at(after, "queuegate_breaker_state", deployment="broken-dep") == 2
    labels = {"team": "alpha", "model": "primary"}
    for name, grew in (("queuegate_retries_total", 2), ("queuegate_fallbacks_total", 1)):
        assert (_at(after, name, **labels) or 0) - (_at(before, name, **labels) or 0) == grew


async def test_an_open_breakers_gauge_reads_closed_once_its_shared_state_lapses(
    settings: Settings, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    # Given a deployment whose breaker a job opened, and live stats written often
    settings = settings.model_copy(update={"stats_interval": 0.1})
    broken = MockConfig(models={"broken": Behavior(error_rate=1.0)})
    async with (
        MetricsServer("127.0.0.1", 0, lambda: True) as server,
        running_gateway(settings, catalog=_broken_primary(tmp_path), mock_config=broken) as gw,
        gw.client("alpha") as client,
    ):
        assert (await client.chat("primary", HELLO)).gateway.fallback_used

        async def gauge() -> float | None:
            return _at(await _scrape(server), "queuegate_breaker_state", deployment="broken-dep")

        assert await gauge() == 2
        # When no call goes to it and its shared state lapses (its hash expires: gone here)
        await redis_client.delete(Keys(settings.redis_prefix).breaker("broken-dep"))

        # Expect the gauge closed too, as `queuegate deployments` then says, within a few
        # of the worker's ticks, not open until a call comes
        async with asyncio.timeout(10):
            # Polled: the worker reads it every stats_interval, unannounced.
            while await gauge() != 0:  # noqa: ASYNC110
                await asyncio.sleep(0.05)


async def test_a_team_whose_limits_are_removed_reads_no_bucket_fill(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given team alpha allowed 1,000 tokens a minute, 900 of them taken, read so (about 0.1)
    settings = settings.model_copy(update={"stats_interval": 0.1})
    await register(settings, "alpha", TeamConfig(tpm=1000))
    keys = Keys(settings.redis_prefix)
    async with (
        MetricsServer("127.0.0.1", 0, lambda: True) as server,
        running_gateway(settings) as gw,
        StatusReader(settings) as reader,
    ):
        limit = Limit(keys.team_bucket("alpha"), "team alpha", None, 1000)
        await Scripts(redis_client, keys).run(take_call([limit], 900))

        async def fills() -> tuple[float | None, float | None]:
            [alpha] = (await reader.read(["alpha"])).teams
            return _at(await _scrape(server), "queuegate_bucket_fill_ratio", team="alpha"), (
                alpha.bucket_fill
            )

        async with asyncio.timeout(5):
            while not all(f is not None and f < 0.2 for f in await fills()):  # noqa: ASYNC110
                await asyncio.sleep(0.05)

        # When its limits are removed
        admission = gw.worker.admission
        assert admission is not None
        assert await set_team_config(gw.pool, "alpha", TeamConfig())
        await wait_until(lambda: admission.config("alpha") == TeamConfig())

        # Expect no fill read any more, in the metric or in `status` (it kept 0.1, "jobs
        # wait", though the team has no bucket)
        async with asyncio.timeout(5):
            while await fills() != (None, None):  # noqa: ASYNC110
                await asyncio.sleep(0.05)


def test_a_teams_bucket_series_are_looked_up_once_and_made_again_once_removed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # ``labels`` costs a few µs, and a governed job records a bucket's wait and fill.
    looked: Counter[str] = Counter()
    for name in ("BUCKET_WAIT", "BUCKET_FILL"):
        metric = getattr(metrics, name)

        def labels(*values: str, _real: Any = metric.labels, _name: str = name) -> Any:
            looked[_name] += 1
            return _real(*values)

        monkeypatch.setattr(metric, "labels", labels)
    team = "series-looked-up-once"
    # Given a team whose jobs took from its buckets three times
    for _ in range(3):
        metrics.set_bucket_fill(team, 0.5)
        metrics.observe_bucket_wait(team, 0.0)
    assert looked == {"BUCKET_WAIT": 1, "BUCKET_FILL": 1}
    # When its limits are removed, then set again
    others = set(metrics.gauge_values(metrics.BUCKET_FILL)) - {team}
    metrics.keep_bucket_fills(others)
    assert team not in metrics.gauge_values(metrics.BUCKET_FILL)
    metrics.set_bucket_fill(team, 0.25)
    # Expect its fill read again, from a series made anew
    assert metrics.gauge_values(metrics.BUCKET_FILL)[team] == 0.25
    metrics.keep_bucket_fills(others)
