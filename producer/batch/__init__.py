"""Batch pipelines: OpenAI- and Anthropic-format batch files through the queue, resumable.

    report = await submit_batch(settings, "prompts.jsonl", team="research", name="nightly")
    await collect(settings, "nightly", "results.jsonl", errors="errors.jsonl", team="research")

Both run as the team of ``settings.amqp_url`` (its broker user from ``queuegate teams add``),
or pass ``api_key=`` for a team that proves itself with one; the gateway keeps the batch's
state under the team, so a team reaches only its own batches and never needs Redis.

Both can be interrupted at any point and run again: submit publishes only requests with no
job yet, collect writes only results not written yet, and no custom_id is answered twice.

| module     | holds                                                       |
|------------|-------------------------------------------------------------|
| lines      | reading a batch file as numbered JSON entries, streaming    |
| formats    | the two formats by name; ``openai`` and ``anthropic`` each  |
|            | parse a request and write an output line                    |
| jobs       | entries to chat jobs, with deterministic job ids            |
| state      | the batch as the gateway keeps it: lines, published, written |
| submit     | validate, then publish through a window of confirms         |
| files      | where results go: local files (fsynced), or any ResultSink  |
| collect    | results to a sink, durable before they are acknowledged     |
| resend     | jobs whose results a full queue refused, asked for again    |
| control    | status, cancel, list and delete                             |
"""

from producer.batch.collect import CollectReport, collect, collect_into, collect_state
from producer.batch.control import (
    BatchStatus,
    batch_list,
    batch_status,
    cancel_batch,
    delete_batch,
)
from producer.batch.submit import SubmitReport, submit_batch

__all__ = [
    "BatchStatus",
    "CollectReport",
    "SubmitReport",
    "batch_list",
    "batch_status",
    "cancel_batch",
    "collect",
    "collect_into",
    "collect_state",
    "delete_batch",
    "submit_batch",
]
