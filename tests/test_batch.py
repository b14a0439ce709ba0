"""Batch files through the queue: formats in and out, validation, resumption, cancel, expiry.

Every batch runs as its team's apps run it: ``alpha`` with its own broker user (the default
of ``teams add``), ``beta`` with an API key; never as the admin user.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator, Coroutine
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest
import redis.asyncio as aioredis
from anthropic.types.messages import MessageBatchIndividualResponse
from openai.types.chat import ChatCompletion

from admin.teams import configure
from mockprovider import Behavior, MockConfig
from producer import (
    GatewayClient,
    batch_list,
    batch_status,
    cancel_batch,
    collect,
    delete_batch,
    delete_reply_queue,
    submit_batch,
)
from producer.batch import BatchStatus, SubmitReport
from queuegate.control import BatchMeta, Counts, batch_reply_name
from queuegate.errors import (
    BatchError,
    BatchInvalid,
    ControlRefused,
    PublishRefused,
    ServiceUnavailable,
)
from queuegate.keys import Keys
from queuegate.management import BrokerAdmin
from queuegate.numbers import plain_decimal
from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from queuegate.topology import Topology
from tests.batch_files import (
    ANTHROPIC_EXAMPLE,
    OPENAI_EXAMPLE,
    cli_to_a_gone_reader,
    kill,
    openai_line,
    read_jsonl,
    start_cli,
    write_jsonl,
)
from tests.conftest import TEST_TEAMS
from tests.proxy import TcpProxy
from tests.support import Gateway, logged, running_gateway, wait_until
from tests.teams import TeamIdentity, quota_in_force, register, team_identities

BATCH_NAMES = ("docs", "big", "resume", "cancel", "expire", "bad", "small", "full", "cut")
"""Every batch name these tests use; their results queues are deleted after each test."""
PIPELINE_QUEUES = ("nightly",)
"""The named reply queues of pipelines these tests open; deleted after each test."""


@pytest.fixture(autouse=True)
async def reply_queues(settings: Settings) -> AsyncIterator[None]:
    yield
    topology = Topology(settings.namespace)
    names = [*map(batch_reply_name, BATCH_NAMES), *PIPELINE_QUEUES]
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        for team in TEST_TEAMS:
            for name in names:
                await channel.queue_delete(topology.results_queue(team, name))


@pytest.fixture
async def teams(settings: Settings) -> AsyncIterator[dict[str, TeamIdentity]]:
    async with team_identities(settings) as identities:
        yield identities


@pytest.fixture
def alpha(teams: dict[str, TeamIdentity]) -> TeamIdentity:
    """A team added the default way: its own broker user."""
    return teams["alpha"]


@pytest.fixture
def beta(teams: dict[str, TeamIdentity]) -> TeamIdentity:
    """A team proving itself with an API key."""
    return teams["beta"]


def nobody_serves(settings: Settings) -> AbstractAsyncContextManager[Gateway]:
    """A gateway that answers control requests but serves no batch team's jobs: they wait."""
    return running_gateway(settings, teams=("gamma",))


async def consumed(settings: Settings, team: str, name: str) -> None:
    """Until a batch's reply queue has a consumer: the broker announces it to nobody."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        name = Topology(settings.namespace).results_queue(team, batch_reply_name(name))
        while True:
            queue = await channel.declare_queue(name, passive=True)
            if queue.declaration_result.consumer_count:
                return
            await asyncio.sleep(0.01)


def once_each(lines: list[dict[str, object]]) -> Counter[object]:
    return Counter(line["custom_id"] for line in lines)


def expect_each_once(lines: list[dict[str, object]], expected: int) -> Counter[object]:
    """Expect ``expected`` custom_ids in ``lines``, each once; their counts."""
    counts = once_each(lines)
    assert len(counts) == expected and set(counts.values()) == {1}
    return counts


async def forty_for_five(settings: Settings, team: str, path: Path) -> Path:
    """A batch of 40 requests written at ``path``, for ``team``, whose queue now holds 5 jobs."""
    await configure(settings, team, {"max_queue_length": 5})
    await quota_in_force(settings, team)
    return write_jsonl(path, [openai_line(i) for i in range(40)])


async def paused(
    submit: Coroutine[Any, Any, SubmitReport], pause: asyncio.Event
) -> asyncio.Task[SubmitReport]:
    """``submit`` running, once it said it paused at its team's full queue (``pause``): not
    stopped."""
    submitting = asyncio.create_task(submit)
    waiting = asyncio.create_task(pause.wait())
    await asyncio.wait({submitting, waiting}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    assert waiting.done() and not submitting.done()
    return submitting


async def test_openai_documented_lines_come_back_as_openai_output(
    settings: Settings, tmp_path: Path, alpha: TeamIdentity
) -> None:
    # Given the request lines of OpenAI's Batch guide
    source = write_jsonl(tmp_path / "docs.jsonl", OPENAI_EXAMPLE)
    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    async with running_gateway(settings):
        # When they are submitted, their model mapped to a catalog alias, and collected
        report = await submit_batch(alpha.settings, source, model="gpt-4o-mini", **alpha.who)
        await collect(alpha.settings, report.name, out, errors, idle=0.2, **alpha.who)

    # Expect one OpenAI output line each, whose body the openai SDK reads as a ChatCompletion
    lines = read_jsonl(out)
    assert sorted(line["custom_id"] for line in lines) == ["request-1", "request-2"]
    for line in lines:
        assert line["id"].startswith("batch_req_")
        assert line["error"] is None
        assert line["response"]["status_code"] == 200
        assert line["response"]["request_id"]
        completion = ChatCompletion.model_validate(line["response"]["body"])
        assert completion.choices[0].message.content
        assert "Hello world!" in completion.choices[0].message.content
        assert line["gateway"]["model_used"] == "gpt-4o-mini"
        assert Decimal(line["gateway"]["cost_usd"]) > 0
    assert errors.read_bytes() == b""


async def test_a_cheap_lines_cost_is_written_in_plain_notation(
    settings: Settings, tmp_path: Path, alpha: TeamIdentity
) -> None:
    # Given a line that costs under a millionth of a dollar (local-llama: $0.05 a Mtok in)
    line = openai_line(1, model="local-llama")
    line["body"]["max_tokens"] = 3
    source = write_jsonl(tmp_path / "cheap.jsonl", [line])
    out = tmp_path / "out.jsonl"
    async with running_gateway(settings) as gw:
        # When it is submitted and collected
        report = await submit_batch(alpha.settings, source, **alpha.who)
        await collect(alpha.settings, report.name, out, idle=0.2, **alpha.who)
        [row] = await gw.usage_rows(1)

    # Expect its cost on the output line as the result and the front door write it: text,
    # digits after a point, never a float's exponent (3.9e-07) a reader takes for another
    [written] = read_jsonl(out)
    assert Decimal(0) < row["cost_usd"] < Decimal("0.000001")
    assert written["gateway"]["cost_usd"] == plain_decimal(row["cost_usd"])
    assert written["gateway"]["cost_usd"].startswith("0.000000")


async def test_anthropic_documented_requests_come_back_as_message_batch_results(
    settings: Settings, tmp_path: Path, beta: TeamIdentity
) -> None:
    # Given Anthropic's documented requests, as the {"requests": [...]} document it shows
    source = tmp_path / "docs.json"
    source.write_bytes(orjson.dumps({"requests": ANTHROPIC_EXAMPLE}, option=orjson.OPT_INDENT_2))
    out = tmp_path / "out.jsonl"
    async with running_gateway(settings, teams=("beta",)) as gw:
        # When an API-key team runs them on the Anthropic deployment and collects them
        report = await submit_batch(beta.settings, source, model="claude-haiku", **beta.who)
        await collect(beta.settings, report.name, out, idle=0.2, **beta.who)
        sent = [call.body for call in gw.mock.requests]

    # Expect the SDK's MessageBatchIndividualResponse to read every line as succeeded
    results = [MessageBatchIndividualResponse.model_validate(line) for line in read_jsonl(out)]
    by_id = {r.custom_id: r for r in results}
    assert set(by_id) == {"my-first-request", "my-second-request"}
    first = by_id["my-first-request"].result
    assert first.type == "succeeded"
    assert first.message.content[0].type == "text"
    assert "Hello, world" in first.message.content[0].text
    assert first.message.usage.output_tokens > 0
    # and the requests reached the provider with their own max_tokens
    assert [body["max_tokens"] for body in sent if body] == [1024, 1024]


async def test_failures_are_errored_results_in_the_anthropic_format(
    settings: Settings, tmp_path: Path, alpha: TeamIdentity
) -> None:
    # Given a provider failing every call
    source = write_jsonl(tmp_path / "docs.jsonl", ANTHROPIC_EXAMPLE)
    out = tmp_path / "out.jsonl"
    faults = MockConfig(default=Behavior(error_rate=1.0, error_status=500))
    async with running_gateway(settings, mock_config=faults):
        await submit_batch(alpha.settings, source, model="claude-haiku", **alpha.who)
        await collect(alpha.settings, "docs", out, idle=0.2, **alpha.who)

    # Expect errored results the SDK reads, with an Anthropic error type
    for line in read_jsonl(out):
        result = MessageBatchIndividualResponse.model_validate(line).result
        assert result.type == "errored"
        assert result.error.error.type == "api_error"
        assert "all_providers_failed" in result.error.error.message


async def test_collected_files_escape_what_a_unicode_reader_takes_for_a_line_break(
    settings: Settings, tmp_path: Path, alpha: TeamIdentity
) -> None:
    # Given a line served and a line its provider refuses, their custom_ids holding U+2028,
    # U+2029 and NEL, which JSON leaves raw
    served, refused = openai_line(1), openai_line(2, model="local-llama")
    served["custom_id"], refused["custom_id"] = "a\u2028b", "c\u2029d\x85e"
    source = write_jsonl(tmp_path / "small.jsonl", [served, refused])
    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    faults = MockConfig(models={"llama-3.1-8b": Behavior(error_rate=1.0, error_status=400)})
    async with running_gateway(settings, mock_config=faults):
        # When they are submitted and collected
        report = await submit_batch(alpha.settings, source, **alpha.who)
        await collect(alpha.settings, report.name, out, errors, idle=0.2, **alpha.who)
    # Expect each file read line by line as Python's str.splitlines reads it, every line whole
    written = [
        [orjson.loads(line)["custom_id"] for line in path.read_text().splitlines()]
        for path in (out, errors)
    ]
    assert written == [["a\u2028b"], ["c\u2029d\x85e"]]


HELLO = [{"role": "user", "content": "Hello"}]
MALFORMED = [
    b'{"custom_id": "cut-short", "method": "POST"',
    b"[1, 2, 3]",
    b'"just a string"',
    orjson.dumps({"method": "POST", "url": "/v1/chat/completions", "body": {}}),
    orjson.dumps({**openai_line(0), "custom_id": ""}),
    orjson.dumps({**openai_line(0), "custom_id": 7}),
    orjson.dumps({**openai_line(0), "custom_id": "x" * 65}),
    orjson.dumps({**openai_line(0), "custom_id": "get", "method": "GET"}),
    orjson.dumps({**openai_line(0), "custom_id": "emb", "url": "/v1/embeddings"}),
    orjson.dumps({"custom_id": "nobody", "method": "POST", "url": "/v1/chat/completions"}),
    orjson.dumps({**openai_line(0), "custom_id": "strbody", "body": "hello"}),
    orjson.dumps({**openai_line(0), "custom_id": "nomsgs", "body": {"model": "gpt-4o-mini"}}),
    orjson.dumps({**openai_line(0), "custom_id": "empty", "body": {"messages": []}}),
    orjson.dumps(
        {**openai_line(0), "custom_id": "robot", "body": {"messages": [{"role": "robot"}]}}
    ),
    orjson.dumps(
        {**openai_line(0), "custom_id": "zero", "body": {**openai_line(0)["body"], "max_tokens": 0}}
    ),
    orjson.dumps(
        {**openai_line(0), "custom_id": "hot", "body": {**openai_line(0)["body"], "temperature": 5}}
    ),
    orjson.dumps(
        {**openai_line(0), "custom_id": "nomodel", "body": {"messages": [{"role": "user"}]}}
    ),
    orjson.dumps({**openai_line(1)}),  # a duplicate of the valid line 2
    orjson.dumps(ANTHROPIC_EXAMPLE[0]),  # an Anthropic request in an OpenAI batch
    orjson.dumps({"custom_id": "neither", "prompt": "hello"}),
]


def malformed_file(path: Path) -> tuple[Path, list[int]]:
    """Valid lines 1-3, then the 20 malformed ones with a valid line after each."""
    raw = [orjson.dumps(openai_line(i)) for i in range(3)]
    bad_numbers = []
    for i, bad in enumerate(MALFORMED):
        raw.append(bad)
        bad_numbers.append(len(raw))
        raw.append(orjson.dumps(openai_line(100 + i)))
    path.write_bytes(b"\n".join(raw) + b"\n")
    return path, bad_numbers


async def test_malformed_lines_are_reported_by_number_and_nothing_is_published(
    settings: Settings, tmp_path: Path, redis_client: aioredis.Redis, alpha: TeamIdentity
) -> None:
    # Given a file with 20 malformed lines of different kinds among valid ones
    source, bad_numbers = malformed_file(tmp_path / "bad.jsonl")

    # When it is submitted
    async with nobody_serves(settings):
        with pytest.raises(BatchInvalid) as caught:
            await submit_batch(alpha.settings, source, **alpha.who)

    # Expect each bad line reported with its number and a reason, and no job published
    assert [number for number, _ in caught.value.problems] == bad_numbers
    reasons = dict(caught.value.problems)
    assert "not JSON" in reasons[bad_numbers[0]]
    assert "method must be POST" in reasons[bad_numbers[7]]
    assert "only /v1/chat/completions" in reasons[bad_numbers[8]]
    assert "duplicate custom_id 'req-1' (first on line 2)" in reasons[bad_numbers[17]]
    assert "anthropic request in an openai batch" in reasons[bad_numbers[18]]
    assert "--skip-invalid" in str(caught.value)
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        queue = await (await connection.channel()).declare_queue(
            Topology(settings.namespace).team_queue("alpha"), passive=True
        )
        assert queue.declaration_result.message_count == 0
    assert not await redis_client.exists(Keys(settings.redis_prefix).batch("alpha", "bad"))


async def test_skip_invalid_publishes_the_valid_lines_only(
    settings: Settings, tmp_path: Path, beta: TeamIdentity
) -> None:
    # Given the file with 20 malformed lines and 23 valid ones
    source, _ = malformed_file(tmp_path / "bad.jsonl")
    out = tmp_path / "out.jsonl"
    async with running_gateway(settings, teams=("beta",)):
        # When it is submitted with skip_invalid and collected
        report = await submit_batch(beta.settings, source, skip_invalid=True, **beta.who)
        await collect(beta.settings, "bad", out, idle=0.2, **beta.who)

    # Expect the valid requests answered once each, the bad ones reported as skipped
    assert report.total == report.published == 23
    assert len(report.skipped) == 20
    expect_each_once(read_jsonl(out), 23)


@pytest.mark.timeout(300)  # 5,000 jobs through one in-process gateway: CPU-bound on a busy machine
async def test_5000_lines_with_failing_calls_answer_every_custom_id_once(
    settings: Settings, tmp_path: Path, alpha: TeamIdentity
) -> None:
    # Given 5,000 requests to a model whose provider fails 5% of calls (no fallback)
    source = write_jsonl(tmp_path / "big.jsonl", [openai_line(i) for i in range(5000)])
    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    faults = MockConfig(models={"llama-3.1-8b": Behavior(error_rate=0.05)}, seed=7)
    async with running_gateway(settings, mock_config=faults):
        # When the batch is submitted and collected
        await submit_batch(alpha.settings, source, model="local-llama", **alpha.who)
        report = await collect(alpha.settings, "big", out, errors, idle=0.2, **alpha.who)

    # Expect every custom_id exactly once across both files, failures in the error file
    ok, failed = read_jsonl(out), read_jsonl(errors)
    expect_each_once(ok + failed, 5000)
    assert {line["response"]["status_code"] for line in ok} == {200}
    assert {line["response"]["status_code"] for line in failed} == {502}
    # Each call is tried twice before it fails: about 0.05² of 5,000 jobs, some dozen, fail
    assert 0 < len(failed) < 100
    assert (report.counts.done, report.counts.failed) == (len(ok), len(failed))


async def test_a_batch_larger_than_its_teams_queue_pauses_until_a_worker_makes_room(
    settings: Settings, tmp_path: Path, alpha: TeamIdentity, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="producer.batch.submit")
    # Given a team whose queue holds 5 jobs, and a batch of 40 requests
    source = await forty_for_five(settings, "alpha", tmp_path / "full.jsonl")
    out = tmp_path / "out.jsonl"
    with logged("producer.batch.submit", "batch full paused") as pause:
        async with nobody_serves(settings):
            # When it is submitted while no worker serves the team, expect it paused at the
            # full queue, not stopped (two confirms outstanding at once: a quorum queue takes
            # the publishes in flight when it fills, so a wider window could fit all 40)
            submitting = await paused(
                submit_batch(alpha.settings, source, model="local-llama", window=2, **alpha.who),
                pause,
            )
        # and, once a worker serves the team, every request published and answered once
        async with running_gateway(settings, teams=("alpha",)):
            report = await submitting
            await collect(alpha.settings, "full", out, idle=0.2, **alpha.who)
    assert (report.published, report.stopped) == (40, None)
    expect_each_once(read_jsonl(out), 40)


@pytest.mark.parametrize("who", ["alpha", "beta"])
async def test_a_batch_is_resumed_by_one_submit_at_a_time(
    settings: Settings,
    tmp_path: Path,
    who: str,
    alpha: TeamIdentity,
    beta: TeamIdentity,
    *,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="producer.batch.submit")
    # Given a team (added the default way, or with an API key) whose queue holds 5 jobs, and
    # a submit of 40 requests paused at that full queue, no worker serving the team
    team = {"alpha": alpha, "beta": beta}[who]
    source = await forty_for_five(settings, team.team, tmp_path / "resume.jsonl")
    out = tmp_path / "out.jsonl"
    with logged("producer.batch.submit", "batch resume paused") as pause:
        async with nobody_serves(settings):
            first = await paused(
                submit_batch(team.settings, source, name="resume", window=2, **team.who), pause
            )
            # When three more submits of it start, to resume it, while the first runs
            # (each that resumed would pause at the full queue too)
            async with asyncio.timeout(30):
                others = await asyncio.gather(
                    *(
                        submit_batch(team.settings, source, name="resume", **team.who)
                        for _ in range(3)
                    ),
                    return_exceptions=True,
                )
            # Expect each to stop in one line, having published nothing (the queue's room
            # stays the first submit's)
            assert all(isinstance(run, BatchError) for run in others), others
            assert all("is being submitted by another run at once" in str(r) for r in others)
        # and, once a worker serves the team, the first to publish each request once, each
        # answered once
        async with running_gateway(settings, teams=(team.team,)) as gw:
            report = await first
            await collect(team.settings, "resume", out, idle=0.2, **team.who)
            calls = gw.mock.stats.calls
    assert (report.published, report.already) == (40, 0)
    expect_each_once(read_jsonl(out), 40)
    assert calls == 40


async def test_a_submit_that_lost_its_lock_with_its_connection_stops(
    settings: Settings, tmp_path: Path, alpha: TeamIdentity, *, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="producer.batch.submit")
    # Given a submit of 40 requests through a broker connection we can cut, paused at its
    # team's full queue (5 jobs), no worker serving the team
    source = await forty_for_five(settings, "alpha", tmp_path / "cut.jsonl")
    out = tmp_path / "out.jsonl"
    with logged("producer.batch.submit", "batch cut paused") as pause:
        async with nobody_serves(settings), TcpProxy(alpha.settings.amqp_url) as proxy:
            cut_off = alpha.settings.model_copy(update={"amqp_url": proxy.url})
            first = await paused(
                submit_batch(cut_off, source, name="cut", window=2, **alpha.who), pause
            )
            # When its connection drops (the broker releases its lock), another submit of
            # the batch starts and takes the lock, and the connection comes back
            await proxy.down()
            second = asyncio.create_task(
                submit_batch(alpha.settings, source, name="cut", **alpha.who)
            )
            await wait_until(lambda: len(paused_lines(caplog, "cut")) >= 2)
            await proxy.up()
            # Expect the first to stop, saying why in a line, rather than publish alongside
            with pytest.raises(ServiceUnavailable, match="lost batch 'cut''s submit lock"):
                await asyncio.wait_for(first, 60)
        # and the second to publish the rest, each request called and answered once
        async with running_gateway(settings, teams=("alpha",)) as gw:
            report = await asyncio.wait_for(second, 60)
            await collect(alpha.settings, "cut", out, idle=0.2, **alpha.who)
            calls = gw.mock.stats.calls
    assert report.published + report.already == 40
    expect_each_once(read_jsonl(out), 40)
    assert calls == 40


@pytest.mark.parametrize("who", ["alpha", "beta"])
async def test_a_new_batch_cut_before_recording_its_published_jobs_is_kept(
    settings: Settings,
    tmp_path: Path,
    who: str,
    alpha: TeamIdentity,
    beta: TeamIdentity,
    *,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="producer.batch.submit")
    caplog.set_level(logging.INFO, logger="queuegate.broker")
    # Given a team (added the default way, or with an API key) whose queue holds 5 jobs, and
    # a submit of a new batch of 40 requests through a connection we can cut, paused at the
    # full queue: 5 jobs published and confirmed, none recorded yet
    team = {"alpha": alpha, "beta": beta}[who]
    source = await forty_for_five(settings, team.team, tmp_path / "cut.jsonl")
    out = tmp_path / "out.jsonl"
    with (
        logged("producer.batch.submit", "batch cut paused") as pause,
        logged("queuegate.broker", "connection lost while asking the gateway") as asking,
    ):
        async with nobody_serves(settings), TcpProxy(team.settings.amqp_url) as proxy:
            # A publish the cut catches in flight gives up after 10 s, and the submit goes on
            # to record: a robust connection tries again every 5 s, so it is back by then.
            cut_off = team.settings.model_copy(update={"amqp_url": proxy.url, "reconnect_wait": 10})
            first = await paused(
                submit_batch(cut_off, source, name="cut", window=2, **team.who), pause
            )
            # When its connection drops while it records them, and it is interrupted there
            await proxy.down()
            await asyncio.wait_for(asking.wait(), 30)
            first.cancel()
            await proxy.up()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(first, 60)
            # Expect the batch kept (its 5 jobs are queued, their results bound for its queue)
            status = await batch_status(team.settings, "cut", **team.who)
            assert status.counts.total == 40
        # and the same submit, run again, to resume it: each request called and answered once
        async with running_gateway(settings, teams=(team.team,)) as gw:
            report = await submit_batch(team.settings, source, name="cut", **team.who)
            await collect(team.settings, "cut", out, idle=0.2, **team.who)
            calls = gw.mock.stats.calls
    assert report.published == 40
    expect_each_once(read_jsonl(out), 40)
    assert calls == 40


def paused_lines(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    """The lines of submits of batch ``name`` saying they paused at its full queue."""
    return [
        message
        for record in caplog.records
        if record.name == "producer.batch.submit"
        and (message := record.getMessage()).startswith(f"batch {name} paused")
    ]


@pytest.mark.parametrize("who", ["alpha", "beta"])
async def test_submits_of_one_new_batch_at_once_publish_it_once(
    settings: Settings, tmp_path: Path, who: str, alpha: TeamIdentity, beta: TeamIdentity
) -> None:
    # Given a gateway, and a team (added the default way, or with an API key)
    team = {"alpha": alpha, "beta": beta}[who]
    total = 30
    source = write_jsonl(tmp_path / "race.jsonl", [openai_line(i) for i in range(total)])
    out = tmp_path / "out.jsonl"
    async with running_gateway(settings, teams=(team.team,)) as gw:
        # When five submits of one new batch run at once (each found no batch of the name,
        # and each would have recorded its own submission and published all of it)
        runs = await asyncio.gather(
            *(submit_batch(team.settings, source, name="race", **team.who) for _ in range(5)),
            return_exceptions=True,
        )
        # ... then it is submitted again to resume it, and collected
        await submit_batch(team.settings, source, name="race", **team.who)
        await collect(team.settings, "race", out, idle=0.2, **team.who)
        calls = gw.mock.stats.calls

    # Expect the ones that stopped to say why in a line, each request called once and
    # answered once
    stopped = [run for run in runs if isinstance(run, BaseException)]
    assert all(isinstance(run, BatchError) for run in stopped), stopped
    assert all("is being submitted by another run at once" in str(run) for run in stopped)
    assert len(stopped) >= 4
    expect_each_once(read_jsonl(out), total)
    assert calls == total


async def test_a_killed_submit_resumes_without_answering_twice(
    settings: Settings, tmp_path: Path, redis_client: aioredis.Redis, alpha: TeamIdentity
) -> None:
    # Given a gateway, and `batch submit` of 2,000 lines killed once it recorded confirms
    # (enough lines that the submit is still publishing when the first record is seen)
    total = 2_000
    source = write_jsonl(tmp_path / "resume.jsonl", [openai_line(i) for i in range(total)])
    published = Keys(settings.redis_prefix).batch_published("alpha", "resume")
    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    async with running_gateway(settings):
        first = start_cli(alpha.settings, "batch", "submit", str(source), "--team", "alpha")

        async def recorded() -> int:
            return int(await redis_client.scard(published))

        # Another process's progress: no event announces it, so it is polled.
        while (n := await recorded()) == 0 and first.poll() is None:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        kill(first)
        assert n < total, "the first submit finished before it could be killed"

        # When it is run again to the end, and the batch collected
        second = start_cli(alpha.settings, "batch", "submit", str(source), "--team", "alpha")
        _, stderr = await asyncio.to_thread(second.communicate)
        assert second.returncode == 0, stderr.decode()
        await collect(alpha.settings, "resume", out, errors, idle=0.2, **alpha.who)

    # Expect every custom_id answered exactly once
    expect_each_once(read_jsonl(out, errors), total)


async def test_a_killed_collect_resumes_without_writing_twice(
    settings: Settings, tmp_path: Path, beta: TeamIdentity
) -> None:
    # Given a submitted batch of 600 and `batch collect` killed after 100 lines
    total = KILLED_TOTAL
    out = tmp_path / "out.jsonl"
    async with collect_killed(settings, beta, tmp_path / "resume.jsonl", out):
        written_before = len(read_jsonl(out))

        # When it is run again
        await collect(beta.settings, "resume", out, idle=0.2, **beta.who)

    # Expect every custom_id exactly once in the file
    assert written_before < total, "the first collect finished before it could be killed"
    expect_each_once(read_jsonl(out), total)


async def test_cancel_answers_the_rest_canceled_without_calling_a_provider(
    settings: Settings, tmp_path: Path, beta: TeamIdentity
) -> None:
    # Given a batch waiting in a queue no worker serves yet
    source = write_jsonl(tmp_path / "cancel.jsonl", ANTHROPIC_EXAMPLE * 1)
    out = tmp_path / "out.jsonl"
    async with nobody_serves(settings):
        await submit_batch(beta.settings, source, model="claude-haiku", **beta.who)
        # When it is canceled and a worker then takes its jobs
        await cancel_batch(beta.settings, "cancel", **beta.who)
    async with running_gateway(settings, teams=("beta",)) as gw:
        rows = await gw.usage_rows(2)
        await collect(beta.settings, "cancel", out, idle=0.2, **beta.who)
        calls = gw.mock.stats.calls

    # Expect canceled results, answered by the worker without a provider call
    assert {row["error_code"] for row in rows} == {"canceled"}
    assert calls == 0
    for line in read_jsonl(out):
        assert MessageBatchIndividualResponse.model_validate(line).result.type == "canceled"


async def test_cancel_keeps_the_answers_of_calls_already_in_flight(
    settings: Settings, tmp_path: Path, alpha: TeamIdentity
) -> None:
    # Given 20 requests, each call taking a second, 4 served at once (the rest wait)
    source = write_jsonl(tmp_path / "cancel.jsonl", [openai_line(i) for i in range(20)])
    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    slow = MockConfig(default=Behavior(latency_ms=1000))
    served = settings.model_copy(update={"prefetch": 4})
    async with running_gateway(served, mock_config=slow) as gw:
        await submit_batch(alpha.settings, source, **alpha.who)
        await wait_until(lambda: gw.mock.stats.calls >= 4, timeout=30)
        # When the batch is canceled while those calls run, and collected
        await cancel_batch(alpha.settings, "cancel", **alpha.who)
        report = await collect(alpha.settings, "cancel", out, errors, idle=0.2, **alpha.who)
        rows = await gw.usage_rows(20)

    # Expect each line to say what the worker did: the paid answers done, the rest canceled
    paid = {row["job_id"].split(":", 1)[1] for row in rows if row["status"] == "ok"}
    assert len(paid) >= 4
    done = {line["custom_id"] for line in read_jsonl(out)}
    assert done == paid
    assert {line["error"]["code"] for line in read_jsonl(errors)} == {"batch_cancelled"}
    assert report.counts.done == len(paid) and report.counts.canceled == 20 - len(paid)
    assert report.counts.spend_usd > 0


async def test_cancel_stops_the_jobs_a_worker_holds_waiting_for_admission(
    settings: Settings, tmp_path: Path, alpha: TeamIdentity
) -> None:
    # Given 12 requests of a team admitted two a second, all held by the worker at once
    await register(settings, "alpha", TeamConfig(rpm=120, burst=1))
    source = write_jsonl(tmp_path / "cancel.jsonl", [openai_line(i) for i in range(12)])
    out = tmp_path / "out.jsonl"
    async with running_gateway(settings) as gw:
        await submit_batch(alpha.settings, source, **alpha.who)
        await wait_until(lambda: gw.mock.stats.calls >= 2, timeout=30)
        # When the batch is canceled while the rest wait for admission, and collected
        await cancel_batch(alpha.settings, "cancel", **alpha.who)
        at_cancel = gw.mock.stats.calls
        report = await collect(alpha.settings, "cancel", out, idle=0.2, **alpha.who)
        rows = await gw.usage_rows(12)
        calls = gw.mock.stats.calls

    # Expect no call after the cancel but one already past its check, and only calls billed
    assert calls <= at_cancel + 1
    paid = [row for row in rows if row["status"] == "ok"]
    assert len(paid) == calls == report.counts.done
    canceled = [row for row in rows if row["status"] != "ok"]
    assert {row["error_code"] for row in canceled} == {"canceled"}
    assert all(row["cost_usd"] == 0 for row in canceled)
    assert report.counts.canceled == 12 - calls


async def test_cancel_ends_a_slow_teams_batch_at_once_and_frees_its_live_traffic(
    settings: Settings, tmp_path: Path, alpha: TeamIdentity
) -> None:
    # Given a team admitted one request every 10 s, and a batch of 20 requests, most of
    # them held by the worker waiting their turn (at that rate, 190 s of turns)
    await register(settings, "alpha", TeamConfig(rpm=6, burst=1))
    source = write_jsonl(tmp_path / "cancel.jsonl", [openai_line(i) for i in range(20)])
    out = tmp_path / "out.jsonl"
    async with (
        running_gateway(settings) as gw,
        GatewayClient(alpha.settings, **alpha.who) as client,
    ):
        await submit_batch(alpha.settings, source, **alpha.who)
        await wait_until(lambda: gw.mock.stats.calls >= 1, timeout=30)
        # When the batch is canceled after its first call, and the team then sends a request
        await cancel_batch(alpha.settings, "cancel", **alpha.who)
        at_cancel = gw.mock.stats.calls
        live = client.chat("gpt-4o-mini", [{"role": "user", "content": "Hi"}], timeout=20)
        ending = collect(alpha.settings, "cancel", out, idle=0.2, **alpha.who)
        # Expect the batch to end, and the request to be answered, within the bucket's next
        # turn (10 s): not after the turns of the lines that were waiting
        report, answer = await asyncio.wait_for(asyncio.gather(ending, live), 20)
        calls = gw.mock.stats.calls

    # Expect no canceled line called: the only call since the cancel is the live request's
    assert answer.content
    assert at_cancel == 1 and calls == at_cancel + 1
    assert report.counts.done == at_cancel
    assert report.counts.canceled == 20 - at_cancel


async def test_a_running_batch_is_not_deleted_until_canceled_and_answered(
    settings: Settings, tmp_path: Path, alpha: TeamIdentity
) -> None:
    # Given 12 requests of a team admitted two a second, most held waiting for their turn
    await register(settings, "alpha", TeamConfig(rpm=120, burst=1))
    source = write_jsonl(tmp_path / "cancel.jsonl", [openai_line(i) for i in range(12)])
    async with running_gateway(settings) as gw:
        await submit_batch(alpha.settings, source, **alpha.who)
        await wait_until(lambda: gw.mock.stats.calls >= 2, timeout=30)
        # When the team deletes it mid-run
        with pytest.raises(ControlRefused) as refused:
            await delete_batch(alpha.settings, "cancel", **alpha.who)
        # Expect it refused in one line saying to cancel first, the batch kept (before: its
        # record went while its held jobs were still called and billed, answers to nobody)
        said = str(refused.value)
        assert "\n" not in said and "cancel it first (queuegate batch cancel cancel)" in said
        assert (await batch_status(alpha.settings, "cancel", **alpha.who)).counts.total == 12
        # When it is canceled, and deleted once every request is answered
        await cancel_batch(alpha.settings, "cancel", **alpha.who)
        at_cancel = gw.mock.stats.calls
        rows = await gw.usage_rows(12)
        await delete_batch(alpha.settings, "cancel", **alpha.who)
        calls = gw.mock.stats.calls
        with pytest.raises(BatchError, match="no batch named 'cancel'"):
            await batch_status(alpha.settings, "cancel", **alpha.who)

    # Expect no call after the cancel but one already past its check; the rest unpaid
    assert calls <= at_cancel + 1
    assert len([row for row in rows if row["status"] == "ok"]) == calls
    canceled = [row for row in rows if row["status"] != "ok"]
    assert {row["error_code"] for row in canceled} == {"canceled"}
    assert len(canceled) == 12 - calls and all(row["cost_usd"] == 0 for row in canceled)


async def test_requests_past_the_deadline_are_written_expired(
    settings: Settings, tmp_path: Path, alpha: TeamIdentity
) -> None:
    # Given a batch with a one-second deadline in a queue nobody serves
    source = write_jsonl(tmp_path / "expire.jsonl", [openai_line(i) for i in range(5)])
    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    async with nobody_serves(settings):
        await submit_batch(alpha.settings, source, deadline=timedelta(seconds=1), **alpha.who)

        # When it is collected
        report = await collect(
            alpha.settings, "expire", out, errors, idle=0.2, expiry_grace=0, **alpha.who
        )

    # Expect every request in the error file as batch_expired, as OpenAI writes it
    assert out.read_bytes() == b""
    lines = read_jsonl(errors)
    assert len(once_each(lines)) == 5
    assert {(line["response"], line["error"]["code"]) for line in lines} == {
        (None, "batch_expired")
    }
    assert report.counts.expired == 5


async def test_status_counts_results_and_spend(
    settings: Settings, tmp_path: Path, alpha: TeamIdentity
) -> None:
    # Given a batch of 10, all answered, collected from its queue by nobody yet
    source = write_jsonl(tmp_path / "small.jsonl", [openai_line(i) for i in range(10)])
    async with running_gateway(settings) as gw:
        await submit_batch(alpha.settings, source, **alpha.who)
        await gw.usage_rows(10)

        # When its status is read
        status = await batch_status(alpha.settings, "small", **alpha.who)

    # Expect every request published and waiting in the queue to be collected
    c = status.counts
    assert (c.total, c.published, c.done, status.waiting, status.queued) == (10, 10, 0, 10, 0)


async def test_a_status_read_with_no_worker_running_says_so_at_once(
    alpha: TeamIdentity, beta: TeamIdentity
) -> None:
    # Given teams no worker serves: none runs
    # When a batch's status and a team's batches are read, by a broker user and by an API key
    async with asyncio.timeout(5):  # before: each waited 30 s for an answer
        # Expect each told at once that no worker serves the team
        with pytest.raises(ServiceUnavailable, match="no worker serves team 'alpha'"):
            await batch_status(alpha.settings, "small", **alpha.who)
        with pytest.raises(ServiceUnavailable, match="no worker serves team 'beta'"):
            await batch_list(beta.settings, **beta.who)


async def test_a_collected_batch_is_gone_and_listed_until_then(
    settings: Settings, tmp_path: Path, alpha: TeamIdentity
) -> None:
    # Given a batch submitted and answered
    source = write_jsonl(tmp_path / "small.jsonl", [openai_line(i) for i in range(3)])
    async with running_gateway(settings) as gw:
        await submit_batch(alpha.settings, source, **alpha.who)
        listed = await batch_list(alpha.settings, **alpha.who)
        # When it is collected
        report = await collect(alpha.settings, "small", tmp_path / "out.jsonl", **alpha.who)
        after = await batch_list(alpha.settings, **alpha.who)
        async with BrokerAdmin.of(settings) as admin:
            results = await admin.queue(
                gw.topology.results_queue("alpha", batch_reply_name("small"))
            )
        with pytest.raises(BatchError, match="no batch named 'small'"):
            await batch_status(alpha.settings, "small", **alpha.who)

    # Expect it listed while it ran, then gone with its results queue, its counts reported
    assert [(b.name, b.total) for b in listed] == [("small", 3)]
    assert after == [] and results is None
    assert report.counts.done == 3 and report.counts.spend_usd > 0


async def test_a_collect_whose_reader_left_still_collects_the_whole_batch(
    settings: Settings, tmp_path: Path, alpha: TeamIdentity
) -> None:
    # Given a batch submitted and answered
    source = write_jsonl(tmp_path / "small.jsonl", [openai_line(i) for i in range(3)])
    out = tmp_path / "out.jsonl"
    async with running_gateway(settings) as gw:
        await submit_batch(alpha.settings, source, **alpha.who)
        await wait_until_answered(alpha, "small", 3)
        # When it is collected into a file, its progress and summary going to a pipe whose
        # reader is gone (`2>&1 | head -1`)
        collecting = cli_to_a_gone_reader(
            alpha.settings, *("batch", "collect", "small", "--team", "alpha", "--out", str(out))
        )
        status = await asyncio.to_thread(collecting.wait, 60)
        listed = await batch_list(alpha.settings, **alpha.who)
        async with BrokerAdmin.of(settings) as admin:
            results = await admin.queue(
                gw.topology.results_queue("alpha", batch_reply_name("small"))
            )

    # Expect status 0, every line written once, and the batch collected: gone with its
    # results queue (before: its first progress line ended it quietly, nothing acknowledged)
    assert status == 0
    expect_each_once(read_jsonl(out), 3)
    assert listed == [] and results is None


async def test_a_submit_whose_reader_left_still_publishes_the_whole_batch(
    settings: Settings, tmp_path: Path, alpha: TeamIdentity
) -> None:
    # Given the file with 20 malformed lines among valid ones
    source, _ = malformed_file(tmp_path / "bad.jsonl")
    skipped = tmp_path / "skipped.jsonl"
    async with nobody_serves(settings):
        # When it is submitted with --skip-invalid, its progress, problems and summary going
        # to a pipe whose reader is gone (`2>&1 | head -1`)
        submitting = cli_to_a_gone_reader(
            alpha.settings,
            *("batch", "submit", str(source), "--team", "alpha", "--skip-invalid"),
            *("--skipped", str(skipped)),
        )
        status = await asyncio.to_thread(submitting.wait, 60)
        report = await batch_status(alpha.settings, "bad", **alpha.who)

    # Expect status 0, every valid request published and the skipped lines listed in their
    # file (before: its first progress line ended it quietly, the rest not published)
    assert status == 0
    assert report.counts.published == report.counts.total == 23
    assert len(read_jsonl(skipped)) == 14


@pytest.mark.parametrize("who", ["alpha", "beta"])
async def test_a_batchs_results_queue_is_not_deleted_as_a_reply_queue(
    settings: Settings, tmp_path: Path, who: str, alpha: TeamIdentity, beta: TeamIdentity
) -> None:
    # Given a team's batch, answered and not yet collected
    team = {"alpha": alpha, "beta": beta}[who]
    source = write_jsonl(tmp_path / "kept.jsonl", [openai_line(i) for i in range(3)])
    out = tmp_path / "out.jsonl"
    async with running_gateway(settings, teams=(team.team,)):
        await submit_batch(team.settings, source, **team.who)
        # When the team deletes the batch's results queue as a reply queue of its own
        with pytest.raises(ControlRefused, match="is the results queue of batch 'kept'") as by:
            await delete_reply_queue(team.settings, "kept:results", **team.who)
        # ... or a reply queue of the batch's name, which it has not
        missing = await delete_reply_queue(team.settings, "kept", **team.who)
        # Expect the first refused, pointing to batch delete; nothing deleted; the batch's
        # answers kept
        report = await collect(team.settings, "kept", out, idle=0.2, **team.who)
    assert "run queuegate batch delete kept" in str(by.value)
    assert missing is None
    assert report.counts.written == 3


@pytest.mark.parametrize("who", ["alpha", "beta"])
async def test_a_batch_named_as_a_pipelines_reply_queue_leaves_its_results(
    settings: Settings, tmp_path: Path, who: str, alpha: TeamIdentity, beta: TeamIdentity
) -> None:
    # Given a team's pipeline whose named reply queue "nightly" holds 3 results unread
    team = {"alpha": alpha, "beta": beta}[who]
    async with (
        nobody_serves(settings),
        GatewayClient(team.settings, reply_queue="nightly", **team.who) as pipeline,
    ):
        for i in range(3):
            await pipeline.submit(
                pipeline.job("gpt-4o-mini", [{"role": "user", "content": f"{i}"}])
            )
    source = write_jsonl(tmp_path / "nightly.jsonl", [openai_line(i) for i in range(5)])
    out = tmp_path / "out.jsonl"
    async with running_gateway(settings, teams=(team.team,)):
        await results_in(settings, Topology.of(settings).results_queue(team.team, "nightly"), 3)
        # When a batch of the same name is submitted and collected
        await submit_batch(team.settings, source, name="nightly", **team.who)
        report = await collect(team.settings, "nightly", out, idle=0.2, **team.who)
        # Expect the batch's own lines written, each once, and the pipeline's results kept:
        # its queue is still there to give back, with all 3
        dropped = await delete_reply_queue(team.settings, "nightly", **team.who)
    assert report.counts.written == 5
    expect_each_once(read_jsonl(out), 5)
    assert dropped == 3


@pytest.mark.parametrize("who", ["alpha", "beta"])
async def test_a_batch_an_earlier_version_submitted_keeps_the_queue_of_its_name(
    settings: Settings, who: str, alpha: TeamIdentity, beta: TeamIdentity
) -> None:
    # Given a batch "nightly" recorded as an earlier version's submit records it: a record
    # without own_queue, its jobs' results bound for the named reply queue of its name
    team = {"alpha": alpha, "beta": beta}[who]
    queue = Topology.of(settings).results_queue(team.team, "nightly")
    meta = BatchMeta(
        name="nightly",
        team=team.team,
        format="openai",
        total=1,
        deadline=datetime.now(UTC) + timedelta(hours=1),
        fingerprint="0" * 64,
        submission="0a1b2c3d",
    ).model_dump(mode="json", exclude={"own_queue"})
    async with (
        nobody_serves(settings),
        GatewayClient(team.settings, listen=False, **team.who) as client,
    ):
        await client.control.batch("index", "nightly", entries=[["request-0", 1]], run="1")
        await client.control.batch("create", "nightly", meta=meta, run="1")
        await results_in(settings, queue, 0)
        # When the team deletes that queue as a reply queue
        with pytest.raises(ControlRefused, match="is the results queue of batch 'nightly'"):
            await delete_reply_queue(team.settings, "nightly", **team.who)
        # Expect it refused while the batch is kept, and deleted with the batch
        await delete_batch(team.settings, "nightly", **team.who)
        assert await delete_reply_queue(team.settings, "nightly", **team.who) is None


async def results_in(settings: Settings, queue: str, expected: int) -> None:
    """Until ``queue`` holds ``expected`` results: the broker announces no arrival."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection, asyncio.timeout(30):
        channel = await connection.channel()
        while True:
            declared = await channel.declare_queue(queue, passive=True)
            if declared.declaration_result.message_count >= expected:
                return
            await asyncio.sleep(0.02)


async def test_a_team_reaches_only_its_own_batches(
    settings: Settings, tmp_path: Path, alpha: TeamIdentity, beta: TeamIdentity
) -> None:
    # Given alpha's batch "small" waiting in its queue
    source = write_jsonl(tmp_path / "small.jsonl", [openai_line(i) for i in range(3)])
    async with nobody_serves(settings):
        await submit_batch(alpha.settings, source, **alpha.who)
        # When beta, with its own key, reads or cancels a batch of that name
        with pytest.raises(BatchError, match="no batch named 'small' for team 'beta'"):
            await cancel_batch(beta.settings, "small", **beta.who)
        with pytest.raises(BatchError, match="no batch named 'small'"):
            await batch_status(beta.settings, "small", **beta.who)
        # ... or alpha's own user claims to be beta
        with pytest.raises(ControlRefused, match="credentials are not 'beta'"):
            await cancel_batch(alpha.settings, "small", team="beta")
        # Expect alpha's batch untouched, and nothing listed for beta
        status = await batch_status(alpha.settings, "small", **alpha.who)
        assert not status.counts.canceled_flag and status.counts.published == 3
        assert await batch_list(beta.settings, **beta.who) == []


async def test_a_mistyped_team_fails_before_any_state(
    settings: Settings, tmp_path: Path, redis_client: aioredis.Redis, alpha: TeamIdentity
) -> None:
    source = write_jsonl(tmp_path / "small.jsonl", [openai_line(i) for i in range(3)])
    async with nobody_serves(settings):
        # When alpha's credentials submit for "alhpa"
        with pytest.raises(PublishRefused, match="no team 'alhpa'"):
            await submit_batch(alpha.settings, source, team="alhpa")
        # Expect nothing recorded: the right team then submits the batch under that name
        assert not [key async for key in redis_client.scan_iter(f"{settings.redis_prefix}:batch*")]
        report = await submit_batch(alpha.settings, source, **alpha.who)
    assert report.published == 3


async def test_a_failed_submit_leaves_no_batch_behind(
    settings: Settings, tmp_path: Path, beta: TeamIdentity
) -> None:
    # Given beta's job queue gone (no job of its can be routed)
    source = write_jsonl(tmp_path / "small.jsonl", [openai_line(i) for i in range(3)])
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        await (await connection.channel()).queue_delete(
            Topology(settings.namespace).team_queue("beta")
        )
    async with nobody_serves(settings):
        # When its batch is submitted
        with pytest.raises(PublishRefused, match="no queue for team 'beta'"):
            await submit_batch(beta.settings, source, **beta.who)
        # Expect no batch left to lock the name
        assert await batch_list(beta.settings, **beta.who) == []


async def test_a_resubmitted_batch_publishes_nothing_new_and_refuses_another_file(
    settings: Settings, tmp_path: Path, beta: TeamIdentity
) -> None:
    # Given a batch submitted in full
    source = write_jsonl(tmp_path / "small.jsonl", [openai_line(i) for i in range(10)])
    async with nobody_serves(settings):
        await submit_batch(beta.settings, source, **beta.who)

        # When it is submitted again, then with a different file under its name
        again = await submit_batch(beta.settings, source, **beta.who)
        other = write_jsonl(tmp_path / "other.jsonl", [openai_line(i) for i in range(11)])

        # Expect nothing published twice, and the other file refused
        assert (again.published, again.already) == (0, 10)
        with pytest.raises(BatchError, match="another file"):
            await submit_batch(beta.settings, other, name="small", **beta.who)


async def test_a_resubmitted_batch_refuses_another_model_and_resumes_with_its_own(
    settings: Settings, tmp_path: Path, beta: TeamIdentity
) -> None:
    # Given a batch submitted in full with --model
    source = write_jsonl(tmp_path / "small.jsonl", [openai_line(i) for i in range(10)])
    async with nobody_serves(settings):
        await submit_batch(beta.settings, source, model="gpt-4o-mini", **beta.who)

        # When it is submitted again with another --model, then without one
        # Expect the other model refused, saying how to resume, and no --model resuming it
        with pytest.raises(BatchError, match="submitted with --model gpt-4o-mini: re-run"):
            await submit_batch(beta.settings, source, model="claude-haiku", **beta.who)
        again = await submit_batch(beta.settings, source, **beta.who)
        assert (again.published, again.already) == (0, 10)


async def test_a_second_collect_of_the_same_batch_is_refused(
    settings: Settings, tmp_path: Path, alpha: TeamIdentity
) -> None:
    # Given a batch being collected, waiting for results no worker will send
    source = write_jsonl(tmp_path / "small.jsonl", [openai_line(i) for i in range(3)])
    async with nobody_serves(settings):
        await submit_batch(alpha.settings, source, **alpha.who)
        first = asyncio.create_task(
            collect(alpha.settings, "small", tmp_path / "a.jsonl", idle=0.05, **alpha.who)
        )
        try:
            await consumed(settings, "alpha", "small")

            # When another collect of it starts
            with pytest.raises(BatchError, match="being collected by another process"):
                await collect(alpha.settings, "small", tmp_path / "b.jsonl", **alpha.who)
        finally:
            first.cancel()
        # Expect the first to go on undisturbed until stopped
        with pytest.raises(asyncio.CancelledError):
            await first


async def test_collecting_into_a_file_holding_another_batchs_lines_writes_this_ones(
    settings: Settings, tmp_path: Path, alpha: TeamIdentity
) -> None:
    # Given batch "docs" collected into results.jsonl, and batch "small" with the same custom_ids
    out = tmp_path / "results.jsonl"
    first = write_jsonl(tmp_path / "docs.jsonl", [openai_line(i) for i in range(3)])
    second = write_jsonl(tmp_path / "small.jsonl", [openai_line(i) for i in range(3)])
    async with running_gateway(settings):
        await submit_batch(alpha.settings, first, **alpha.who)
        await collect(alpha.settings, "docs", out, idle=0.2, **alpha.who)
        await submit_batch(alpha.settings, second, **alpha.who)
        # When "small" is collected into the same file
        report = await collect(alpha.settings, "small", out, idle=0.2, **alpha.who)

    # Expect its own three lines written, beside the other batch's
    assert report.written == 3
    jobs = Counter(line["gateway"]["job_id"].split(".")[0] for line in read_jsonl(out))
    assert jobs == {"docs": 3, "small": 3}


async def test_collect_rides_out_a_broker_outage_without_writing_twice(
    settings: Settings, tmp_path: Path, alpha: TeamIdentity
) -> None:
    # Given a batch of 300 being collected through a connection to the broker we can cut
    total = 300
    source = write_jsonl(tmp_path / "resume.jsonl", [openai_line(i) for i in range(total)])
    out = tmp_path / "out.jsonl"
    async with running_gateway(settings), TcpProxy(alpha.settings.amqp_url) as proxy:
        await submit_batch(alpha.settings, source, **alpha.who)
        cut_off = alpha.settings.model_copy(update={"amqp_url": proxy.url})
        collecting = asyncio.create_task(collect(cut_off, "resume", out, idle=0.2, **alpha.who))
        await wait_until(lambda: out.exists() and out.read_bytes().count(b"\n") >= 100)

        # When the broker connection is cut mid-way and comes back
        await proxy.down()
        await proxy.up()
        report = await asyncio.wait_for(collecting, 60)

    # Expect every custom_id exactly once
    expect_each_once(read_jsonl(out), total)
    assert report.counts.written == total


async def test_a_model_outside_the_catalog_is_an_invalid_line(
    settings: Settings, tmp_path: Path, alpha: TeamIdentity
) -> None:
    # Given OpenAI's documented lines, whose model is not a catalog alias
    source = write_jsonl(tmp_path / "docs.jsonl", OPENAI_EXAMPLE)

    # When they are submitted against the catalog's aliases
    async with nobody_serves(settings):
        with pytest.raises(BatchInvalid) as caught:
            await submit_batch(alpha.settings, source, models={"gpt-4o-mini"}, **alpha.who)

    # Expect both lines reported, naming the model and the way out
    assert caught.value.problems == [
        (n, "model 'gpt-3.5-turbo-0125' is not in the catalog: pass --model ALIAS") for n in (1, 2)
    ]


async def test_a_request_over_the_job_size_limit_is_an_invalid_line(
    settings: Settings, tmp_path: Path, alpha: TeamIdentity
) -> None:
    # Given a file whose second line carries a 2 MB prompt
    huge = {
        **openai_line(1),
        "body": {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "x" * 2_000_000}],
        },
    }
    source = write_jsonl(tmp_path / "bad.jsonl", [openai_line(0), huge, openai_line(2)])

    # When it is submitted
    async with nobody_serves(settings):
        with pytest.raises(BatchInvalid) as caught:
            await submit_batch(alpha.settings, source, **alpha.who)
        listed = await batch_list(alpha.settings, **alpha.who)

    # Expect it refused at validation, by its line number, and nothing recorded
    [(number, reason)] = caught.value.problems
    assert number == 2 and reason == "the request is larger than 1048576 bytes: send less"
    assert listed == []


async def test_skip_invalid_lists_every_skipped_line_in_a_file(
    settings: Settings, tmp_path: Path, alpha: TeamIdentity
) -> None:
    # Given the file with 20 malformed lines among valid ones
    source, bad_numbers = malformed_file(tmp_path / "bad.jsonl")
    skipped = tmp_path / "skipped.jsonl"
    async with nobody_serves(settings):
        # When the team's CLI submits it with --skip-invalid
        cli = start_cli(
            alpha.settings,
            *("batch", "submit", str(source), "--team", "alpha", "--skip-invalid"),
            *("--skipped", str(skipped)),
        )
        stdout, stderr = await asyncio.to_thread(cli.communicate)
    assert cli.returncode == 0, stderr.decode()

    # Expect every skipped line in the file with its reason, not only on the terminal; the
    # requests /v1/chat/completions refuses (no messages to a temperature of 5) are not
    # skipped but named, and answered by collect as failed lines (tests/test_batch_checks.py)
    refused = bad_numbers[11:17]
    listed = read_jsonl(skipped)
    assert [entry["line"] for entry in listed] == [n for n in bad_numbers if n not in refused]
    assert all(entry["reason"] for entry in listed)
    assert str(skipped) in stderr.decode()
    assert all(f"{source}:{number}: " in stderr.decode() for number in refused)
    assert f"{len(refused)} refused" in " ".join(stdout.decode().split())


def _asking(questions: range, prefix: str) -> list[dict[str, object]]:
    lines = []
    for i in questions:
        line = openai_line(i)
        line["body"] = {**line["body"], "messages": [{"role": "user", "content": f"{prefix} {i}"}]}
        lines.append(line)
    return lines


async def test_a_name_submitted_again_after_collect_is_answered_afresh(
    settings: Settings, tmp_path: Path, beta: TeamIdentity
) -> None:
    # Given an API-key team's batch "small" submitted and collected into results.jsonl
    out = tmp_path / "results.jsonl"
    same = write_jsonl(tmp_path / "same.jsonl", [openai_line(i) for i in range(3)])
    other = write_jsonl(tmp_path / "other.jsonl", _asking(range(3), "Another question"))
    async with running_gateway(settings, teams=("beta",)) as gw:
        await submit_batch(beta.settings, same, name="small", **beta.who)
        await collect(beta.settings, "small", out, idle=0.2, **beta.who)
        calls = len(gw.mock.requests)

        # When the name is submitted again with the same prompts, then with other prompts,
        # each collected into the same file
        await submit_batch(beta.settings, same, name="small", **beta.who)
        again = await collect(beta.settings, "small", out, idle=0.2, **beta.who)
        await submit_batch(beta.settings, other, name="small", **beta.who)
        changed = await collect(beta.settings, "small", out, idle=0.2, **beta.who)
        calls_after = len(gw.mock.requests)

    # Expect every line of both later runs written, served by the provider and charged
    assert (again.written, again.counts.done) == (3, 3)
    assert (changed.written, changed.counts.done) == (3, 3)
    assert calls_after - calls == 6
    lines = read_jsonl(out)
    assert len(lines) == 9 and all(line["error"] is None for line in lines)
    assert all(Decimal(line["gateway"]["cost_usd"]) > 0 for line in lines)
    assert len({line["gateway"]["job_id"] for line in lines}) == 9


async def test_collect_keeps_another_batchs_last_line_that_lacks_its_newline(
    settings: Settings, tmp_path: Path, alpha: TeamIdentity
) -> None:
    # Given a results file of four lines of another batch, the last without a newline
    out = tmp_path / "results.jsonl"
    theirs = [
        {"custom_id": f"theirs-{i}", "gateway": {"job_id": f"x:theirs-{i}"}} for i in range(4)
    ]
    out.write_bytes(b"\n".join(orjson.dumps(line) for line in theirs))
    source = write_jsonl(tmp_path / "small.jsonl", [openai_line(i) for i in range(3)])
    async with running_gateway(settings):
        await submit_batch(alpha.settings, source, **alpha.who)
        # When a batch is collected into it
        report = await collect(alpha.settings, "small", out, idle=0.2, **alpha.who)

    # Expect the four lines kept whole, then this batch's three
    lines = read_jsonl(out)
    assert report.written == 3
    assert lines[:4] == theirs and len(lines) == 7


async def test_an_unwritable_skipped_path_is_refused_before_anything_is_published(
    settings: Settings, tmp_path: Path, alpha: TeamIdentity
) -> None:
    # Given a file with invalid lines, and --skipped in a directory that does not exist
    source, _ = malformed_file(tmp_path / "bad.jsonl")
    skipped = tmp_path / "missing" / "skipped.jsonl"
    async with nobody_serves(settings):
        # When the team's CLI submits it with --skip-invalid
        cli = start_cli(
            alpha.settings,
            *("batch", "submit", str(source), "--team", "alpha", "--skip-invalid"),
            *("--skipped", str(skipped)),
        )
        _, stderr = await asyncio.to_thread(cli.communicate)
        batches = await batch_list(alpha.settings, **alpha.who)

    # Expect a one-line error naming the option, and no batch published
    message = stderr.decode().strip()
    assert cli.returncode == 1 and "Traceback" not in message
    assert len(message.splitlines()) == 1 and "--skipped" in message
    assert batches == []


async def test_the_cli_tells_an_api_key_team_without_its_key_how_to_pass_it(
    settings: Settings, beta: TeamIdentity
) -> None:
    # Given an API-key team's CLI run without its key, on a gateway whose operator is
    # another broker user (the shared user the team connects as is trusted for nothing)
    gateway = settings.model_copy(update={"operator_users": "gateway-operator"})
    async with nobody_serves(gateway):
        cli = start_cli(beta.settings, "batch", "list", "--team", "beta")
        _, stderr = await asyncio.to_thread(cli.communicate)

    # Expect it told about --api-key and both variables the option reads
    message = stderr.decode()
    assert cli.returncode == 1
    assert "--api-key" in message and "QUEUEGATE_API_KEY" in message
    assert "QUEUEGATE_TEAM_API_KEY" in message


async def test_a_line_torn_by_a_crash_is_written_again(
    settings: Settings, tmp_path: Path, beta: TeamIdentity
) -> None:
    # Given an API-key team's batch of 600 and `batch collect` killed after 100 lines
    total = KILLED_TOTAL
    out = tmp_path / "out.jsonl"
    async with collect_killed(settings, beta, tmp_path / "resume.jsonl", out):
        # and the last line it wrote torn, as a crash or power loss mid-write leaves it
        raw = out.read_bytes()
        whole = raw[: raw.rindex(b"\n") + 1]
        out.write_bytes(whole[:-40])
        torn = orjson.loads(whole.splitlines()[-1])["custom_id"]

        # When it is run again
        report = await collect(beta.settings, "resume", out, idle=0.2, **beta.who)

    # Expect every custom_id exactly once in the file, the torn one too, counted once
    counts = expect_each_once(read_jsonl(out), total)
    assert counts[torn] == 1
    assert report.counts.written == total


async def test_a_fully_answered_batch_is_listed_to_collect_with_its_answers(
    settings: Settings, tmp_path: Path, alpha: TeamIdentity
) -> None:
    # Given a batch of 10, all answered, collected by nobody yet
    source = write_jsonl(tmp_path / "small.jsonl", [openai_line(i) for i in range(10)])
    async with running_gateway(settings) as gw:
        await submit_batch(alpha.settings, source, **alpha.who)
        await gw.usage_rows(10)
        await wait_until_answered(alpha, "small", 10)

        # When the team lists its batches, and reads the status in the CLI
        listed = await batch_list(alpha.settings, **alpha.who)
        cli = start_cli(alpha.settings, "batch", "status", "small", "--team", "alpha")
        stdout, stderr = await asyncio.to_thread(cli.communicate)

    # Expect it listed as answered, to collect, and its spend labelled as collected spend
    assert cli.returncode == 0, stderr.decode()
    assert [(b.name, b.waiting, b.state) for b in listed] == [("small", 10, "to collect")]
    assert "collected spend (USD)" in stdout.decode()


async def test_a_stopped_collect_leaves_no_batch_answered_past_its_requests(
    settings: Settings, tmp_path: Path, alpha: TeamIdentity
) -> None:
    # Given 10 requests of a team admitted two a second, and their collect stopped once it
    # wrote a line: that line's result, held back unacknowledged (a torn tail is written
    # again from it), is in the batch's queue again, with the other 9 answers
    await register(settings, "alpha", TeamConfig(rpm=120, burst=1))
    source = write_jsonl(tmp_path / "small.jsonl", [openai_line(i) for i in range(10)])
    async with running_gateway(settings) as gw:
        await submit_batch(alpha.settings, source, **alpha.who)

        def stop(done: int, _: int) -> None:
            if done:
                collecting.cancel()

        out = tmp_path / "out.jsonl"
        collecting = asyncio.create_task(
            collect(alpha.settings, "small", out, on_progress=stop, **alpha.who)
        )
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(collecting, 30)
        await gw.usage_rows(10)
        while (await batch_status(alpha.settings, "small", **alpha.who)).queued:  # noqa: ASYNC110
            await asyncio.sleep(0.05)

        # When its status and the team's batches are read
        status = await batch_status(alpha.settings, "small", **alpha.who)
        listed = await batch_list(alpha.settings, **alpha.who)

    # Expect each request counted once, collected or answered (before: 1 + 10 answered, 11
    # of a batch of 10, the held result counted again)
    assert 0 < status.counts.written < 10
    assert status.counts.written + status.waiting == 10
    assert [(b.written + b.waiting, b.state) for b in listed] == [(10, "to collect")]


async def test_an_empty_batch_name_is_refused_not_replaced_by_the_files(
    settings: Settings, tmp_path: Path, alpha: TeamIdentity
) -> None:
    # Given a file of 3 requests
    source = write_jsonl(tmp_path / "named.jsonl", [openai_line(i) for i in range(3)])
    # When it is submitted with --name '' (a script's unset variable)
    cli = start_cli(alpha.settings, "batch", "submit", str(source), "--team", "alpha", "--name", "")
    stdout, stderr = await asyncio.to_thread(cli.communicate)
    # Expect a refusal in one line naming the name, before anything is published under the
    # file's name
    assert cli.returncode == 1
    said = stderr.decode().strip()
    assert "\n" not in said and "batch name '' is not valid" in said
    assert b"published" not in stdout


async def test_a_file_that_is_not_utf8_text_is_refused_in_one_line_nothing_published(
    settings: Settings, tmp_path: Path, redis_client: aioredis.Redis, alpha: TeamIdentity
) -> None:
    # Given a binary file, and a file of requests whose second is in Latin-1, not UTF-8
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(bytes(range(256)) * 8)
    first = orjson.dumps(openai_line(1)) + b"\n"
    latin = tmp_path / "latin.jsonl"
    second = orjson.dumps(openai_line(2)).replace(b"Question", b"Qu\xe9stion")
    latin.write_bytes(first + second)
    async with nobody_serves(settings):
        for source, where in [
            (binary, "(line 2: byte 0x80 at offset 128)"),  # line 1 ends at 0x0a
            (latin, f"(line 2: byte 0xe9 at offset {len(first) + second.index(0xE9)})"),
        ]:
            # When it is submitted
            cli = start_cli(alpha.settings, "batch", "submit", str(source), "--team", "alpha")
            stdout, stderr = await asyncio.to_thread(cli.communicate)
            # Expect one line saying the file is not UTF-8 text, where, and what to do
            assert cli.returncode == 1
            said = stderr.decode().strip()
            assert "\n" not in said, said
            assert f"{source}: not UTF-8 JSONL text {where}, nothing published" in said
            assert said.endswith("save it as UTF-8") and "surrogate" not in said
            # ... and nothing published or kept
            assert b"published" not in stdout
            assert not await redis_client.exists(
                Keys(settings.redis_prefix).batch("alpha", source.stem)
            )
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        queue = await (await connection.channel()).declare_queue(
            Topology(settings.namespace).team_queue("alpha"), passive=True
        )
        assert queue.declaration_result.message_count == 0


KILLED_TOTAL = 600


@asynccontextmanager
async def collect_killed(
    settings: Settings, who: TeamIdentity, source: Path, out: Path
) -> AsyncIterator[None]:
    """A batch "resume" of KILLED_TOTAL requests written at ``source`` and submitted as
    ``who``, and its `batch collect` into ``out`` killed after 100 lines; ``who``'s team served
    while the body runs."""
    write_jsonl(source, [openai_line(i) for i in range(KILLED_TOTAL)])
    async with running_gateway(settings, teams=(who.team,)):
        await submit_batch(who.settings, source, **who.who)
        await collect_killed_after(who, "resume", out, lines=100)
        yield


async def collect_killed_after(who: TeamIdentity, name: str, out: Path, lines: int) -> None:
    """Run `batch collect` in its own process and SIGKILL it once ``out`` holds ``lines`` lines."""
    process = start_cli(
        who.settings,
        *("batch", "collect", name, "--team", who.team, "--out", str(out)),
        api_key=who.api_key,
    )
    await wait_until(lambda: out.exists() and out.read_bytes().count(b"\n") >= lines, timeout=60)
    kill(process)


async def wait_until_answered(who: TeamIdentity, name: str, n: int) -> None:
    """Until ``n`` results wait in the batch's queue: the broker announces it to nobody."""
    while (await batch_status(who.settings, name, **who.who)).waiting < n:  # noqa: ASYNC110
        await asyncio.sleep(0.05)


def test_queued_is_never_more_than_was_published() -> None:
    # Given a submit interrupted after publishing 1,355 of 2,000 requests
    counts = Counts(
        total=2000,
        published=1355,
        done=0,
        failed=0,
        expired=0,
        canceled=0,
        spend_usd=0,
        first_written=None,
        last_written=None,
        canceled_flag=False,
    )
    status = BatchStatus("big", "alpha", "openai", datetime.now(UTC), counts, waiting=5)

    # Expect the published requests not answered yet as queued, not the whole batch
    assert status.queued == 1350
