"""Traces across the queue: one trace per job from the caller's publish to the accounting
write, spans named and attributed by the GenAI conventions, and log lines that name them.

The gateway runs in the test's process with the SDK's in-memory exporter installed
(``queuegate.tracing.install``), except where a worker process exports over OTLP/HTTP to a
receiver in the test (``bench.otlp_sink``), as it would to a collector.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from decimal import Decimal

import aio_pika
import anthropic
import asyncpg
import httpx
import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, StatusCode, TraceFlags
from prometheus_client import REGISTRY

from bench.otlp_sink import OtlpSink
from mockprovider import Behavior, MockConfig, MockProvider
from producer import GatewayClient
from queuegate import tracing
from queuegate.broker import connect
from queuegate.errors import ConfigError
from queuegate.logs import JsonFormatter
from queuegate.registry import TeamConfig, add_team
from queuegate.settings import Settings
from queuegate.tenancy import TeamSecurity, put_security
from queuegate.topology import HEADER_SENT_MS
from tests.chaos.harness import declare_teams, worker_env
from tests.frontdoor_support import open_door
from tests.support import running_accountant, running_gateway, wait_until
from tests.teams import register, team_identities

HELLO = [{"role": "user", "content": "Hello there"}]


@contextlib.contextmanager
def in_memory(
    *, content: bool = False, sampler: Sampler | None = None, heed_callers: bool = False
) -> Iterator[InMemorySpanExporter]:
    """Every span this process ends, kept in memory; tracing off again after the block."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider, content=content, heed_callers=heed_callers)
    try:
        yield exporter
    finally:
        tracing.install(None)
        provider.shutdown()


@pytest.fixture
def exported() -> Iterator[InMemorySpanExporter]:
    with in_memory() as exporter:
        yield exporter


async def ended(
    exporter: InMemorySpanExporter, match: Callable[[ReadableSpan], bool], count: int = 1
) -> list[ReadableSpan]:
    """The spans that match, once ``count`` have ended (a job's span ends after its ack,
    the accounting write after the row commits: both after the caller has its answer)."""

    def found() -> list[ReadableSpan]:
        return [s for s in exporter.get_finished_spans() if match(s)]

    await wait_until(lambda: len(found()) >= count)
    return found()


def named(name: str) -> Callable[[ReadableSpan], bool]:
    return lambda span: span.name == name


def consumer(name: str) -> Callable[[ReadableSpan], bool]:
    """The job span of that name (a provider call's span may have the same name)."""
    return lambda span: span.name == name and span.kind == SpanKind.CONSUMER


def of_job(job_id: str) -> Callable[[ReadableSpan], bool]:
    return lambda span: (
        span.kind == SpanKind.CONSUMER and (span.attributes or {}).get("queuegate.job_id") == job_id
    )


def children(spans: Sequence[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    assert parent.context is not None
    return [s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id]


def trace_hex(span: ReadableSpan) -> str:
    assert span.context is not None
    return format(span.context.trace_id, "032x")


async def test_a_job_with_a_retry_and_a_fallback_is_one_trace_from_publish_to_accounting(
    settings: Settings, exported: InMemorySpanExporter
) -> None:
    # Given flaky-gpt answering 500 to everything (retried once), claude-haiku its fallback
    faults = MockConfig(models={"flaky-gpt": Behavior(error_rate=1.0, error_status=500)})
    async with running_gateway(settings, mock_config=faults) as gw, gw.client("alpha") as client:
        # When the team asks flaky-gpt
        asked = time.time_ns()
        result = await client.chat("flaky-gpt", HELLO, max_tokens=20, timeout=10)
        [row] = await gw.usage_rows(1)
        [job] = await ended(exported, consumer("chat flaky-gpt"))
        await ended(exported, named("accounting write"))
    spans = exported.get_finished_spans()

    # Expect one trace, rooted at the producer's publish, which the job span continues
    assert result.status == "ok" and result.gateway.fallback_used
    assert {trace_hex(s) for s in spans} == {trace_hex(job)}
    [publish] = [s for s in spans if s.name == "publish alpha"]
    assert publish.parent is None and publish.kind == SpanKind.PRODUCER
    assert publish.attributes is not None
    assert publish.attributes["queuegate.job_id"] == result.job_id
    assert job.kind == SpanKind.CONSUMER
    assert job.parent is not None and publish.context is not None
    assert job.parent.span_id == publish.context.span_id
    # ... its children: queued from the publish, admission, three calls, the two publishes
    # and the accounting write, in that order
    under = sorted(children(spans, job), key=lambda s: s.start_time or 0)
    assert [s.name for s in under] == [
        "queued alpha",
        "admission alpha",
        "chat flaky-gpt",
        "chat flaky-gpt",
        "chat claude-3-5-haiku-latest",
        "publish result",
        "publish usage",
        "accounting write",
    ]
    queued = under[0]
    assert job.start_time == queued.start_time
    # ... the time queued from the send time the client stamped (to the millisecond, once
    # asked) to the delivery: the time the usage row records
    assert queued.start_time is not None and queued.end_time is not None
    assert queued.start_time >= asked - 10**6
    assert queued.end_time - queued.start_time == int(row["queued_ms"] * 1_000_000)
    # ... each call a CLIENT span by the GenAI conventions: the retry and the fallback
    # siblings, each saying which it is
    calls = under[2:5]
    assert all(c.kind == SpanKind.CLIENT for c in calls)
    said = [dict(c.attributes or {}) for c in calls]
    assert [
        (
            a["queuegate.attempt"],
            a["queuegate.deployment"],
            a["queuegate.retry"],
            a["queuegate.fallback"],
            a.get("error.type"),
            a["http.response.status_code"],
        )
        for a in said
    ] == [
        (1, "openai-flaky", False, False, "server_error", 500),
        (2, "openai-flaky", True, False, "server_error", 500),
        (3, "anthropic-main", False, True, None, 200),
    ]
    assert [c.status.status_code for c in calls] == [
        StatusCode.ERROR,
        StatusCode.ERROR,
        StatusCode.UNSET,
    ]
    assert [a["gen_ai.provider.name"] for a in said] == ["openai", "openai", "anthropic"]
    assert said[2]["gen_ai.request.model"] == "claude-3-5-haiku-latest"
    assert said[2]["gen_ai.request.max_tokens"] == 20
    assert result.response is not None
    usage = result.response["usage"]
    assert said[2]["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert said[2]["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert said[2]["gen_ai.response.finish_reasons"] == ("stop",)
    # ... and the job span says how the job ended, with the result and the usage row
    # carrying its trace id
    on_job = dict(job.attributes or {})
    assert on_job["gen_ai.operation.name"] == "chat"
    assert on_job["gen_ai.request.model"] == "flaky-gpt"
    assert on_job["gen_ai.provider.name"] == "anthropic"
    assert on_job["gen_ai.response.model"] == result.response["model"]
    assert on_job["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert on_job["queuegate.team"] == "alpha" and on_job["queuegate.job_id"] == result.job_id
    assert on_job["queuegate.deployment"] == "anthropic-main"
    assert on_job["queuegate.fallback_used"] is True and on_job["queuegate.attempts"] == 3
    assert Decimal(str(on_job["queuegate.cost_usd"])) == result.gateway.cost_usd
    assert "gen_ai.input.messages" not in on_job  # no content: capture is not full
    assert result.gateway.trace_id == row["trace_id"] == trace_hex(job)
    assert job.context is not None and row["span_id"] == format(job.context.span_id, "016x")
    [write] = [s for s in under if s.name == "accounting write"]
    assert (write.attributes or {})["db.collection.name"] == "usage_log"


async def test_a_streamed_job_marks_its_first_chunk_on_the_call(
    settings: Settings, exported: InMemorySpanExporter
) -> None:
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        # When a job is streamed
        stream = client.stream("gpt-4o-mini", HELLO, timeout=10)
        chunks = [chunk async for chunk in stream]
        [job] = await ended(exported, consumer("chat gpt-4o-mini"))
    spans = exported.get_finished_spans()

    # Expect its one call marked streamed, with the first chunk's arrival on it
    assert len(chunks) > 1 and stream.result is not None and stream.result.status == "ok"
    [call] = [s for s in children(spans, job) if s.name == "chat gpt-4o-mini"]
    assert (call.attributes or {})["queuegate.stream"] is True
    assert [event.name for event in call.events] == ["first chunk"]
    assert call.start_time is not None and call.events[0].timestamp > call.start_time
    assert (job.attributes or {})["gen_ai.usage.output_tokens"] > 0
    assert stream.result.gateway.trace_id == trace_hex(job)


async def test_a_job_refused_by_admission_ends_its_trace_at_the_admission(
    settings: Settings, exported: InMemorySpanExporter
) -> None:
    # Given team alpha with no budget at all
    await register(settings, "alpha", TeamConfig(budget_usd=Decimal(0)))
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        result = await client.chat("gpt-4o-mini", HELLO, timeout=10)
        [job] = await ended(exported, consumer("chat gpt-4o-mini"))
    spans = exported.get_finished_spans()

    # Expect the admission span and the job span failed budget_exhausted, no call made
    assert result.error is not None and result.error.code == "budget_exhausted"
    under = children(spans, job)
    [admission] = [s for s in under if s.name == "admission alpha"]
    for failed in (admission, job):
        assert failed.status.status_code == StatusCode.ERROR
        assert (failed.attributes or {})["error.type"] == "budget_exhausted"
    assert not [s for s in spans if s.name.startswith("chat") and s.kind == SpanKind.CLIENT]
    assert gw.mock.stats.calls == 0


@pytest.mark.parametrize("switched_on", [True, False])
async def test_content_goes_into_spans_only_for_full_capture_and_when_switched_on(
    settings: Settings, pool: asyncpg.Pool, switched_on: bool
) -> None:
    # Given alpha capturing full content, beta redacted content
    for team, capture in (("alpha", "full"), ("beta", "redacted")):
        await add_team(pool, team)
        await put_security(pool, team, TeamSecurity(capture=capture))
    with in_memory(content=switched_on) as exported:
        async with running_gateway(settings, teams=("alpha", "beta")) as gw:
            # When each team asks, with its operator's switch on or off
            for team in ("alpha", "beta"):
                async with gw.client(team) as client:
                    await client.chat("gpt-4o-mini", [{"role": "user", "content": "secret plans"}])
            jobs = await ended(exported, consumer("chat gpt-4o-mini"), count=2)

    # Expect the prompt and answer in alpha's span when switched on, never in beta's
    held = {
        (job.attributes or {})["queuegate.team"]: (
            (job.attributes or {}).get("gen_ai.input.messages"),
            (job.attributes or {}).get("gen_ai.output.messages"),
        )
        for job in jobs
    }
    assert held["beta"] == (None, None)
    if not switched_on:
        assert held["alpha"] == (None, None)
        return
    prompt, answer = held["alpha"]
    assert isinstance(prompt, str) and isinstance(answer, str)
    assert json.loads(prompt) == [
        {"role": "user", "parts": [{"type": "text", "content": "secret plans"}]}
    ]
    [said] = json.loads(answer)
    assert said["role"] == "assistant" and said["finish_reason"] == "stop"
    assert "secret plans" in said["parts"][0]["content"]  # the mock echoes the prompt


async def test_a_log_line_of_a_job_names_its_job_team_and_trace(
    settings: Settings, exported: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    # Given log lines formatted as JSON, and jobs of at most one message
    caplog.handler.setFormatter(JsonFormatter())
    caplog.set_level(logging.INFO, logger="workers")
    settings = settings.model_copy(update={"max_job_messages": 1})
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        # When a job of two is refused, which the worker logs
        result = await client.chat("gpt-4o-mini", HELLO * 2, timeout=10)
        [job] = await ended(exported, of_job(result.job_id))

    # Expect its line to carry the job id, the team, and the job span's trace and span ids
    assert result.error is not None and result.error.code == "invalid_request"
    lines = [json.loads(line) for line in caplog.text.splitlines()]
    [refused] = [line for line in lines if "refused" in line["message"]]
    assert job.context is not None
    assert refused["job_id"] == result.job_id and refused["team"] == "alpha"
    assert refused["trace_id"] == trace_hex(job)
    assert refused["span_id"] == format(job.context.span_id, "016x")
    assert refused["level"] == "WARNING" and refused["logger"] == "workers.processor"
    assert refused["time"].endswith("+00:00")


async def test_a_front_door_call_is_the_gateways_own_trace_linked_to_the_callers(
    settings: Settings, exported: InMemorySpanExporter
) -> None:
    async with open_door(settings) as door:
        # Given a job of beta's, in its trace
        async with door.client("beta") as beta:
            theirs = await beta.chat.completions.with_raw_response.create(
                model="gpt-4o-mini",
                messages=HELLO,  # type: ignore[arg-type]
            )
        foreign = theirs.headers["x-queuegate-trace-id"]
        # When alpha calls with beta's trace id in its traceparent and a tracestate of 32
        # members, 8 KiB
        tracestate = ",".join(f"k{i}=" + "v" * 250 for i in range(32))
        async with door.client("alpha") as alpha:
            raw = await alpha.chat.completions.with_raw_response.create(
                model="gpt-4o-mini",
                messages=HELLO,  # type: ignore[arg-type]
                extra_headers={
                    "traceparent": f"00-{foreign}-00f067aa0ba902b7-01",
                    "tracestate": tracestate,
                },
            )
        answer = raw.parse()
        rows = await door.gateway.usage_rows(2)
        jobs = await ended(exported, consumer("chat gpt-4o-mini"), 2)
    spans = exported.get_finished_spans()

    # Expect alpha's request the root of a trace of the gateway's, linked to alpha's span
    assert answer.choices[0].message.content
    mine = raw.headers["x-queuegate-trace-id"]
    assert mine != foreign
    [server] = [s for s in spans if s.kind == SpanKind.SERVER and trace_hex(s) == mine]
    assert server.name == "POST /v1/chat/completions" and server.parent is None
    [link] = server.links
    assert format(link.context.trace_id, "032x") == foreign
    assert format(link.context.span_id, "016x") == "00f067aa0ba902b7"
    # ... the tracestate on the link alone, cut to whole members within 512 bytes
    kept = link.context.trace_state.to_header()
    assert 0 < len(kept) <= tracing.TRACESTATE_BYTES and tracestate.startswith(kept + ",")
    assert all(not s.context.trace_state for s in spans if s.context is not None)
    # ... the front door's trace continued by the worker as one trace
    [job] = [j for j in jobs if trace_hex(j) == mine]
    [publish] = [s for s in spans if s.name == "publish alpha"]
    assert job.parent is not None and publish.context is not None
    assert job.parent.span_id == publish.context.span_id and trace_hex(publish) == mine
    # ... and alpha's usage row in its own trace, never beta's
    [row] = [r for r in rows if r["team"] == "alpha"]
    assert row["trace_id"] == mine
    assert [r["team"] for r in rows if r["trace_id"] == foreign] == ["beta"]


async def test_streamed_and_async_answers_name_the_trace_of_their_job(
    settings: Settings, exported: InMemorySpanExporter
) -> None:
    async with open_door(settings) as door:
        # Given a streamed call over each SDK, and a call answered 202 at once
        async with door.client("alpha") as client:
            streamed = await client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini",
                messages=HELLO,  # type: ignore[arg-type]
                stream=True,
            )
            assert [chunk async for chunk in streamed.parse()]  # type: ignore[union-attr]
            accepted = await client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini",
                messages=HELLO,  # type: ignore[arg-type]
                extra_headers={"Prefer": "respond-async"},
            )
            # ... and that job read back once done
            read_back = await client.get(
                f"/jobs/{accepted.headers['x-request-id']}",
                cast_to=httpx.Response,
                options={"params": {"wait": 10}},
            )
        claude = anthropic.AsyncAnthropic(
            base_url=door.url, api_key=door.keys["alpha"], max_retries=0
        )
        async with claude:
            messages = await claude.messages.with_raw_response.create(
                model="gpt-4o-mini",
                max_tokens=16,
                messages=HELLO,  # type: ignore[arg-type]
                stream=True,
            )
            assert [event async for event in await messages.parse()]  # type: ignore[union-attr]
        rows = {row["job_id"]: row["trace_id"] for row in await door.gateway.usage_rows(3)}

    # Expect each answer, its headers sent before its job ended, to name the trace its job's
    # usage row keeps; the job read back by id its own trace, not the reading request's
    assert accepted.status_code == 202 and read_back.status_code == 200
    for answer in (streamed, accepted, messages):
        assert answer.headers["x-queuegate-trace-id"] == rows[answer.headers["x-request-id"]]
    assert read_back.headers["x-queuegate-trace-id"] == accepted.headers["x-queuegate-trace-id"]


async def call_with_traceparent(
    settings: Settings, sampler: Sampler, flags: str, *, heed_callers: bool = False
) -> tuple[str, list[ReadableSpan], str]:
    """A caller's call to the front door in trace ``CALLER_TRACE``, its sampled flag
    ``flags``, the gateway tracing with ``sampler``: the trace id the answer names, the spans
    recorded, the trace id of the job's usage row."""
    with in_memory(sampler=sampler, heed_callers=heed_callers) as exporter:
        async with open_door(settings) as door, door.client() as client:
            raw = await client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini",
                messages=HELLO,  # type: ignore[arg-type]
                extra_headers={"traceparent": f"00-{CALLER_TRACE}-00f067aa0ba902b7-{flags}"},
            )
            assert raw.parse().choices[0].message.content
            [row] = await door.gateway.usage_rows(1)
        spans = list(exporter.get_finished_spans())
    return raw.headers["x-queuegate-trace-id"], spans, row["trace_id"]


CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


async def test_a_caller_cannot_have_its_job_traced_where_the_operator_samples_nothing(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an operator whose sampler records no trace
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_always_off")
    # When a caller sends a traceparent flagged sampled
    answered, recorded, stored = await call_with_traceparent(
        settings, tracing.operator_sampler(), "01"
    )
    # Expect its job not traced, in a trace of the gateway's named by the answer and the row
    assert recorded == []
    assert answered == stored != CALLER_TRACE


async def test_the_operators_sampler_traces_a_callers_job_it_flagged_unsampled(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an operator whose sampler records every trace (the default)
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    # When a caller sends a traceparent flagged unsampled
    answered, recorded, stored = await call_with_traceparent(
        settings, tracing.operator_sampler(), "00"
    )
    # Expect the job traced in the gateway's trace, linked to the caller's span
    [server] = [s for s in recorded if s.kind == SpanKind.SERVER]
    assert server.parent is None and trace_hex(server) == answered == stored
    assert [format(link.context.span_id, "016x") for link in server.links] == ["00f067aa0ba902b7"]
    assert any(s.kind == SpanKind.CONSUMER and trace_hex(s) == answered for s in recorded)


async def test_an_operator_who_trusts_callers_continues_their_trace_and_heeds_their_flag(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an operator who samples nothing of its own but heeds its callers
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_always_off")
    # When a caller sends a traceparent flagged sampled
    answered, recorded, stored = await call_with_traceparent(
        settings, tracing.operator_sampler(), "01", heed_callers=True
    )
    # Expect the job traced in the caller's trace, as a child of the caller's span, as a
    # parent-based sampler does
    [server] = [s for s in recorded if s.kind == SpanKind.SERVER]
    assert server.parent is not None and format(server.parent.span_id, "016x") == "00f067aa0ba902b7"
    assert any(s.kind == SpanKind.CONSUMER for s in recorded)
    assert answered == stored == CALLER_TRACE == trace_hex(server)


async def test_a_team_choosing_trace_ids_its_ratio_keeps_is_sampled_at_the_operators_ratio(
    settings: Settings,
) -> None:
    # Given an operator sampling a tenth of the traces by trace id, and a team publishing
    # under its own broker user
    ratio = ParentBased(TraceIdRatioBased(0.1))
    async with team_identities(settings) as teams:
        alpha = teams["alpha"]
        with in_memory(sampler=ratio) as exporter:
            async with (
                running_gateway(settings) as gw,
                GatewayClient(alpha.settings, team="alpha") as client,
            ):

                async def job(low: int) -> str:
                    # ... each job in a trace of its choosing, flagged sampled, its id's low
                    # 64 bits (what the ratio sampler decides by) near 0: always kept
                    chosen = SpanContext(
                        (0xA1 << 64) | low, 0x00F067AA0BA902B7, is_remote=True,
                        trace_flags=TraceFlags(TraceFlags.SAMPLED),
                    )  # fmt: skip
                    with trace.use_span(NonRecordingSpan(chosen)):
                        result = await client.chat("gpt-4o-mini", HELLO, timeout=60)
                    assert result.status == "ok"
                    return format(chosen.trace_id, "032x")

                # When it sends 200 jobs
                chosen = set(await asyncio.gather(*(job(low) for low in range(1, 201))))
                rows = await gw.usage_rows(200, timeout=60)
            consumers = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.CONSUMER]

    # Expect about a tenth of them traced (0.1 of 200: 20; 60 is beyond any chance), each in
    # a trace of the gateway's linked to the team's, and no usage row in a trace it chose
    recorded = [row for row in rows if row["span_id"] is not None]
    assert 0 < len(recorded) <= 60
    assert not chosen & {row["trace_id"] for row in rows}
    assert consumers and all(s.parent is None and len(s.links) == 1 for s in consumers)
    assert {format(s.links[0].context.trace_id, "032x") for s in consumers} <= chosen


async def test_a_worker_process_exports_its_spans_over_otlp_and_logs_json_lines_naming_them(
    settings: Settings, exported: InMemorySpanExporter
) -> None:
    async with MockProvider() as mock, OtlpSink() as sink, running_accountant(settings):
        await declare_teams(settings, ("alpha",))
        # Given a worker process switched on by the standard variables, logging JSON, taking
        # jobs of one message at most
        worker = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "cli", "worker", "--teams", "alpha"),
            env=worker_env(
                settings,
                mock,
                QUEUEGATE_MAX_JOB_MESSAGES="1",
                QUEUEGATE_LOG_FORMAT="json",
                OTEL_EXPORTER_OTLP_ENDPOINT=sink.url,
                OTEL_BSP_SCHEDULE_DELAY="50",
            ),
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with GatewayClient(settings, team="alpha") as client:
                # When a job is served and another refused
                served = await client.chat("gpt-4o-mini", HELLO, timeout=30)
                refused = await client.chat("gpt-4o-mini", HELLO * 2, timeout=30)
            [job] = await sink.wait_for(
                lambda s: s.attributes.get("queuegate.job_id") == served.job_id and s.kind == 5
            )
            [bad] = await sink.wait_for(
                lambda s: s.attributes.get("queuegate.job_id") == refused.job_id and s.kind == 5
            )
            [call] = await sink.wait_for(lambda s: s.parent_id == job.span_id and s.kind == 3)
        finally:
            worker.send_signal(signal.SIGTERM)
            _, stderr = await asyncio.wait_for(worker.communicate(), timeout=20)

    # Expect the worker's spans received over OTLP, continuing the trace of the publish span
    # made in this process, under the worker's service name
    [publish] = [s for s in exported.get_finished_spans() if of_publish(s, served.job_id)]
    assert publish.context is not None
    assert job.parent_id == format(publish.context.span_id, "016x")
    assert job.trace_id == trace_hex(publish) == served.gateway.trace_id
    assert job.service == "queuegate-worker" and job.name == "chat gpt-4o-mini"
    assert job.attributes["gen_ai.request.model"] == "gpt-4o-mini"
    assert call.name == "chat gpt-4o-mini" and call.attributes["gen_ai.provider.name"] == "openai"
    assert bad.status == 2 and bad.attributes["error.type"] == "invalid_request"
    # ... and the refusal's log line, one JSON object, naming its job and its trace
    lines = [json.loads(line) for line in stderr.decode().splitlines()]
    assert lines and all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    [said] = [line for line in lines if line.get("job_id") == refused.job_id]
    assert said["team"] == "alpha" and said["level"] == "WARNING"
    assert said["trace_id"] == bad.trace_id and said["span_id"] == bad.span_id


async def test_a_worker_stops_within_its_flush_bound_when_the_collector_is_silent(
    settings: Settings,
) -> None:
    # Given a collector that takes connections and never answers (hung, or a black hole)
    held: list[asyncio.StreamWriter] = []

    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    collector = await asyncio.start_server(accept, "127.0.0.1", 18722)
    async with MockProvider() as mock, running_accountant(settings):
        await declare_teams(settings, ("alpha",))
        # and a worker tracing to it, each span a batch of its own (as many batches as a
        # busy worker holds: each export waits for the collector in turn)
        worker = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "cli", "worker", "--teams", "alpha"),
            env=worker_env(
                settings,
                mock,
                OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:18722",
                OTEL_BSP_MAX_EXPORT_BATCH_SIZE="1",
            ),
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with GatewayClient(settings, team="alpha") as client:
                await client.chat("gpt-4o-mini", HELLO, timeout=30)
            # When it is stopped
            worker.send_signal(signal.SIGTERM)
            # Expect it gone well before the SDK's own 30 s wait at exit (a guard, generous
            # for a loaded machine), saying the spans it could not export were dropped
            _, stderr = await asyncio.wait_for(
                worker.communicate(), timeout=tracing.FLUSH_AT_EXIT + 12
            )
        finally:
            if worker.returncode is None:
                worker.kill()
                await worker.wait()
            for writer in held:
                writer.close()
            collector.close()
    assert worker.returncode == 0
    assert held  # the worker did try the collector
    assert "spans not exported within 5 s of stopping" in stderr.decode()


def test_the_gateway_links_callers_unless_told_to_heed_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given traces switched on by the environment, a ratio sampler chosen
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.1")
    headers = {"traceparent": f"00-{CALLER_TRACE}-00f067aa0ba902b7-01"}
    for heed in (False, True):
        tracing.install(None)
        try:
            # When a gateway process starts tracing
            tracing.start("queuegate-worker", heed_callers=heed)
            provider = tracing._state.provider
            assert provider is not None
            description = provider.sampler.get_description()
            assert description.startswith("ParentBased{root:TraceIdRatioBased{0.1}")
            # Expect a caller's context its parent only when told, a link otherwise
            parent, links = tracing.caller(headers)
            found = trace.get_current_span(parent).get_span_context()
            assert (format(found.trace_id, "032x") == CALLER_TRACE) is heed
            assert len(links) == (0 if heed else 1)
        finally:
            tracing.install(None)


def of_publish(span: ReadableSpan, job_id: str) -> bool:
    return (
        span.name == "publish alpha" and (span.attributes or {}).get("queuegate.job_id") == job_id
    )


ENDPOINT = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}


@pytest.mark.parametrize(
    ("env", "exporters"),
    [
        ({}, []),
        (ENDPOINT, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, ["otlp"]),
        ({**ENDPOINT, "OTEL_SDK_DISABLED": "true"}, []),
        ({**ENDPOINT, "OTEL_TRACES_EXPORTER": "none"}, []),
        ({"OTEL_TRACES_EXPORTER": "console"}, ["console"]),
        ({"OTEL_TRACES_EXPORTER": "otlp,console"}, ["otlp", "console"]),
        ({**ENDPOINT, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, ["otlp"]),
        (
            {
                **ENDPOINT,
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
            },
            ["otlp"],
        ),
    ],
)
def test_the_standard_variables_switch_tracing_on(
    env: dict[str, str], exporters: list[str]
) -> None:
    assert tracing.wanted_exporters(env) == exporters


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER names zipkin"),
        ({**ENDPOINT, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "OTEL_EXPORTER_OTLP_PROTOCOL=grpc"),
    ],
)
def test_an_exporter_it_cannot_use_is_a_one_line_error(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named) as refused:
        tracing.wanted_exporters(env)
    assert "\n" not in str(refused.value)


def test_without_the_sdk_tracing_stays_off_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Given the OpenTelemetry API without its SDK (other libraries install the API alone)
    for module in ("opentelemetry.sdk.resources", "opentelemetry.sdk.trace"):
        monkeypatch.setitem(sys.modules, module, None)  # its import raises ImportError
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
    tracing.install(None)
    try:
        # When a process asks for traces, twice
        tracing.start("queuegate-worker")
        tracing.start("queuegate-worker")
    finally:
        on = tracing.ON
        tracing.install(None)

    # Expect it to run without them, saying so once
    assert not on
    [said] = [r for r in caplog.records if "queuegate[otel]" in r.getMessage()]
    assert said.levelname == "WARNING"


async def test_a_forged_send_time_is_ignored_and_every_span_still_exports(
    settings: Settings,
) -> None:
    # Given a gateway exporting its spans over OTLP as a deployment does (batched)
    provider = TracerProvider()
    async with OtlpSink() as sink:
        exporter = OTLPSpanExporter(endpoint=f"{sink.url}/v1/traces")
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=50))
        tracing.install(provider)
        try:
            async with running_gateway(settings) as gw, gw.client("alpha") as client:
                waits = {"team": "alpha"}
                before = REGISTRY.get_sample_value("queuegate_queue_wait_seconds_sum", waits)
                # When a tenant's own AMQP client publishes jobs stamped sent before 1970 and
                # in the year 33658, and one honestly
                jobs: dict[int | None, str] = {}
                async with await connect(settings.amqp_url, name="tenant") as connection:
                    channel = await connection.channel()
                    exchange = await channel.get_exchange(gw.topology.jobs_exchange)
                    for sent in (-1, 10**15, None):
                        job = client.job("gpt-4o-mini", HELLO)
                        stamp = round(time.time() * 1000) if sent is None else sent
                        message = aio_pika.Message(
                            job.model_dump_json().encode(),
                            message_id=job.job_id,
                            reply_to=client.reply_to,
                            headers={HEADER_SENT_MS: stamp},
                        )
                        await exchange.publish(message, routing_key="alpha")
                        jobs[sent] = job.job_id
                results = [await client.wait(job_id, timeout=10) for job_id in jobs.values()]
                assert all(result.status == "ok" for result in results)
                # Expect every job's span exported, starting no earlier than it was sent (a
                # forged time as unknown: from the delivery, with no time queued recorded)
                for job_id in jobs.values():
                    [job_span] = await sink.wait_for(
                        lambda s, j=job_id: (
                            s.attributes.get("queuegate.job_id") == j and s.kind == 5
                        )
                    )
                    assert 0 < job_span.end_ns - job_span.start_ns < 60 * 10**9
                # ... queued_ms and the queue-wait metric sane, the forged ones as unknown (0)
                rows = await gw.usage_rows(len(jobs))
                queued_ms = {row["job_id"]: row["queued_ms"] for row in rows}
                assert queued_ms[jobs[-1]] == queued_ms[jobs[10**15]] == 0
                assert 0 <= queued_ms[jobs[None]] < 60_000
                after = REGISTRY.get_sample_value("queuegate_queue_wait_seconds_sum", waits)
                assert after is not None and after - (before or 0) < 60
        finally:
            tracing.install(None)
            provider.shutdown()
