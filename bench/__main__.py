"""``python -m bench [SCENARIO ...]``: measure the gateway and print a table per scenario.

Scenarios: floor, overhead, throughput, latency, goodput, accounting, litellm, frontdoor,
tracing, cluster, flood (default: all). ``litellm`` and ``frontdoor`` install LiteLLM Proxy into its
own virtual environment on first use; ``cluster`` boots RabbitMQ nodes of its own.
Figures are also written as JSON to bench/results/. Every scenario is bounded in count,
runs on loopback only, and starts and removes its own namespace and schema.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.accounting import accounting
from bench.cluster import cluster
from bench.flood import flood
from bench.floor import floor
from bench.frontdoor import frontdoor
from bench.gateway import overhead, throughput, tracing_cost
from bench.goodput import goodput
from bench.litellm_proxy import litellm
from bench.measure import Figure, against_floor
from bench.stack import own_broker, own_services
from queuegate.settings import Settings

RESULTS = Path(__file__).parent / "results"


def scenarios(jobs: int) -> dict[str, Callable[[], Awaitable[list[Figure]]]]:
    async def both_throughputs() -> list[Figure]:
        return [
            *[await throughput(jobs=jobs * 2, workers=n) for n in (1, 2)],
            await throughput(jobs=jobs * 2, workers=1, governed=True),
        ]

    async def latency_hiding() -> list[Figure]:
        return [await throughput(jobs=5000, workers=1, latency_ms=1000, prefetch=5000)]

    async def limited() -> list[Figure]:
        # Two workers share the deployment's bucket, as a pool would.
        return [await goodput(jobs=jobs * 2, workers=2)]

    async def usage() -> list[Figure]:
        return [
            *[await accounting(events=jobs * 10, accountants=n) for n in (1, 2)],
            await accounting(events=jobs * 10, accountants=1, batch=1),
        ]

    async def peer() -> list[Figure]:
        return [*await litellm(jobs=jobs, workers=1), *await litellm(jobs=jobs, workers=2)]

    return {
        "floor": lambda: floor(Settings(), jobs=jobs),
        "overhead": lambda: overhead(jobs=jobs),
        "throughput": both_throughputs,
        "latency": latency_hiding,
        "goodput": limited,
        "accounting": usage,
        "litellm": peer,
        "frontdoor": lambda: frontdoor(jobs=jobs),
        "tracing": lambda: tracing_cost(jobs=jobs * 2),
        "cluster": lambda: cluster(jobs=jobs * 2),
        "flood": lambda: flood(jobs=jobs),
    }


def table(name: str, figures: list[Figure]) -> Table:
    columns: list[str] = []
    for figure in figures:
        columns += [key for key in figure.values if key not in columns]
    out = Table(title=name)
    out.add_column("case")
    for column in columns:
        out.add_column(column, justify="right")
    for figure in figures:
        out.add_row(figure.case, *(_cell(figure.values.get(c)) for c in columns))
    return out


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


async def main(names: list[str], jobs: int, *, services: bool = False) -> None:
    async with contextlib.AsyncExitStack() as stack:
        if services:
            await stack.enter_async_context(own_services())
        await _measure(names, jobs)


async def _measure(names: list[str], jobs: int) -> None:
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # figures in CI logs and files stay one row per case
    available = scenarios(jobs)
    unknown = set(names) - set(available)
    if unknown:
        raise SystemExit(
            f"unknown scenario {', '.join(sorted(unknown))}: use {', '.join(available)}"
        )
    results: dict[str, list[dict[str, object]]] = {}
    measured_floor: list[Figure] = []
    for name in names or list(available):
        console.print(f"[dim]running {name}…[/]")
        figures = await available[name]()
        if name == "floor":
            measured_floor = figures
        elif measured_floor:
            against_floor(figures, measured_floor)
        # A scenario whose rows are of several kinds (their own columns) prints a table each.
        kinds = list(dict.fromkeys(figure.scenario for figure in figures))
        for kind in kinds:
            rows = [figure for figure in figures if figure.scenario == kind]
            console.print(table(name if len(kinds) == 1 else kind, rows))
        results[name] = [asdict(f) for f in figures]
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    meta = {"machine": platform.platform(), "python": platform.python_version(), "jobs": jobs}
    path.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    console.print(f"figures written to {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "scenario",
        nargs="*",
        help=", ".join(scenarios(0)),
    )
    parser.add_argument("--jobs", type=int, default=1000, help="jobs per measured case")
    parser.add_argument(
        "--own-broker",
        action="store_true",
        help="run every scenario on a RabbitMQ node of the bench's own (booted for the run), "
        "so that its CPU is the bench's alone on a machine others share",
    )
    parser.add_argument(
        "--own-services",
        action="store_true",
        help="also run every scenario on a Redis and a PostgreSQL of the bench's own (no "
        "persistence, no fsync), so that their CPU per job is the bench's alone",
    )
    args = parser.parse_args()
    from queuegate.runtime import run

    with contextlib.ExitStack() as stack:
        if args.own_broker:
            stack.enter_context(
                own_broker(Path(stack.enter_context(tempfile.TemporaryDirectory())))
            )
        run(lambda: main(args.scenario, args.jobs, services=args.own_services))
