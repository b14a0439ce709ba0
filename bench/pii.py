"""Precision and recall of each PII detector on the labelled sample the tests ship, how
fast the detectors scan (the cost a worker pays per job when a team's policy is on), and
what a large prompt's scan does to other teams' jobs.

    .venv/bin/python -m bench.pii [tests/data/pii_sample.jsonl]
    .venv/bin/python -m bench.pii --stall      # also: other teams' latency during 1 MiB scans

A finding counts as a true positive when its text equals a labelled value of its family;
prints a table and one JSON line. Scan speed is measured on the sample's text (dense with
PII) and on plain prose, each repeated to about 500 KB, best of 3 rounds; it is CPU-bound,
so other processes on the host slow it.

``--stall`` measures two things. In this process: how late a 1 ms timer fires on the event
loop while a 1 MiB prompt is scanned inline, in a thread, and through ``offload.find`` (the
helper process). Through the gateway (worker, mock and accounting as processes): the
latency of team ``bench``'s small jobs, one at a time, alone and while team ``pii`` (policy
``redact``) sends 1 MiB prompts holding PII one after another to the same worker.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.gateway import timed_chat
from bench.measure import latency_figures, percentile
from bench.stack import TEAM, running_stack
from producer import GatewayClient
from queuegate.db import create_pool
from queuegate.namespace import drop_namespace
from queuegate.registry import add_team
from queuegate.settings import Settings
from queuegate.tenancy import TeamSecurity, put_security
from workers.pii import KINDS, offload, scan

SAMPLE = Path(__file__).resolve().parent.parent / "tests" / "data" / "pii_sample.jsonl"


def measure(path: Path = SAMPLE) -> dict[str, dict[str, float]]:
    """Per family: tp, fp, fn, precision and recall over the sample."""
    tp: Counter[str] = Counter()
    fp: Counter[str] = Counter()
    fn: Counter[str] = Counter()
    for line in path.read_text("utf-8").splitlines():
        item = json.loads(line)
        text = item["text"]
        expected = Counter((p["kind"], p["value"]) for p in item["pii"])
        found = Counter((f.kind, text[f.start : f.end]) for f in scan(text))
        for kind in KINDS:
            exp = Counter({k: n for k, n in expected.items() if k[0] == kind})
            got = Counter({k: n for k, n in found.items() if k[0] == kind})
            hits = sum((exp & got).values())
            tp[kind] += hits
            fp[kind] += sum(got.values()) - hits
            fn[kind] += sum(exp.values()) - hits
    return {
        kind: {
            "tp": tp[kind],
            "fp": fp[kind],
            "fn": fn[kind],
            "precision": tp[kind] / (tp[kind] + fp[kind]) if tp[kind] + fp[kind] else 1.0,
            "recall": tp[kind] / (tp[kind] + fn[kind]) if tp[kind] + fn[kind] else 1.0,
        }
        for kind in KINDS
    }


PROSE = (
    "Summarise the attached meeting notes for the team. Keep the decisions, the owners "
    "and the open questions; leave out the small talk and anything already agreed last week. "
)
"""Ordinary prompt text without personal data: what most jobs look like."""


def scan_speed(text: str, *, target_bytes: int = 500_000, rounds: int = 3) -> dict[str, float]:
    """MB/s of ``scan`` over ``text`` repeated to about ``target_bytes``, and µs per 2 KB."""
    corpus = text * max(1, target_bytes // max(1, len(text)))
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        scan(corpus)
        best = min(best, time.perf_counter() - started)
    prompt = (text * (1 + 2048 // max(1, len(text))))[:2048]
    started = time.perf_counter()
    for _ in range(200):
        scan(prompt)
    per_prompt = (time.perf_counter() - started) / 200
    return {"mb_per_s": len(corpus) / best / 1e6, "us_per_2kb_prompt": per_prompt * 1e6}


MIB = 1_048_576
LARGE_TEAM = "pii"
SMALL_JOB = [{"role": "user", "content": "Summarise the benefits of a message queue in one line."}]


def large_prompt() -> str:
    """About 1 MiB of prose with an email address, a card number and an SSN in each 4 KB."""
    chunk = PROSE * 20 + " Mail jane.doe@example.com, card 4111 1111 1111 1111, SSN 123-45-6789. "
    return (chunk * (MIB // len(chunk) + 1))[:MIB]


async def timer_lateness(work: Callable[[], Awaitable[object]]) -> dict[str, float]:
    """How late a 1 ms timer fires on this loop while ``work`` runs (p50 and max, ms)."""
    late: list[float] = []
    done = asyncio.Event()

    async def tick() -> None:
        while not done.is_set():
            started = time.perf_counter()
            await asyncio.sleep(0.001)
            late.append((time.perf_counter() - started) * 1000 - 1)

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.05)  # the timer's lateness on an idle loop comes first
    idle = len(late)
    started = time.perf_counter()
    await work()
    elapsed = time.perf_counter() - started
    done.set()
    await ticker
    during = late[idle:] or [elapsed * 1000]
    return {
        "scan_ms": elapsed * 1000,
        "late_p50_ms": percentile(during, 50),
        "late_max_ms": max(during),
    }


async def loop_stall() -> dict[str, dict[str, float]]:
    """Timer lateness during one 1 MiB scan: inline, in a thread, in the helper process."""
    text = large_prompt()
    await offload.find(text)  # the helper process started, as in a worker that ran a while

    async def inline() -> None:
        scan(text)

    return {
        "inline": await timer_lateness(inline),
        "thread": await timer_lateness(lambda: asyncio.to_thread(scan, text)),
        "helper process": await timer_lateness(lambda: offload.find(text)),
    }


async def other_teams_latency(jobs: int = 200, large_jobs: int = 5) -> dict[str, dict[str, float]]:
    """Team ``bench``'s job latency, alone (``jobs`` of them) and while team ``pii`` sends
    1 MiB prompts one after another (at least ``jobs``, and until ``large_jobs`` are done)."""
    figures: dict[str, dict[str, float]] = {}
    created: list[Settings] = []
    try:
        async with running_stack(workers=0) as stack:
            created.append(stack.settings)
            pool = await create_pool(stack.settings)
            try:
                await add_team(pool, LARGE_TEAM)
                await put_security(pool, LARGE_TEAM, TeamSecurity(pii="redact"))
            finally:
                await pool.close()
            stack.env["QUEUEGATE_MAX_JOB_BYTES"] = str(2 * MIB)
            teams = f"{TEAM},{LARGE_TEAM}"
            await stack.spawn("worker", "worker", "--teams", teams, "--log-level", "warning")
            prompt = [{"role": "user", "content": large_prompt()}]
            async with (
                GatewayClient(stack.settings, team=TEAM) as small,
                GatewayClient(stack.settings, team=LARGE_TEAM) as large,
            ):
                one = timed_chat(small, SMALL_JOB)

                async def series(until: Callable[[], bool]) -> list[float]:
                    ms: list[float] = []
                    while len(ms) < jobs or not until():
                        ms.append(await one())
                    return ms

                await series(lambda: True)  # connections, pools and caches warm
                figures["alone"] = with_max(await series(lambda: True))
                large_ms: list[float] = []
                stop = asyncio.Event()

                async def flood() -> None:
                    while not stop.is_set():
                        started = time.perf_counter()
                        result = await large.chat("gpt-4o-mini", prompt, max_tokens=16, timeout=300)
                        if result.status != "ok":
                            raise RuntimeError(f"large job failed: {result.error}")
                        large_ms.append((time.perf_counter() - started) * 1000)

                flooding = asyncio.create_task(flood())
                during = await series(lambda: len(large_ms) >= large_jobs or flooding.done())
                figures["during 1 MiB redact jobs"] = with_max(during)
                stop.set()
                await flooding
                figures["the 1 MiB jobs themselves"] = with_max(large_ms)
    finally:
        for settings in created:  # the stack drops its own team's queue, not this one
            await drop_namespace(settings, [LARGE_TEAM])
    return figures


def with_max(ms: list[float]) -> dict[str, float]:
    return {**latency_figures(ms), "max_ms": max(ms), "count": len(ms)}


def print_stall(stall: dict[str, dict[str, float]], latency: dict[str, dict[str, float]]) -> None:
    console = Console()
    table = Table(title="Event loop: a 1 ms timer's lateness during one 1 MiB scan")
    for column in ("scan", "scan ms", "late p50 ms", "late max ms"):
        table.add_column(column, justify="left" if column == "scan" else "right")
    for name, f in stall.items():
        table.add_row(
            name, f"{f['scan_ms']:.0f}", f"{f['late_p50_ms']:.2f}", f"{f['late_max_ms']:.1f}"
        )
    console.print(table)
    table = Table(title=f"Team {TEAM}'s jobs, one at a time, through one worker")
    for column in ("while", "jobs", "p50 ms", "p90 ms", "p99 ms", "max ms"):
        table.add_column(column, justify="left" if column == "while" else "right")
    for name, f in latency.items():
        ms = (f"{f[key]:.1f}" for key in ("p50_ms", "p90_ms", "p99_ms", "max_ms"))
        table.add_row(name, str(int(f["count"])), *ms)
    console.print(table)


def main() -> None:
    args = [arg for arg in sys.argv[1:] if arg != "--stall"]
    path = Path(args[0]) if args else SAMPLE
    started = time.perf_counter()
    figures = measure(path)
    elapsed = time.perf_counter() - started
    lines = len(path.read_text("utf-8").splitlines())
    table = Table(title=f"PII detectors on {path.name} ({lines} lines, {elapsed * 1000:.0f} ms)")
    for column in ("family", "TP", "FP", "FN", "precision", "recall"):
        table.add_column(column, justify="left" if column == "family" else "right")
    for kind, f in figures.items():
        table.add_row(
            kind,
            str(f["tp"]),
            str(f["fp"]),
            str(f["fn"]),
            f"{f['precision']:.3f}",
            f"{f['recall']:.3f}",
        )
    sample_text = "\n".join(
        json.loads(line)["text"] for line in path.read_text("utf-8").splitlines()
    )
    speed = {"sample": scan_speed(sample_text), "prose": scan_speed(PROSE)}
    console = Console()
    console.print(table)
    for name, figure in speed.items():
        console.print(
            f"scan of {name}: {figure['mb_per_s']:.1f} MB/s, "
            f"{figure['us_per_2kb_prompt']:.0f} µs per 2 KB prompt"
        )
    report: dict[str, Any] = {"bench": "pii", "lines": lines, "detectors": figures, "scan": speed}
    if "--stall" in sys.argv[1:]:
        stall = asyncio.run(loop_stall())
        latency = asyncio.run(other_teams_latency())
        print_stall(stall, latency)
        report |= {"loop_stall": stall, "other_team_latency": latency}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
