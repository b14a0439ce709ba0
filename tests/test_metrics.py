"""Prometheus metrics: their values agree with PostgreSQL, and the HTTP endpoints answer."""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from decimal import Decimal

import httpx
import pytest
from prometheus_client import REGISTRY

from queuegate.metrics_server import MetricsServer
from queuegate.settings import Settings
from tests.support import running_gateway
from workers import Worker

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
