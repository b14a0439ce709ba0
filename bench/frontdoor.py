"""The HTTP front door beside LiteLLM Proxy and beside the AMQP path, in the same run.

    .venv/bin/python -m bench floor frontdoor [--jobs 300]   # figures also against the floor
    .venv/bin/python -m bench.frontdoor [--jobs 300]         # the same two scenarios

For 1 and 2 processes of each (``queuegate api --processes N``, LiteLLM's ``--num_workers
N``), on one stack (mock provider at 0 ms, one worker, accounting), both proxies before the
same mock and called over HTTP by the same aiohttp client:

- one at a time, the mock alone, the front door, LiteLLM Proxy and ``GatewayClient`` (the
  AMQP path) take turns request by request, so all four meet the same machine load: p50 and
  p99, each less the mock's own (``overhead_*``), and the front door's over the AMQP path's
  (``over_amqp_*``);
- 64 at a time, the three in rounds that take turns: requests/s, CPU per request of every
  process each takes (the caller's client included, and shown alone: aiohttp for the two
  proxies, ``GatewayClient`` for the AMQP path), peak resident memory per serving process
  (a supervisor's workers, not the supervisor), and the front door's figures as ratios to
  LiteLLM's and to the AMQP path's.

The scenario prints two tables, ``frontdoor c=1`` and ``frontdoor c=64``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp

from bench.litellm_proxy import Proxy, running_litellm
from bench.measure import (
    CHAT_BODY,
    Figure,
    latency_figures,
    own_cpu,
    run_lanes,
)
from bench.stack import (
    TEAM,
    Stack,
    cpu_seconds,
    free_port,
    peak_rss_mb,
    process_tree,
    running_stack,
    wait_ready,
)
from producer import GatewayClient
from queuegate.db import create_pool
from queuegate.registry import TeamConfig
from queuegate.tenancy import add_api_key

PROCESS_COUNTS = (1, 2)
LOAD = 64
ROUNDS = 3
WARM_UP = 100
START_TIMEOUT = 60.0
ONE, LOADED = "frontdoor c=1", f"frontdoor c={LOAD}"
"""The two tables of the scenario (their columns differ)."""
SHOWN = frozenset({"frontdoor", "litellm", "worker1", "rabbitmq", "client"})
"""Processes whose CPU has a column of its own; the others are summed in ``rest``."""

MESSAGES = [{"role": "user", "content": "Summarise the benefits of a message queue."}]
"""``CHAT_BODY``'s messages, sent over AMQP."""
Call = Callable[[], Awaitable[float]]
"""One request; its latency in ms."""


async def frontdoor(*, jobs: int) -> list[Figure]:
    figures: list[Figure] = []
    for processes in PROCESS_COUNTS:
        figures += await compare(jobs=jobs, processes=processes)
    return figures


async def compare(*, jobs: int, processes: int) -> list[Figure]:
    """The front door and LiteLLM Proxy with ``processes`` processes each, and the AMQP path,
    on one stack: ``jobs`` requests of each one at a time, then ``jobs`` of each 64 at a time."""
    async with running_stack(workers=1, team=TeamConfig()) as stack:
        key = await _api_key(stack)
        port = free_port()
        args = ["api", "--port", str(port), "--log-level", "warning"]
        await stack.spawn("frontdoor", *args, *(["--processes", str(processes)] * (processes > 1)))
        door = f"http://127.0.0.1:{port}"
        await wait_ready(f"{door}/readyz", START_TIMEOUT)
        async with (
            running_litellm(stack.mock_url, workers=processes) as proxy,
            GatewayClient(stack.settings, team=TEAM) as amqp,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http,
        ):

            async def via_amqp() -> float:
                started = time.perf_counter()
                result = await amqp.chat("gpt-4o-mini", MESSAGES, max_tokens=16)
                if result.status != "ok":
                    raise RuntimeError(f"bench job failed: {result.error}")
                return (time.perf_counter() - started) * 1000

            paths = {
                "mock alone": _post(http, f"{stack.mock_url}/v1/chat/completions", {}),
                "front door": _post(
                    http, f"{door}/v1/chat/completions", {"Authorization": f"Bearer {key}"}
                ),
                "litellm proxy": _post(http, proxy.url, proxy.headers),
                "amqp path": via_amqp,
            }
            for call in paths.values():
                await run_lanes(call, WARM_UP, 16)  # connections, pools, every process warm
            one = await _in_turn(paths, jobs)
            processes_of = {
                "front door": lambda: _frontdoor_cpu(stack),
                "litellm proxy": lambda: _litellm_cpu(stack, proxy),
                "amqp path": lambda: _amqp_cpu(stack),
            }
            loaded = await _under_load(paths, processes_of, jobs)
            memory = {
                "front door": _serving_rss(stack.processes["frontdoor"].pid),
                "litellm proxy": _serving_rss(proxy.process.pid),
            }
    return _figures(processes, one, loaded, memory)


def _post(http: aiohttp.ClientSession, url: str, headers: Mapping[str, str]) -> Call:
    async def call() -> float:
        started = time.perf_counter()
        async with http.post(url, json=CHAT_BODY, headers=headers) as response:
            await response.read()
            response.raise_for_status()
        return (time.perf_counter() - started) * 1000

    return call


async def _in_turn(paths: Mapping[str, Call], jobs: int) -> dict[str, list[float]]:
    """``jobs`` requests of each path, one at a time, the paths taking turns request by
    request: every path meets the same load of the (shared) machine."""
    ms: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(jobs):
        for name, call in paths.items():
            ms[name].append(await call())
    return ms


async def _under_load(
    paths: Mapping[str, Call],
    processes_of: Mapping[str, Callable[[], dict[str, float]]],
    jobs: int,
) -> dict[str, dict[str, float]]:
    """``jobs`` requests of each path named in ``processes_of``, ``LOAD`` at a time, in
    ``ROUNDS`` rounds that take turns (the machine's load drifts over a run): requests/s,
    and the CPU per request of the processes ``processes_of`` names and of this one's
    client."""
    elapsed = dict.fromkeys(processes_of, 0.0)
    spent: dict[str, dict[str, float]] = {name: {} for name in processes_of}
    for _ in range(ROUNDS):
        for name, cpu in processes_of.items():
            before, started = {**cpu(), "client": own_cpu()}, time.perf_counter()
            await run_lanes(paths[name], jobs // ROUNDS, LOAD)
            elapsed[name] += time.perf_counter() - started
            after = {**cpu(), "client": own_cpu()}
            for process, seconds in after.items():
                spent[name][process] = spent[name].get(process, 0.0) + seconds - before[process]
    done = jobs // ROUNDS * ROUNDS
    return {name: _load_figures(done, elapsed[name], spent[name]) for name in processes_of}


def _load_figures(jobs: int, elapsed: float, spent: dict[str, float]) -> dict[str, float]:
    per_thousand = {process: seconds * 1000 / jobs for process, seconds in spent.items()}
    shown = {f"cpu_s/1k {p}": round(s, 3) for p, s in per_thousand.items() if p in SHOWN}
    rest = sum(s for p, s in per_thousand.items() if p not in SHOWN)
    return {
        "per_s": round(jobs / elapsed),
        **shown,
        "cpu_s/1k rest": round(rest, 3),
        "cpu_s/1k all": round(sum(per_thousand.values()), 3),
    }


def _tree_cpu(pid: int) -> float:
    return sum(cpu_seconds(p) for p in process_tree(pid))


def _frontdoor_cpu(stack: Stack) -> dict[str, float]:
    cpu = stack.cpu()
    cpu["frontdoor"] = _tree_cpu(stack.processes["frontdoor"].pid)  # a supervisor's too
    return cpu


def _litellm_cpu(stack: Stack, proxy: Proxy) -> dict[str, float]:
    return {"litellm": _tree_cpu(proxy.process.pid), "mock": stack.cpu()["mock"]}


def _amqp_cpu(stack: Stack) -> dict[str, float]:
    cpu = stack.cpu()
    del cpu["frontdoor"]
    return cpu


def _serving_rss(pid: int) -> float:
    """The largest peak resident memory of the processes that serve requests: the process
    itself, or the workers of a supervisor (which only starts and watches them)."""
    tree = process_tree(pid)
    serving = tree[1:] or tree
    return round(max(peak_rss_mb(p) for p in serving), 1)


def _figures(
    processes: int,
    one: dict[str, list[float]],
    loaded: dict[str, dict[str, float]],
    memory: dict[str, float],
) -> list[Figure]:
    plural = "es" if processes > 1 else ""
    label = {
        "front door": f"front door, {processes} process{plural}",
        "litellm proxy": f"litellm proxy, {processes} process{plural}",
        "amqp path": f"amqp path (beside {processes})",
    }
    mock = latency_figures(one["mock alone"])
    amqp = latency_figures(one["amqp path"])
    figures = [Figure(ONE, f"mock alone (beside {processes}), c=1", mock)]
    for name, case in label.items():
        ms = one[name]
        latency = latency_figures(ms)
        values: dict[str, Any] = {
            **latency,
            "overhead_p50_ms": round(latency["p50_ms"] - mock["p50_ms"], 2),
            "overhead_p99_ms": round(latency["p99_ms"] - mock["p99_ms"], 2),
            "per_s": round(len(ms) * 1000 / sum(ms)),
        }
        if name == "front door":
            values["over_amqp_p50_ms"] = round(latency["p50_ms"] - amqp["p50_ms"], 2)
            values["over_amqp_p99_ms"] = round(latency["p99_ms"] - amqp["p99_ms"], 2)
        figures.append(Figure(ONE, f"{case}, c=1", values))
    peer, door, path = loaded["litellm proxy"], loaded["front door"], loaded["amqp path"]
    for name, case in label.items():
        values = dict(loaded[name])
        if name in memory:
            values["rss_mb_per_process"] = memory[name]
        if name == "front door":
            values["per_s_vs_litellm"] = round(door["per_s"] / peer["per_s"], 2)
            values["cpu_vs_litellm"] = round(door["cpu_s/1k all"] / peer["cpu_s/1k all"], 2)
            values["rss_vs_litellm"] = round(memory[name] / memory["litellm proxy"], 2)
            values["per_s_vs_amqp"] = round(door["per_s"] / path["per_s"], 2)
            values["cpu_over_amqp"] = round(door["cpu_s/1k all"] - path["cpu_s/1k all"], 3)
        figures.append(Figure(LOADED, f"{case}, c={LOAD}", values))
    return figures


async def _api_key(stack: Stack) -> str:
    pool = await create_pool(stack.settings)
    try:
        _, key = await add_api_key(pool, TEAM)
    finally:
        await pool.close()
    return key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=300, help="requests per path and case")
    args = parser.parse_args()
    from bench.__main__ import main as run_scenarios
    from queuegate.runtime import run

    run(lambda: run_scenarios(["floor", "frontdoor"], args.jobs))


if __name__ == "__main__":
    main()
