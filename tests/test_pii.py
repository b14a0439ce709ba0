"""PII detectors on the labelled sample, and each team PII policy on the real job path."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from admin.audit import parse_age, prune_content
from admin.teams import Credentials, add, set_security
from bench.pii import PROSE, SAMPLE, measure
from producer import GatewayClient
from queuegate.db import create_pool
from queuegate.errors import ConfigError
from queuegate.management import BrokerAdmin
from queuegate.registry import add_team
from queuegate.settings import Settings
from queuegate.tenancy import Capture, PiiPolicy, TeamSecurity, put_security
from queuegate.topology import HEADER_DEAD_REASON
from tests.support import running_gateway
from workers.pii import card, iban, offload, redact, scan, ssn
from workers.pii.offload import OFFLOAD_CHARS
from workers.pii.screening import screen

FLOOR = 0.9
EMAIL, CARD = "jane.doe@example.com", "4111 1111 1111 1111"
PROMPT = f"Refund {EMAIL}, card {CARD}, please."
REDACTED = "Refund [EMAIL], card [CARD], please."
SIGNATURE = "mock-signature"
"""The one signature the mock provider takes back on a thinking block."""


def test_the_sample_is_large_and_has_hard_negatives() -> None:
    items = [json.loads(line) for line in SAMPLE.read_text("utf-8").splitlines()]
    assert len(items) >= 150
    assert sum(1 for item in items if not item["pii"]) >= 40


@pytest.mark.parametrize("kind", ["secret", "email", "iban", "card", "ssn", "ip", "phone"])
def test_each_detector_meets_the_precision_and_recall_floor(kind: str) -> None:
    figures = measure()[kind]
    assert figures["tp"] >= 10, "too few labelled examples to measure"
    assert figures["precision"] >= FLOOR, figures
    assert figures["recall"] >= FLOOR, figures


def test_checksums_and_invalid_ranges_are_what_make_a_finding() -> None:
    assert card.luhn_ok("4111111111111111") and not card.luhn_ok("4111111111111112")
    assert iban.mod97_ok("GB82WEST12345698765432") and not iban.mod97_ok("GB83WEST12345698765432")
    assert ssn.valid("123", "45", "6789")
    for area, group, serial in [
        ("000", "12", "3456"),
        ("666", "12", "3456"),
        ("912", "34", "5678"),
    ]:
        assert not ssn.valid(area, group, serial)
    assert not scan("order 4111 1111 1111 1112 and 999.1.1.1 and 12:30:45")


def test_redaction_names_the_family_and_keeps_the_rest() -> None:
    assert redact(PROMPT) == (REDACTED, ["card", "email"])


async def _configure(settings: Settings, pii: PiiPolicy, capture: Capture = "none") -> None:
    from accounting import migrate

    pool = await create_pool(settings)
    try:
        await migrate(pool, settings.database_schema)
        await add_team(pool, "alpha")
        await put_security(pool, "alpha", TeamSecurity(pii=pii, capture=capture))
    finally:
        await pool.close()


async def test_redact_replaces_pii_before_the_provider_sees_it(settings: Settings) -> None:
    # Given alpha's policy is redact, with full capture
    await _configure(settings, "redact", "full")
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        # When a prompt holds an email address and a card number
        result = await client.chat("gpt-4o-mini", [{"role": "user", "content": PROMPT}])
        # Expect the provider received the redacted prompt, and the audit says what was found
        assert result.status == "ok", result.error
        assert gw.mock.requests[-1].messages == [{"role": "user", "content": REDACTED}]
        [row] = await gw.usage_rows(1)
        assert row["pii"] == "card,email"
        content = await gw.pool.fetchrow("SELECT * FROM audit_content")
        assert content["prompt"] == [{"role": "user", "content": REDACTED}]
        assert EMAIL not in json.dumps(content["response"])


async def test_warn_sends_the_prompt_and_flags_the_audit_row(settings: Settings) -> None:
    await _configure(settings, "warn")
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        result = await client.chat("gpt-4o-mini", [{"role": "user", "content": PROMPT}])
        assert result.status == "ok", result.error
        assert gw.mock.requests[-1].messages == [{"role": "user", "content": PROMPT}]
        [row] = await gw.usage_rows(1)
        assert row["pii"] == "card,email"
        # capture none (the default): no content kept
        assert await gw.pool.fetchval("SELECT count(*) FROM audit_content") == 0


async def test_block_answers_invalid_request_without_calling_the_provider(
    settings: Settings,
) -> None:
    await _configure(settings, "block")
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        result = await client.chat("gpt-4o-mini", [{"role": "user", "content": PROMPT}])
        assert result.error is not None and result.error.code == "invalid_request"
        assert "card, email" in result.error.message and EMAIL not in result.error.message
        assert gw.mock.stats.calls == 0
        [dead] = await gw.dead_letters(1)
        assert dead.headers[HEADER_DEAD_REASON] == "invalid_request"
        [row] = await gw.usage_rows(1)
        assert row["pii"] == "card,email" and row["identity"] == "queue"


async def test_off_passes_the_prompt_and_flags_nothing(settings: Settings) -> None:
    await _configure(settings, "off", "redacted")
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        result = await client.chat("gpt-4o-mini", [{"role": "user", "content": PROMPT}])
        assert result.status == "ok", result.error
        assert gw.mock.requests[-1].messages == [{"role": "user", "content": PROMPT}]
        [row] = await gw.usage_rows(1)
        assert row["pii"] is None
        # redacted capture keeps the content without the PII, whatever the policy
        prompt = await gw.pool.fetchval("SELECT prompt FROM audit_content")
        assert prompt == [{"role": "user", "content": REDACTED}]


async def test_too_many_messages_is_a_clear_invalid_request(settings: Settings) -> None:
    settings = settings.model_copy(update={"max_job_messages": 3})
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        messages = [{"role": "user", "content": f"line {i}"} for i in range(4)]
        result = await client.chat("gpt-4o-mini", messages)
        assert result.error is not None and result.error.code == "invalid_request"
        assert result.error.message == "job has 4 messages; the limit is 3"


async def test_prune_deletes_captured_content_older_than_the_cut_off(settings: Settings) -> None:
    # Given two captured jobs, one 100 days old
    await _configure(settings, "off", "full")
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        for _ in range(2):
            await client.chat("gpt-4o-mini", [{"role": "user", "content": "hi"}])
        rows = await gw.usage_rows(2)
        await gw.pool.execute(
            "UPDATE audit_content SET ts = now() - interval '100 days' WHERE job_id = $1",
            rows[0]["job_id"],
        )
        # When content older than 90 days is pruned
        deleted = await prune_content(gw.pool, parse_age("90d"))
        # Expect only the old content gone, and every usage row kept
        assert deleted == 1
        assert await gw.pool.fetchval("SELECT job_id FROM audit_content") == rows[1]["job_id"]
        assert await gw.pool.fetchval("SELECT count(*) FROM usage_log") == 2


def test_an_age_that_is_not_one_is_a_clear_error() -> None:
    assert parse_age("12h") == timedelta(hours=12)
    with pytest.raises(ConfigError, match="use a number and d, h or m"):
        parse_age("90 days")


def test_the_bench_reads_the_sample_it_is_given(tmp_path: Path) -> None:
    sample = tmp_path / "one.jsonl"
    sample.write_text(json.dumps({"text": "x a@example.com", "pii": []}) + "\n")
    assert measure(sample)["email"]["fp"] == 1


# Every string a job sends out is screened, not only the messages' text (issue 21).

SSN = "123-45-6789"
ARGUMENTS = json.dumps({"email": EMAIL, "card": CARD.replace(" ", "")})
TOOL_TURNS = [
    {"role": "user", "content": "Refund my last order.", "name": EMAIL},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "refund", "arguments": ARGUMENTS},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "done"}]},
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "refund",
            "description": f"Refunds an order; e.g. for SSN {SSN}.",
            "parameters": {"type": "object", "properties": {"email": {"type": "string"}}},
        },
    }
]
PARAMS = {
    "user": EMAIL,
    "tools": TOOLS,
    "prediction": {"type": "content", "content": f"Dear {EMAIL},"},  # passed through
}
SECRETS_OF_THE_JOB = (EMAIL, CARD, CARD.replace(" ", ""), SSN)


def holds_none(value: object) -> bool:
    dumped = json.dumps(value)
    return not any(secret in dumped for secret in SECRETS_OF_THE_JOB)


@pytest.fixture
async def broker_alpha(settings: Settings) -> AsyncIterator[Credentials]:
    """Team alpha added the default way: its own broker user (deleted afterwards)."""
    credentials = await add(settings, "alpha")
    try:
        yield credentials
    finally:
        async with BrokerAdmin.of(settings) as admin:
            assert credentials.user is not None
            await admin.delete_user(credentials.user)


async def test_redact_reaches_tool_calls_names_params_and_passed_through_extras(
    settings: Settings, broker_alpha: Credentials
) -> None:
    # Given alpha, a broker-identity team, redacts and captures in full
    await set_security(settings, "alpha", pii="redact", capture="full")
    assert broker_alpha.amqp_url is not None
    as_alpha = settings.model_copy(update={"amqp_url": broker_alpha.amqp_url})
    async with running_gateway(settings) as gw, GatewayClient(as_alpha, team="alpha") as client:
        # When PII sits in a name, tool call arguments, params.user, a tool's description
        # and a parameter the gateway passes through
        result = await client.chat("gpt-4o-mini", TOOL_TURNS, **PARAMS)
        # Expect the provider received none of it, and a request that still holds together
        assert result.status == "ok", result.error
        body = gw.mock.requests[-1].body
        assert body is not None and holds_none(body), body
        [user, assistant, tool] = body["messages"]
        assert user["name"] == "[EMAIL]" and body["user"] == "[EMAIL]"
        [call] = assistant["tool_calls"]
        assert call["id"] == tool["tool_call_id"] == "call_1"
        assert call["function"]["name"] == body["tools"][0]["function"]["name"] == "refund"
        assert json.loads(call["function"]["arguments"]) == {"email": "[EMAIL]", "card": "[CARD]"}
        assert (
            body["tools"][0]["function"]["description"] == "Refunds an order; e.g. for SSN [SSN]."
        )
        assert body["prediction"] == {"type": "content", "content": "Dear [EMAIL],"}
        # and the audit row names every family, its captured prompt what the provider got
        [row] = await gw.usage_rows(1)
        assert row["pii"] == "card,email,ssn"
        prompt = await gw.pool.fetchval("SELECT prompt FROM audit_content")
        assert prompt == body["messages"]


@pytest.mark.parametrize(
    ("place", "messages", "params"),
    [
        ("a message's name", [{"role": "user", "content": "hi", "name": EMAIL}], {}),
        ("tool call arguments", [*TOOL_TURNS[1:], {"role": "user", "content": "ok?"}], {}),
        ("params.user", [{"role": "user", "content": "hi"}], {"user": EMAIL}),
        ("a tool's description", [{"role": "user", "content": "hi"}], {"tools": TOOLS}),
        ("a passed-through parameter", [{"role": "user", "content": "hi"}], {"x_note": [SSN]}),
        (
            "an escaped JSON value",
            [{"role": "user", "content": '{"to": "jane.doe\\u0040example.com"}'}],
            {},
        ),
    ],
)
async def test_block_refuses_pii_wherever_it_sits_in_the_job(
    settings: Settings, place: str, messages: list[dict[str, object]], params: dict[str, object]
) -> None:
    # Given alpha blocks PII and keeps redacted captures
    await _configure(settings, "block", "redacted")
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        # When a job holds PII only in one place outside the messages' text
        result = await client.chat("gpt-4o-mini", messages, **params)
        # Expect it refused before any call, and what the audit keeps holds none of it
        assert result.error is not None and result.error.code == "invalid_request", place
        assert gw.mock.stats.calls == 0
        [row] = await gw.usage_rows(1)
        assert row["pii"] is not None
        prompt = await gw.pool.fetchval("SELECT prompt FROM audit_content")
        assert holds_none(prompt), prompt


async def test_warn_sends_everything_and_a_redacted_capture_keeps_none_of_it(
    settings: Settings,
) -> None:
    await _configure(settings, "warn", "redacted")
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        result = await client.chat("gpt-4o-mini", TOOL_TURNS, **PARAMS)
        assert result.status == "ok", result.error
        body = gw.mock.requests[-1].body
        assert body is not None and body["user"] == EMAIL  # warn: sent as it is
        [row] = await gw.usage_rows(1)
        assert row["pii"] == "card,email,ssn"
        prompt = await gw.pool.fetchval("SELECT prompt FROM audit_content")
        assert holds_none(prompt), prompt
        assert json.loads(prompt[1]["tool_calls"][0]["function"]["arguments"])["card"] == "[CARD]"


async def test_redact_refuses_pii_in_an_id_it_cannot_rewrite(settings: Settings) -> None:
    # Given alpha redacts
    await _configure(settings, "redact")
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        # When PII sits in a tool call's id, which its result must repeat exactly
        call_id = f"call_{EMAIL}"
        turns = [
            {**TOOL_TURNS[1], "tool_calls": [{**TOOL_TURNS[1]["tool_calls"][0], "id": call_id}]},  # type: ignore[dict-item]
            {"role": "tool", "tool_call_id": call_id, "content": "done"},
        ]
        result = await client.chat("gpt-4o-mini", turns)
        # Expect a clear refusal naming where, not a request the provider would reject
        assert result.error is not None and result.error.code == "invalid_request"
        assert "personal data (email) in id cannot be redacted" in result.error.message
        assert EMAIL not in result.error.message
        assert gw.mock.stats.calls == 0


async def test_redact_refuses_pii_in_a_custom_tool_name_it_cannot_rewrite(
    settings: Settings,
) -> None:
    # Given alpha redacts
    await _configure(settings, "redact")
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        # When PII sits in a custom tool's name, which its calls must repeat exactly
        name = f"mail_{EMAIL}"
        tools = [{"type": "custom", "custom": {"name": name}}]
        result = await client.chat("gpt-4o-mini", [TOOL_TURNS[0]], tools=tools)
        # Expect a clear refusal naming where, as for a function's name
        assert result.error is not None and result.error.code == "invalid_request"
        assert "personal data (email) in a custom tool name cannot be" in result.error.message
        assert gw.mock.stats.calls == 0


async def test_a_large_prompt_is_redacted_by_the_helper_process_alike(settings: Settings) -> None:
    # Given alpha redacts, and a prompt well over the size scanned in the helper process
    await _configure(settings, "redact")
    filler = PROSE * (4 * OFFLOAD_CHARS // len(PROSE))
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        result = await client.chat("gpt-4o-mini", [{"role": "user", "content": filler + PROMPT}])
        # Expect the same redaction as inline
        assert result.status == "ok", result.error
        assert gw.mock.requests[-1].messages == [{"role": "user", "content": filler + REDACTED}]
        assert offload._helper.pid is not None


async def test_a_dead_helper_process_is_replaced_and_the_scan_still_answers() -> None:
    text = PROSE * (2 * OFFLOAD_CHARS // len(PROSE)) + PROMPT
    assert await offload.find(text) == scan(text)
    # When the helper process dies (killed for memory, say)
    pid = offload._helper.pid
    assert pid is not None and pid != os.getpid()
    os.kill(pid, signal.SIGKILL)
    # Expect the next large scan answered by a new one
    assert await offload.find(text) == scan(text)
    assert offload._helper.pid not in (None, pid)


async def test_one_scan_of_many_strings_finds_each_value_in_its_own_string() -> None:
    # Given strings scanned together, a private key's two ends in two of them
    begin, end = "-----BEGIN PRIVATE KEY-----", "-----END PRIVATE KEY-----"
    tree = {"a": ["x", f"mail {EMAIL}"], "b": {"user": EMAIL, "pem": begin}, "c": end}
    # Expect each finding in its own string, and nothing matched across two
    redacted = (await screen(tree)).redacted(keep_structure=True)
    assert redacted == {
        "a": ["x", "mail [EMAIL]"],
        "b": {"user": "[EMAIL]", "pem": begin},
        "c": end,
    }


def thought_back(block: dict[str, str]) -> list[dict[str, object]]:
    """A conversation sending back an Anthropic answer's thinking ``block``, then asking on."""
    return [
        {"role": "user", "content": "Where is my order?"},
        {"role": "assistant", "content": [block, {"type": "text", "text": "It shipped."}]},
        {"role": "user", "content": f"Thanks, write to {EMAIL}"},
    ]


SIGNED_THOUGHT = {"type": "thinking", "thinking": "The order shipped.", "signature": SIGNATURE}


@pytest.mark.parametrize(
    ("block", "where"),
    [
        ({**SIGNED_THOUGHT, "thinking": f"Mail {EMAIL} later."}, "a thinking block's thinking"),
        (
            {"type": "redacted_thinking", "data": f"opaque {EMAIL}"},
            "a redacted_thinking block's data",
        ),
    ],
)
async def test_redact_refuses_pii_in_a_signed_thinking_block_it_cannot_rewrite(
    settings: Settings, block: dict[str, str], where: str
) -> None:
    # Given alpha redacts
    await _configure(settings, "redact")
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        # When PII sits in a thinking block sent back, which the provider signed
        result = await client.chat("claude-haiku", thought_back(block))
        # Expect a refusal naming where, not a block the provider would refuse as tampered
        assert result.error is not None and result.error.code == "invalid_request"
        assert f"personal data (email) in {where} cannot be redacted" in result.error.message
        assert gw.mock.stats.calls == 0


async def test_redact_sends_a_signed_thinking_block_as_it_was_and_the_rest_redacted(
    settings: Settings,
) -> None:
    # Given alpha redacts
    await _configure(settings, "redact")
    async with running_gateway(settings) as gw, gw.client("alpha") as client:
        # When a thinking block without PII is sent back, and PII in the user's text
        result = await client.chat("claude-haiku", thought_back(SIGNED_THOUGHT))
        # Expect the block as it was, signature and all, and the user's text redacted
        assert result.status == "ok", result.error
        [_, assistant, user] = gw.mock.requests[-1].messages
        assert assistant["content"][0] == SIGNED_THOUGHT
        assert user["content"] == "Thanks, write to [EMAIL]"
