"""An API key team's jobs prove the key without carrying it: nothing at rest can replay it."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import quote, urlsplit, urlunsplit

import aio_pika
import orjson
import pytest
from typer.testing import CliRunner

from admin.teams import add, create_broker_user, set_security
from cli.main import app
from producer import GatewayClient
from producer.client import job_message
from queuegate import dlq
from queuegate.broker import publish
from queuegate.errors import ConfigError
from queuegate.management import BrokerAdmin
from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from queuegate.signing import KEY_ID_HEADER, PROOF_HEADER, proof_matches, sign_job
from queuegate.tenancy import hash_api_key, new_api_key
from queuegate.topology import Topology
from tests.support import dead_letters, running_gateway

HELLO = [{"role": "user", "content": "Hello there"}]


@dataclass(frozen=True)
class KeyTeam:
    key: str
    key_id: str
    apps: Settings
    """Settings of the team's apps: a broker user of their own, which is no operator."""


@pytest.fixture
async def key_team(settings: Settings) -> AsyncIterator[KeyTeam]:
    """Team alpha identified by API key, its apps connecting as a user shared by apps."""
    await add(settings, "alpha")
    _, credentials = await set_security(settings, "alpha", identity="api_key")
    assert credentials is not None and credentials.api_key and credentials.api_key_id
    user, password = f"{settings.namespace}.apps", uuid.uuid4().hex
    await create_broker_user(settings, "alpha", user, password, TeamConfig())
    parts = urlsplit(settings.amqp_url)
    netloc = f"{quote(user)}:{password}@{parts.hostname}:{parts.port or 5672}"
    apps = settings.model_copy(update={"amqp_url": urlunsplit(parts._replace(netloc=netloc))})
    try:
        yield KeyTeam(credentials.api_key, credentials.api_key_id, apps)
    finally:
        async with BrokerAdmin.of(settings) as admin:
            await admin.delete_user(user)


async def cli(settings: Settings, monkeypatch: pytest.MonkeyPatch, *args: str) -> str:
    monkeypatch.setenv("QUEUEGATE_NAMESPACE", settings.namespace)
    monkeypatch.setenv("QUEUEGATE_DATABASE_SCHEMA", settings.database_schema)
    result = await asyncio.to_thread(CliRunner().invoke, app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


async def test_an_api_key_rests_nowhere_through_expiry_refusal_and_replay(
    settings: Settings,
    key_team: KeyTeam,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    # (a gateway serving another team answers the client's request for a reply queue)
    async with (
        running_gateway(settings, teams=("gamma",)),
        GatewayClient(key_team.apps, team="alpha", api_key=key_team.key) as client,
    ):
        # Given a job of alpha's that expired in its queue before any worker took it
        expired = client.job("gpt-4o-mini", HELLO)
        message = job_message(
            expired, reply_to=client.reply_to, user_id=key_team.apps.amqp_user, api_key=key_team.key
        )
        message.properties.expiration = "1"
        connection = await aio_pika.connect(key_team.apps.amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            await publish(
                channel,
                message,
                exchange=Topology(settings.namespace).entry_exchange("alpha"),
                routing_key="alpha",
            )
        await dead_letters(settings, 1)
        async with running_gateway(settings, teams=("alpha",)) as gw:
            # ... and one a worker refused (an unknown model)
            refused = await client.chat("no-such-model", HELLO, timeout=10)
            assert refused.error is not None and refused.error.code == "unknown_model"
            letters = await dead_letters(settings, 2)
            # When the operator shows each dead letter, then replays the expired job
            shown = [
                await cli(settings, monkeypatch, "dlq", "show", x.message_id or "") for x in letters
            ]
            replayed, _ = await dlq.replay(settings, {expired.job_id})
            assert len(replayed) == 1
            # Expect the replay served once, proven by the job's own proof of the key
            result = await client.wait(expired.job_id, timeout=10)
            assert result.status == "ok", result.error
            rows = await gw.usage_rows(2)
            [identity] = [row["identity"] for row in rows if row["job_id"] == expired.job_id]
            assert identity == (
                f"operator:{settings.amqp_user}(replay of api_key:{key_team.key_id})"
            )
    # ... and neither the key nor its stored hash in any message, listing or log line
    seen = {
        "dead letters": "\n".join(f"{x.headers!r} {x.body!r}" for x in letters),
        "dlq show": "\n".join(shown),
        "logs": caplog.text,
    }
    assert all(KEY_ID_HEADER in x.headers and PROOF_HEADER in x.headers for x in letters)
    for where, text in seen.items():
        for secret in (key_team.key, key_team.key.split("_", 2)[2], hash_api_key(key_team.key)):
            assert secret not in text, f"the API key leaked into {where}"


async def test_what_a_client_chose_is_logged_cut_short_and_the_key_never(
    settings: Settings, key_team: KeyTeam, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with (
        running_gateway(settings, teams=("alpha",)),
        GatewayClient(key_team.apps, team="alpha", api_key=key_team.key) as client,
    ):
        # Given jobs of alpha's sent under an 8,000-character key id, the first with its
        # own key's id before it, and one also naming an 8,000-character parameter
        long_id = key_team.key_id + "f" * 8000
        named = "p" * 8000
        jobs = [client.job("gpt-4o-mini", HELLO), client.job("gpt-4o-mini", HELLO)]
        connection = await aio_pika.connect(key_team.apps.amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            for job, params in zip(jobs, [{}, {named: "\x00"}], strict=True):
                signed = job_message(
                    job,
                    reply_to=client.reply_to,
                    user_id=key_team.apps.amqp_user,
                    api_key=key_team.key,
                )
                message = aio_pika.Message(
                    orjson.dumps(orjson.loads(signed.body) | {"params": params}),
                    headers=dict(signed.properties.headers or {}) | {KEY_ID_HEADER: long_id},
                    message_id=job.job_id,
                    reply_to=client.reply_to,
                    user_id=key_team.apps.amqp_user,
                )
                await publish(
                    channel,
                    message,
                    exchange=Topology(settings.namespace).entry_exchange("alpha"),
                    routing_key="alpha",
                )
        # When the workers refuse them
        results = [await client.wait(job.job_id, timeout=10) for job in jobs]
        assert [r.error.code if r.error else None for r in results] == [
            "unauthorized",
            "invalid_request",
        ]
    # Expect each refusal logged with 64 characters of the key id and of the parameter's
    # name, an ellipsis saying they were cut, and never the key
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 2, refusals
    assert all(f"api_key={long_id[:64]}…" in line for line in refusals), refusals
    assert f"{named[:64]}…: a NUL byte is not allowed" in refusals[1]
    assert all(len(line) < 400 for line in refusals), refusals
    assert "f" * 65 not in caplog.text and "p" * 65 not in caplog.text
    assert key_team.key.split("_", 2)[2] not in caplog.text


async def test_a_key_id_holding_nul_is_refused_and_its_refusal_billed_on_a_row(
    settings: Settings, key_team: KeyTeam
) -> None:
    async with (
        running_gateway(settings, teams=("alpha",)) as gw,
        GatewayClient(key_team.apps, team="alpha", api_key=key_team.key) as client,
    ):
        # Given a job of alpha's sent under a key id holding NUL, which PostgreSQL text cannot
        # store (accounting's tests put one in every other text of a usage event)
        job = client.job("gpt-4o-mini", HELLO)
        signed = job_message(
            job, reply_to=client.reply_to, user_id=key_team.apps.amqp_user, api_key=key_team.key
        )
        message = aio_pika.Message(
            signed.body,
            headers=dict(signed.properties.headers or {}) | {KEY_ID_HEADER: "ab\x00cd"},
            message_id=job.job_id,
            reply_to=client.reply_to,
            user_id=key_team.apps.amqp_user,
        )
        connection = await aio_pika.connect(key_team.apps.amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            await publish(
                channel,
                message,
                exchange=Topology(settings.namespace).entry_exchange("alpha"),
                routing_key="alpha",
            )

        # When a worker refuses it
        result = await client.wait(job.job_id, timeout=10)
        assert result.error is not None and result.error.code == "unauthorized"

        # Expect its refusal on a usage row, under the key id it claimed with NUL replaced
        [row] = await gw.usage_rows(1)
        assert row["job_id"].startswith(f"{job.job_id}/refused/")
        assert row["error_code"] == "unauthorized"
        assert row["identity"].endswith(",api_key=ab\ufffdcd")


def test_a_proof_holds_for_its_own_job_id_team_and_body_only() -> None:
    _, key = new_api_key()
    headers = sign_job(key, job_id="j1", team="alpha", body=b"{}")
    stored = hash_api_key(key)
    proof = headers[PROOF_HEADER]
    assert proof_matches(stored, proof, job_id="j1", team="alpha", body=b"{}")
    assert not proof_matches(stored, proof, job_id="j2", team="alpha", body=b"{}")
    assert not proof_matches(stored, proof, job_id="j1", team="beta", body=b"{}")
    assert not proof_matches(stored, proof, job_id="j1", team="alpha", body=b"{ }")
    assert not proof_matches(
        hash_api_key(new_api_key()[1]), proof, job_id="j1", team="alpha", body=b"{}"
    )
    assert key not in str(headers) and stored not in str(headers)
    with pytest.raises(ConfigError, match="not a queuegate API key"):
        sign_job("sk-not-ours", job_id="j1", team="alpha", body=b"{}")


async def test_a_proof_copied_onto_another_job_is_refused(
    settings: Settings, key_team: KeyTeam
) -> None:
    async with (
        running_gateway(settings, teams=("alpha",)) as gw,
        GatewayClient(key_team.apps, team="alpha", api_key=key_team.key) as client,
    ):
        # Given a proof read from one of alpha's jobs (as from a dead letter)
        signed = job_message(
            client.job("gpt-4o-mini", HELLO),
            reply_to=client.reply_to,
            user_id=key_team.apps.amqp_user,
            api_key=key_team.key,
        )
        proof = dict(signed.properties.headers or {})
        # When someone able to publish for alpha sends another job under that proof
        other = client.job("gpt-4o-mini", [{"role": "user", "content": "bill alpha for this"}])
        forged = job_message(other, reply_to=client.reply_to, user_id=key_team.apps.amqp_user)
        forged.properties.headers = proof
        connection = await aio_pika.connect(key_team.apps.amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            await publish(
                channel,
                forged,
                exchange=Topology(settings.namespace).entry_exchange("alpha"),
                routing_key="alpha",
            )
        # Expect it refused, and no provider call
        result = await client.wait(other.job_id, timeout=10)
        assert result.error is not None and result.error.code == "unauthorized"
        assert (
            result.error.message
            == f"the proof of API key {key_team.key_id} does not match this job"
        )
        assert gw.mock.stats.calls == 0
