"""A job's path end to end: producer → broker → worker → mock provider → result + usage row."""

from __future__ import annotations

import asyncio
import json
import uuid
from decimal import Decimal
from pathlib import Path

import aio_pika
import orjson
import pytest
from pydantic import ValidationError

from admin.teams import configure, in_force
from mockprovider import Behavior, MockConfig
from queuegate.errors import ResultTimeout
from queuegate.registry import ModelLimits, TeamConfig
from queuegate.settings import Settings
from queuegate.topology import HEADER_DEAD_REASON
from tests import openai_message_cases, openai_param_cases
from tests.support import depth, running_accountant, running_gateway
from tests.teams import register
from workers.gate import Gate
from workers.reply_queues import ReplyQueues

HELLO = [{"role": "user", "content": "Hello there"}]
REFUSED = [(HELLO, params, param) for params, param in openai_param_cases.REFUSED] + [
    (messages, {}, param) for messages, param in openai_message_cases.REFUSED
]
"""Jobs' messages and parameters the front door refuses, and the path of the field at fault."""
ENUMS = openai_param_cases.ENUMS | openai_message_cases.ENUMS


@pytest.mark.parametrize(
    ("alias", "provider"),
    [
        ("gpt-4o-mini", "openai"),
        ("claude-haiku", "anthropic"),
        ("local-llama", "openai_compatible"),
    ],
)
async def test_each_provider_kind_answers_and_is_accounted(
    settings: Settings, alias: str, provider: str
) -> None:
    # Given a gateway serving team alpha
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        # When the team asks one model
        result = await client.chat(alias, HELLO, max_tokens=20, timeout=10)

        # Expect an OpenAI-shaped answer from that provider kind, and one usage row
        assert result.status == "ok", result.error
        assert result.response is not None
        assert result.response["object"] == "chat.completion"
        assert result.content and "Hello there" in result.content
        assert result.gateway.model_used == alias
        assert result.gateway.provider == provider
        assert not result.gateway.fallback_used
        assert result.gateway.cost_usd > 0
        [row] = await gw.usage_rows(1)
        assert row["job_id"] == result.job_id
        assert row["team"] == "alpha"
        assert row["status"] == "ok"
        assert row["input_tokens"] == result.response["usage"]["prompt_tokens"]
        assert row["output_tokens"] == result.response["usage"]["completion_tokens"]
        assert Decimal(row["cost_usd"]) == result.gateway.cost_usd


async def test_a_failing_primary_falls_back_and_says_so(settings: Settings) -> None:
    # Given flaky-gpt answering 500 to everything, with claude-haiku as its fallback
    faults = MockConfig(models={"flaky-gpt": Behavior(error_rate=1.0, error_status=500)})
    async with running_gateway(settings, mock_config=faults) as gw, gw.client("alpha") as client:
        result = await client.chat("flaky-gpt", HELLO, timeout=10)

        assert result.status == "ok"
        assert result.gateway.model_used == "claude-haiku"
        assert result.gateway.fallback_used
        assert [(a.model, a.status) for a in result.gateway.attempts] == [
            ("flaky-gpt", 500),
            ("flaky-gpt", 500),  # retried once by default
            ("claude-haiku", 200),
        ]
        [row] = await gw.usage_rows(1)
        assert row["fallback_used"] and row["model_used"] == "claude-haiku"
        assert row["attempts"] == 3


async def test_a_team_capping_a_models_spend_never_falls_back_to_it_from_another(
    settings: Settings,
) -> None:
    # Given team alpha capping claude-haiku's spend, and flaky-gpt, whose fallback it is in
    # the catalog, answering 500 to everything
    capped = {"claude-haiku": ModelLimits(budget_usd=Decimal(1))}
    await register(settings, "alpha", TeamConfig(models=capped))
    faults = MockConfig(models={"flaky-gpt": Behavior(error_rate=1.0, error_status=500)})
    async with running_gateway(settings, mock_config=faults) as gw, gw.client("alpha") as client:
        # When a job asks flaky-gpt, another names claude-haiku among its own fallbacks, and a
        # third asks claude-haiku itself
        fell = await client.chat("flaky-gpt", HELLO, timeout=10)
        named = await client.submit(client.job("flaky-gpt", HELLO, fallbacks=["claude-haiku"]))
        named_result = await named.result(timeout=10)
        asked = await client.chat("claude-haiku", HELLO, timeout=10)

        # Expect the first two to fail on flaky-gpt's calls alone, saying why claude-haiku
        # was not tried (its cap counts the jobs that ask for it: passed unseen before); the
        # third served by claude-haiku, held to its cap
        for result in (fell, named_result):
            assert result.status == "error" and result.error is not None
            assert {a.model for a in result.gateway.attempts} == {"flaky-gpt"}, result.gateway
            assert "claude-haiku: not a fallback of this job's: its team caps" in (
                result.error.message
            )
        assert asked.status == "ok" and asked.gateway.model_used == "claude-haiku"


CAPPED = {"claude-haiku": {"budget_usd": "1"}}


@pytest.mark.parametrize(
    ("before", "after"), [({}, CAPPED), (CAPPED, {})], ids=["cap set", "cap cleared"]
)
async def test_a_cap_changed_while_a_job_is_in_its_primarys_call_keeps_it_from_falling_back(
    settings: Settings, before: dict[str, object], after: dict[str, object]
) -> None:
    # Given team alpha with a budget, and flaky-gpt, whose fallback is claude-haiku,
    # answering 500 after 3 s (twice: it is retried once before the job falls back)
    await register(settings, "alpha", TeamConfig(budget_usd=Decimal(1)))
    slow_fail = Behavior(latency_ms=3000, error_rate=1.0, error_status=500)
    faults = MockConfig(models={"flaky-gpt": slow_fail})
    async with running_gateway(settings, mock_config=faults) as gw, gw.client("alpha") as client:
        change = await configure(settings, "alpha", {"models": before})
        assert (await in_force(settings, change.change, 5)).pending == []
        # When a job of flaky-gpt is in its first call, and a cap on claude-haiku is put in
        # force on every worker, or cleared
        handle = await client.submit(client.job("flaky-gpt", HELLO))
        async with asyncio.timeout(10):
            await gw.mock.wait_for_arrivals(1)
        change = await configure(settings, "alpha", {"models": after})
        assert (await in_force(settings, change.change, 5)).pending == []
        assert gw.mock.stats.calls < 2  # still calling flaky-gpt: the fallback not chosen
        result = await handle.result(timeout=30)

    # Expect its fallback left out either way: capped from the moment the cap is in force
    # (before, the job fell back to it, the cap read as the job began), and once the job was
    # priced without it, never reserved for (before, it was then served past the budget)
    assert result.status == "error" and result.error is not None
    assert {a.model for a in result.gateway.attempts} == {"flaky-gpt"}, result.gateway
    # ... its error saying why either way (attack ad: a cleared cap was still named as held)
    assert "claude-haiku: not a fallback of this job's: its team caps that model's spend, or " in (
        result.error.message
    )
    assert "did when the job was priced" in result.error.message


async def test_the_usage_row_of_a_fallen_back_job_lists_every_attempt(settings: Settings) -> None:
    # Given flaky-gpt answering 500 to everything, with claude-haiku as its fallback
    faults = MockConfig(models={"flaky-gpt": Behavior(error_rate=1.0, error_status=500)})
    async with running_gateway(settings, mock_config=faults) as gw, gw.client("alpha") as client:
        # When a job asks flaky-gpt
        result = await client.chat("flaky-gpt", HELLO, timeout=10)

        # Expect its usage row to name each call's deployment, status and error class, in order
        [row] = await gw.usage_rows(1)
        assert [(a["deployment"], a["status"], a["error"]) for a in row["attempt_log"]] == [
            ("openai-flaky", 500, "server_error"),
            ("openai-flaky", 500, "server_error"),
            ("anthropic-main", 200, None),
        ]
        assert row["attempt_log"] == [a.model_dump() for a in result.gateway.attempts]


async def test_a_timed_out_primary_falls_back(settings: Settings, tmp_path: Path) -> None:
    # Given a primary that hangs longer than its 0.3 s timeout
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(
        """
models:
  slow:
    fallbacks: [fast]
    deployments:
      - {name: slow-1, provider: openai, model: slow, api_base: "${QUEUEGATE_MOCK_URL}",
         api_key_env: QUEUEGATE_MOCK_KEY,
         input_per_mtok: 1, output_per_mtok: 2, timeout: 0.3}
  fast:
    deployments:
      - {name: fast-1, provider: anthropic, model: fast, api_base: "${QUEUEGATE_MOCK_URL}",
         api_key_env: QUEUEGATE_MOCK_KEY, input_per_mtok: 1, output_per_mtok: 2}
"""
    )
    faults = MockConfig(models={"slow": Behavior(timeout_rate=1.0, hang_s=5)})
    async with (
        running_gateway(settings, mock_config=faults, catalog=catalog) as gw,
        gw.client("alpha") as client,
    ):
        result = await client.chat("slow", HELLO, timeout=10)

        assert result.status == "ok"
        assert result.gateway.model_used == "fast"
        assert result.gateway.attempts[0].error == "timeout"


async def test_all_providers_failing_is_answered_not_lost(settings: Settings) -> None:
    faults = MockConfig(default=Behavior(error_rate=1.0, error_status=503))
    async with running_gateway(settings, mock_config=faults) as gw, gw.client("alpha") as client:
        result = await client.chat("flaky-gpt", HELLO, timeout=10)

        assert result.status == "error"
        assert result.error is not None
        assert result.error.code == "all_providers_failed"
        assert result.error.attempts == 4  # each of the two deployments retried once
        [row] = await gw.usage_rows(1)
        assert row["status"] == "error" and row["error_code"] == "all_providers_failed"


def _raw_bodies(team: str) -> dict[str, bytes]:
    def good(kind: str) -> dict[str, object]:
        return {"job_id": kind, "team": team, "model": "gpt-4o-mini", "messages": HELLO}

    return {
        "not_json": b"\x00\xffnot json at all{",
        "not_a_job": orjson.dumps({"hello": "world"}),
        "wrong_types": orjson.dumps({**good("wrong_types"), "messages": "hi"}),
        "missing_team": orjson.dumps(
            {k: v for k, v in good("missing_team").items() if k != "team"}
        ),
        "unknown_model": orjson.dumps({**good("unknown_model"), "model": "gpt-99-imaginary"}),
        "forged_team": orjson.dumps({**good("forged_team"), "team": "beta"}),
        "mismatched_id": orjson.dumps(good("someone-elses-job")),
        "oversized": orjson.dumps(
            {**good("oversized"), "messages": [{"role": "user", "content": "x" * 2_000_000}]}
        ),
    }


EXPECTED_CODE = {
    "not_json": "invalid_request",
    "not_a_job": "invalid_request",
    "wrong_types": "invalid_request",
    "missing_team": "invalid_request",
    "unknown_model": "unknown_model",
    "forged_team": "unauthorized",
    "mismatched_id": "invalid_request",
    "oversized": "invalid_request",
}


async def test_bad_messages_are_answered_dead_lettered_and_the_worker_keeps_going(
    settings: Settings,
) -> None:
    # Given a running gateway and a client whose reply queue receives the error results
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        connection = await aio_pika.connect(settings.amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(gw.topology.jobs_exchange)
            # When every kind of bad message is published straight onto the team's queue
            for kind, body in _raw_bodies("alpha").items():
                await exchange.publish(
                    aio_pika.Message(
                        body, message_id=kind, correlation_id=kind, reply_to=client.reply_to
                    ),
                    routing_key="alpha",
                )
            # Expect an error result for each, with the right code
            for kind, code in EXPECTED_CODE.items():
                result = await client.wait(kind, timeout=10)
                assert result.status == "error", kind
                assert result.error is not None and result.error.code == code, kind
            # ... each original kept in the dead-letter queue with its reason
            dead = await gw.dead_letters(len(EXPECTED_CODE))
            reasons = {m.message_id: m.headers[HEADER_DEAD_REASON] for m in dead}
            assert reasons == EXPECTED_CODE
            # ... and the worker still serves good jobs
            result = await client.chat("gpt-4o-mini", HELLO, timeout=10)
            assert result.status == "ok"


@pytest.mark.parametrize(
    ("owner", "step"),
    [
        (Gate, "admit"),  # the gate's checks of its publisher
        (ReplyQueues, "exists"),  # whether its reply queue exists
    ],
)
async def test_a_job_the_worker_fails_on_before_its_claim_is_answered_once_not_returned(
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    owner: type,
    step: str,
) -> None:
    # Given a worker whose own code fails on one job, before the job's claim is taken
    settings = settings.model_copy(update={"delivery_limit": 2})
    original = getattr(owner, step)
    queues: list[str] = []  # the reply queue only that job is answered at, once opened
    tries = 0

    def of_the_job(arg: object) -> bool:
        return getattr(arg, "job_id", None) == "broken" or arg in queues

    async def failing(self: object, *args: object) -> object:
        nonlocal tries
        if any(map(of_the_job, args)):
            tries += 1
            raise RuntimeError("a bug in the worker")
        return await original(self, *args)

    monkeypatch.setattr(owner, step, failing)
    async with running_gateway(settings) as gw:
        async with gw.client("alpha") as client, gw.client("alpha") as broken_client:
            queues.append(broken_client.reply_to)
            # When it is published
            job = broken_client.job("gpt-4o-mini", HELLO, job_id="broken")
            handle = await broken_client.submit(job)

            # Expect it answered provider_error naming the exception, uncalled
            result = await handle.result(timeout=10)
            assert result.status == "error" and result.error is not None
            assert result.error.code == "provider_error"
            assert "RuntimeError" in result.error.message
            # ... and the next job served
            served = await client.chat("gpt-4o-mini", HELLO, timeout=10)
            assert served.status == "ok" and gw.mock.stats.calls == 1
            # ... accounted once, as a refusal is (on a row of its own, not the job id's)
            rows = await gw.usage_rows(2)
            assert len(rows) == 2
            [row] = [r for r in rows if r["job_id"].startswith("broken/")]
            assert row["job_id"].startswith("broken/refused/")
            assert row["error_code"] == "provider_error" and row["cost_usd"] == 0
            assert broken_client.duplicates == 0
        # ... acknowledged: never delivered again, nor back in its queue once the worker stops
        await gw.stop_worker()
        assert tries == 1
        assert await depth(settings, gw.topology.team_queue("alpha")) == 0
        # ... and logged once, in full
        failures = [r for r in caplog.records if "failed in the worker" in r.getMessage()]
        assert len(failures) == 1 and failures[0].exc_info is not None
        assert "answering it with an error" in failures[0].getMessage()


UNSERVABLE: dict[str, tuple[dict[str, object], str]] = {
    # What PostgreSQL cannot store: the call could never be billed.
    "nul-job-id": ({"job_id": "nul\x00id"}, "job_id"),
    "nul-model": ({"model": "gpt-4o-mini\x00"}, "model"),
    "nul-custom-id": ({"metadata": {"custom_id": "line\x007"}}, "metadata"),
    "nul-user": ({"params": {"user": "u\x00"}}, "params.user"),
    # What no worker can send a provider: each worker failed on it and returned it.
    "huge-seed": ({"params": {"seed": 2**64}}, "params.seed"),
    "huge-max-tokens": ({"params": {"max_tokens": 10**20}}, "params.max_tokens"),
    "huge-extra": ({"params": {"top_logprobs": 10**20}}, "params"),
    # What OpenAI refuses with a 400 once called and billed: both output limits at once.
    "both-limits": ({"params": {"max_tokens": 5, "max_completion_tokens": 5}}, "params"),
    # What a lax reading took as another value: OpenAI refuses a string max_tokens (400).
    "string-max-tokens": ({"params": {"max_tokens": "5"}}, "params.max_tokens"),
    "string-stream": ({"stream": "yes"}, "stream"),
    "naive-deadline": ({"deadline": "2099-01-01T00:00:00"}, "deadline"),
    # Nested, sent on and billed where OpenAI answers a 400: a part's text, a tool's function.
    "number-text-part": (
        {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
        "messages.0.content.0.text",
    ),
    "number-tool-name": (
        {"params": {"tools": [{"type": "function", "function": {"name": 5}}]}},
        "params: tools.0.function.name",
    ),
    "list-tool-parameters": (
        {"params": {"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]}},
        "params: tools.0.function.parameters",
    ),
    # An OpenAI parameter kept among the extras, of another type than OpenAI's (a 400 there).
    "string-logit-bias": ({"params": {"logit_bias": {"5": "x"}}}, "params"),
    "string-logprobs": ({"params": {"logprobs": "yes"}}, "params"),
    "typeless-response-format": (
        {"params": {"response_format": {}}},
        "params: response_format.type",
    ),
}


async def test_jobs_holding_what_cannot_be_stored_sent_or_read_as_written_are_refused_once(
    settings: Settings,
) -> None:
    # Given a running gateway, and jobs published raw as a tenant's own AMQP client could
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        connection = await aio_pika.connect(settings.amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(gw.topology.jobs_exchange)
            for kind, (change, _) in UNSERVABLE.items():
                job = {"job_id": kind, "team": "alpha", "model": "gpt-4o-mini", "messages": HELLO}
                job |= change
                body = json.dumps(job).encode()  # orjson refuses 2**64
                message = aio_pika.Message(
                    body,
                    message_id=str(job["job_id"]),
                    correlation_id=kind,
                    reply_to=client.reply_to,
                )
                await exchange.publish(message, routing_key="alpha")
            # Expect each answered once as bad input naming the field, never called, and
            # dead-lettered
            for kind, (_, field) in UNSERVABLE.items():
                result = await client.wait(kind, timeout=10)
                assert result.error is not None, kind
                assert result.error.code == "invalid_request", (kind, result.error)
                assert result.error.message.startswith(f"not a valid chat job: {field}:"), kind
            dead = await gw.dead_letters(len(UNSERVABLE))
            assert {m.correlation_id for m in dead} == set(UNSERVABLE)
            assert gw.mock.stats.calls == 0
            # ... each refusal with its usage row (one per job: none went round again)
            rows = await gw.usage_rows(len(UNSERVABLE))
            assert len(rows) == len(UNSERVABLE)
            assert {row["error_code"] for row in rows} == {"invalid_request"}
            # ... and the worker still serves good jobs
            assert (await client.chat("gpt-4o-mini", HELLO, timeout=10)).status == "ok"


@pytest.mark.parametrize(("messages", "params", "param"), REFUSED, ids=[p for *_, p in REFUSED])
async def test_openai_values_the_front_door_refuses_are_refused_by_the_worker_uncalled(
    settings: Settings, messages: list[dict[str, object]], params: dict[str, object], param: str
) -> None:
    # Given a running gateway, and a job published raw whose parameter or message (nested or
    # not) has another type or value than OpenAI's API gives it, as the front door refuses it
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        connection = await aio_pika.connect(settings.amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(gw.topology.jobs_exchange)
            job = {"job_id": "j", "team": "alpha", "model": "gpt-4o-mini", "messages": messages}
            message = aio_pika.Message(
                orjson.dumps(job | {"params": params}), message_id="j", reply_to=client.reply_to
            )
            await exchange.publish(message, routing_key="alpha")
            # Expect it answered invalid_request naming the parameter by its path, the values
            # a name may take listed
            result = await client.wait("j", timeout=10)
            assert result.error is not None
            assert result.error.code == "invalid_request", result.error
            assert result.error.param == param, result.error
            assert f"{param}: " in result.error.message
            assert ENUMS.get(param, "") in result.error.message
            # ... never called, its one usage row of no cost
            rows = await gw.usage_rows(1)
            assert [(row["error_code"], row["cost_usd"]) for row in rows] == [
                ("invalid_request", 0)
            ]
            assert gw.mock.stats.calls == 0


async def test_a_job_setting_both_output_limits_is_refused_by_the_client_unpublished(
    settings: Settings,
) -> None:
    # Given a running gateway and a team's client
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        # When a job sets max_tokens and max_completion_tokens, which OpenAI refuses together
        with pytest.raises(ValidationError) as refused:
            await client.chat("gpt-4o-mini", HELLO, max_tokens=5, max_completion_tokens=5)
        # Expect it refused naming the field and what to send instead, before it was published
        problem = refused.value.errors()[0]["msg"]
        assert "max_tokens: set together with max_completion_tokens" in problem
        assert "send max_completion_tokens alone" in problem
        assert "\n" not in problem
        assert gw.mock.stats.calls == 0
        # ... and the same request with the current field alone answered
        result = await client.chat("gpt-4o-mini", HELLO, max_completion_tokens=5, timeout=10)
        assert result.status == "ok"
        assert gw.mock.stats.calls == 1


async def test_openais_metadata_is_sent_from_python_in_params_the_jobs_own_is_not(
    settings: Settings,
) -> None:
    # Given a running gateway and a team's client
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        # When a caller sends OpenAI's metadata (stored completions) in params, and the job
        # metadata of its own
        result = await client.chat(
            "gpt-4o-mini",
            HELLO,
            params={"metadata": {"run": "nightly"}},
            store=True,
            metadata={"ticket": "T-1"},
            max_tokens=5,
            timeout=10,
        )
        # Expect the provider to receive OpenAI's, with store, and never the job's own
        assert result.status == "ok", result.error
        assert result.gateway.params_dropped is None
        [call] = gw.mock.requests
        assert call.body is not None
        assert call.body["metadata"] == {"run": "nightly"} and call.body["store"] is True
        # ... and a parameter given both as a keyword and in params refused, never one of
        # them left out
        with pytest.raises(TypeError, match="max_tokens given twice"):
            client.job("gpt-4o-mini", HELLO, params={"max_tokens": 5}, max_tokens=6)


async def test_answers_carry_the_gateways_id_never_the_providers(settings: Settings) -> None:
    # Given a gateway whose providers answer under ids of their own
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        for alias, provider in [("gpt-4o-mini", "openai"), ("claude-haiku", "anthropic")]:
            # When the team asks each provider kind, whole and streamed
            whole = await client.chat(alias, HELLO, max_tokens=20, timeout=10)
            stream = client.stream(alias, HELLO, max_tokens=20, timeout=10)
            async for _ in stream:
                pass
            assert stream.result is not None
            for result in (whole, stream.result):
                # Expect the answer's id the gateway's, as the front door gives it (which
                # provider or deployment served it is told by gateway, not by the id), and
                # nothing that is kept for Anthropic-format callers alone
                assert result.status == "ok" and result.response is not None, result.error
                assert result.response["id"] == f"chatcmpl-{result.job_id}", alias
                assert "anthropic_body" not in result.response, alias
                assert result.gateway.provider == provider


async def test_a_redelivered_finished_job_is_answered_from_the_store(settings: Settings) -> None:
    # Given a job that has been answered once
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        job = client.job("gpt-4o-mini", HELLO, job_id=f"again-{uuid.uuid4().hex}")
        first = await (await client.submit(job)).result(10)
        calls = gw.mock.stats.calls
        # When the same job arrives again (as after a crash before the ack)
        await client.submit(job)
        # Expect no second provider call, one usage row, and the duplicate dropped by the client
        await gw.usage_rows(1)
        from tests.support import wait_until

        await wait_until(lambda: client.duplicates == 1)
        assert gw.mock.stats.calls == calls
        rows = await gw.usage_rows(1)
        assert len(rows) == 1 and rows[0]["job_id"] == first.job_id


async def test_waiting_past_the_timeout_raises_a_clear_error_and_a_later_wait_gets_it(
    settings: Settings,
) -> None:
    slow = MockConfig(default=Behavior(latency_ms=1000))
    async with running_gateway(settings, mock_config=slow) as gw, gw.client("alpha") as client:
        handle = await client.submit(client.job("gpt-4o-mini", HELLO))
        with pytest.raises(ResultTimeout, match="no result for job"):
            await handle.result(timeout=0.2)
        assert (await handle.result(timeout=30)).status == "ok"


async def test_jobs_finishing_together_share_usage_messages_and_each_counts_once(
    settings: Settings,
) -> None:
    jobs = 40
    # Given a gateway whose usage events wait in the broker, its provider taking 100 ms a call
    slow = MockConfig(default=Behavior(latency_ms=100))
    async with (
        running_gateway(settings, mock_config=slow, accounting=False) as gw,
        gw.client("alpha") as client,
    ):
        # When 40 jobs are submitted at once, and all answered
        handles = [await client.submit(client.job("gpt-4o-mini", HELLO)) for _ in range(jobs)]
        results = [await handle.result(timeout=20) for handle in handles]
        assert all(r.status == "ok" for r in results)

        # Expect their events in fewer messages than jobs (those finishing while a batch
        # awaited its confirm went in the next), and each job counted once
        async with running_accountant(settings) as accountant:
            rows = await gw.usage_rows(jobs)
        assert sorted(r["job_id"] for r in rows) == sorted(h.job_id for h in handles)
        assert accountant.events_received == jobs
        assert accountant.messages_received < jobs


async def test_results_are_persistent_only_where_they_wait_unread(settings: Settings) -> None:
    # Given a client's own reply queue and a pipeline's named results queue, nobody reading
    async with running_gateway(settings) as gw, gw.client("alpha", listen=False) as client:
        own = await client.control.open_reply_queue(uuid.uuid4().hex, durable=False)
        named = await client.control.open_reply_queue("nightly", durable=True)

        # When a job answers to each
        for queue in (own, named):
            await client.publish(client.job("gpt-4o-mini", HELLO), reply_to=queue)

        # Expect the named queue's result persistent (it outlives a broker restart while it
        # waits), the own queue's not (its client reads it as it comes; the outcome store
        # keeps it for a job sent again)
        connection = await aio_pika.connect(settings.amqp_url)
        async with connection:
            channel = await connection.channel()
            modes = {}
            for name in (own, named):
                queue = await channel.get_queue(name, ensure=False)
                async with asyncio.timeout(10), queue.iterator() as results:
                    async for message in results:
                        await message.ack()
                        modes[name] = message.delivery_mode
                        break
        assert modes == {
            own: aio_pika.DeliveryMode.NOT_PERSISTENT,
            named: aio_pika.DeliveryMode.PERSISTENT,
        }
