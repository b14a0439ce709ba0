"""Provider keys never leave the worker: not in logs, results, dead letters, tables or Redis."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import uuid
from pathlib import Path

import aio_pika
import pytest
import redis.asyncio as aioredis

from accounting import Accountant
from mockprovider import Behavior, MockConfig, MockProvider
from producer import GatewayClient
from queuegate.db import create_pool, quote_ident
from queuegate.settings import Settings
from queuegate.topology import Topology
from tests.chaos.harness import declare_teams

CATALOG = """
models:
  env-ok:
    deployments:
      - {{name: env, provider: openai, model: env-model, api_base: "{url}",
         api_key_env: QUEUEGATE_MOCK_KEY, input_per_mtok: 1, output_per_mtok: 1}}
  file-ok:
    deployments:
      - {{name: file, provider: anthropic, model: file-model, api_base: "{url}",
         api_key_file: "{key_file}", input_per_mtok: 1, output_per_mtok: 1}}
  echoes-key:
    deployments:
      - {{name: echo, provider: openai, model: echo-model, api_base: "{url}",
         api_key_env: QUEUEGATE_MOCK_KEY, input_per_mtok: 1, output_per_mtok: 1}}
  refuses:
    deployments:
      - {{name: refuse, provider: anthropic, model: bad-model, api_base: "{url}",
         api_key_file: "{key_file}", input_per_mtok: 1, output_per_mtok: 1}}
  no-key-file:
    deployments:
      - {{name: nofile, provider: openai, model: env-model, api_base: "{url}",
         api_key_file: "{missing}", input_per_mtok: 1, output_per_mtok: 1}}
"""

EXPECTED = {
    "env-ok": "ok",
    "file-ok": "ok",
    "echoes-key": "all_providers_failed",
    "refuses": "invalid_request",
    "no-key-file": "all_providers_failed",
    "no-such-model": "unknown_model",
}


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_sentinel_keys_appear_nowhere_after_failing_and_succeeding_jobs(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture, log_format: str
) -> None:
    caplog.set_level(logging.DEBUG)
    env_key = f"sk-SENTINEL-env-{uuid.uuid4().hex}"
    file_key = f"sk-SENTINEL-file-{uuid.uuid4().hex}"
    key_file = tmp_path / "anthropic.key"
    key_file.write_text(file_key + "\n")
    # Given a provider that echoes the key in its 401s and refuses one model's requests as 400
    echo = {"error": {"message": f"Incorrect API key provided: {env_key}", "type": "auth"}}
    faults = MockConfig(
        models={
            "echo-model": Behavior(error_rate=1.0, error_status=401, error_body=echo),
            "bad-model": Behavior(
                error_rate=1.0,
                error_status=400,
                error_body={"error": {"message": f"bad request for key {file_key}"}},
            ),
        }
    )
    async with MockProvider(faults) as mock:
        catalog = tmp_path / "catalog.yaml"
        catalog.write_text(
            CATALOG.format(url=mock.url, key_file=key_file, missing=tmp_path / "missing.key")
        )
        await declare_teams(settings, ("alpha",))
        async with Accountant(settings) as accountant:
            stop = asyncio.Event()
            accounting = asyncio.create_task(accountant.run(stop))
            # ... and a worker process holding the keys, logging everything at debug (as
            # human lines, or JSON ones)
            worker = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "cli",
                "worker",
                "--teams",
                "alpha",
                "--catalog",
                str(catalog),
                "--log-level",
                "debug",
                env={
                    **os.environ,
                    "QUEUEGATE_NAMESPACE": settings.namespace,
                    "QUEUEGATE_METRICS_PORT": "0",  # any free port: several workers share the host
                    "QUEUEGATE_DATABASE_SCHEMA": settings.database_schema,
                    "QUEUEGATE_MOCK_KEY": env_key,
                    "QUEUEGATE_LOG_FORMAT": log_format,
                },
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                # When jobs that succeed and fail in every way run through it
                async with GatewayClient(settings, team="alpha") as client:
                    jobs = {
                        model: await client.submit(
                            client.job(model, [{"role": "user", "content": f"hi {model}"}])
                        )
                        for model in EXPECTED
                    }
                    results = {model: await job.result(30) for model, job in jobs.items()}
                async with asyncio.timeout(10):
                    await accountant.wait_until(lambda: accountant.rows_inserted >= len(EXPECTED))
            finally:
                worker.send_signal(signal.SIGTERM)
                _, stderr = await asyncio.wait_for(worker.communicate(), timeout=20)
                stop.set()
                await accounting

    # Expect each job ended as designed, with the keys really sent to the provider
    assert {m: r.error.code if r.error else r.status for m, r in results.items()} == EXPECTED
    assert any(call.had_key and call.model == "file-model" for call in mock.requests)
    assert any(call.had_key and call.model == "env-model" for call in mock.requests)
    # ... and neither key anywhere we can look
    seen = {
        "worker stderr": stderr.decode(errors="replace"),
        "test logs": caplog.text,
        "results": "\n".join(r.model_dump_json() for r in results.values()),
        "dead letters": await _dead_letters(settings),
        "tables": await _every_row(settings),
        "redis": await _redis_values(settings),
    }
    assert "DEBUG" in seen["worker stderr"] and "now serving team alpha" in seen["worker stderr"]
    # ... the operator told at start where the key file of one deployment is missing, and
    # its job only that the deployment has no key
    missing = str(tmp_path / "missing.key")
    assert f"deployment nofile has no key: cannot read {missing}" in seen["worker stderr"]
    assert missing not in seen["results"] and "no key is configured" in seen["results"]
    for where, text in seen.items():
        for key in (env_key, file_key):
            assert key not in text, f"a provider key leaked into {where}"
        assert "SENTINEL" not in text, f"part of a provider key leaked into {where}"


async def _dead_letters(settings: Settings) -> str:
    connection = await aio_pika.connect(settings.amqp_url)
    texts = []
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(Topology(settings.namespace).team_dead_queue("alpha"))
        while (message := await queue.get(fail=False, no_ack=True)) is not None:
            texts.append(f"{message.headers!r} {message.body.decode(errors='replace')}")
    assert len(texts) == 2  # invalid_request and unknown_model
    return "\n".join(texts)


async def _every_row(settings: Settings) -> str:
    pool = await create_pool(settings)
    try:
        tables = await pool.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = $1",
            settings.database_schema,
        )
        rows = []
        for table in tables:
            query = f"SELECT row_to_json(t) FROM {quote_ident(table['table_name'])} t"
            rows += [str(row[0]) for row in await pool.fetch(query)]
    finally:
        await pool.close()
    assert len(rows) >= len(EXPECTED)
    return "\n".join(rows)


async def _redis_values(settings: Settings) -> str:
    """Every value under the namespace's prefix, whatever the key's type."""
    client = aioredis.from_url(settings.redis_url)
    readers = {
        b"string": client.get,
        b"hash": client.hgetall,
        b"list": lambda key: client.lrange(key, 0, -1),
        b"set": client.smembers,
        b"zset": lambda key: client.zrange(key, 0, -1, withscores=True),
        b"stream": client.xrange,
    }
    try:
        keys = [k async for k in client.scan_iter(match=f"{settings.redis_prefix}:*")]
        # A key may lapse between the scan and its read (a lock, a round trip's replies).
        kinds = [(key, await client.type(key)) for key in keys]
        values = [repr(await readers[kind](key)) for key, kind in kinds if kind != b"none"]
    finally:
        await client.aclose()
    assert values
    return "\n".join(values)


async def test_a_key_file_is_read_again_only_after_a_while(
    settings: Settings,
    redis_client: aioredis.Redis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a router whose deployment takes its key from a file
    from mockprovider.catalog import mock_deployment
    from queuegate.keys import Keys
    from router import Catalog, Router
    from router import router as router_module

    key_file = tmp_path / "provider.key"
    key_file.write_text("sk-first\n")
    entry = mock_deployment("d", "m", "http://127.0.0.1:1", api_key_file=str(key_file))
    del entry["api_key_env"]
    catalog = Catalog.model_validate({"models": {"m": {"deployments": [entry]}}})
    router = Router(catalog, {}, redis=redis_client, keys=Keys(settings.redis_prefix))
    [deployment] = catalog.models["m"].deployments
    first = router._key(deployment)

    # When the secret is rotated in place
    key_file.write_text("sk-second\n")
    within = router._key(deployment)
    monkeypatch.setattr(router_module, "KEY_FILE_REREAD", 0.0)
    after = router._key(deployment)

    # Expect the file not read on every call, and the new key once it is read again
    assert (first, within, after) == ("sk-first", "sk-first", "sk-second")
