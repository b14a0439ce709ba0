"""Teams take a deployment's buckets in turn across worker processes, not per process."""

from __future__ import annotations

from pathlib import Path

from mockprovider import Behavior, MockConfig, MockProvider
from producer import GatewayClient
from queuegate.settings import Settings
from tests.chaos.harness import collect, declare_teams, start_worker, stop_workers, worker_env
from tests.support import consumers, wait_until
from tests.test_admission import small_deployment

FLOOD = 30
"""Alpha's backlog: 15 s of the deployment's rate, longer than beta's jobs take."""
TRICKLE = 3


async def test_a_team_waits_behind_one_job_of_a_team_flooding_a_deployment_from_two_processes(
    settings: Settings, tmp_path: Path
) -> None:
    # Given a deployment allowing 120 requests a minute, one at a time (one call every 0.5 s),
    # and two worker processes serving teams alpha and beta, each holding half of alpha's
    # backlog of 30 jobs waiting for the deployment
    catalog = small_deployment(tmp_path, rpm=120, burst=1)
    async with MockProvider(MockConfig(default=Behavior(latency_ms=20))) as mock:
        await declare_teams(settings, ["alpha", "beta"])
        env = worker_env(settings, mock, QUEUEGATE_CATALOG=str(catalog))
        workers = [await start_worker(env, ["alpha", "beta"]) for _ in range(2)]
        try:
            await consumers(settings, ["alpha", "beta"], 2)
            async with (
                GatewayClient(settings, team="alpha") as alpha,
                GatewayClient(settings, team="beta") as beta,
            ):
                flood = [
                    await alpha.submit(alpha.job("small", [{"role": "user", "content": "alpha"}]))
                    for _ in range(FLOOD)
                ]
                await wait_until(lambda: mock.stats.calls >= 2)

                # When beta sends a job, one after the other
                ahead = []
                for i in range(TRICKLE):
                    before = len(mock.requests)
                    job = beta.job("small", [{"role": "user", "content": f"beta {i}"}])
                    result = await (await beta.submit(job)).result(timeout=30)
                    assert result.status == "ok"
                    since = [call.messages[0]["content"] for call in mock.requests[before:]]
                    ahead.append(since.index(f"beta {i}"))

                # Expect each called after at most one of alpha's (the call whose turn came
                # before it arrived, and one that may have left as it did), not behind the
                # jobs waiting in either process: the turns are the deployment's, not each
                # process's (each process let two of its own alpha jobs go first, ~5 in all)
                assert max(ahead) <= 2, ahead
                assert {r.status for r in await collect(flood, timeout=60)} == {"ok"}
        finally:
            await stop_workers(workers)
