"""Batch pipelines: OpenAI- and Anthropic-format batch files through the queue, resumable.

    report = await submit_batch(settings, "prompts.jsonl", team="research", name="nightly")
    await collect(settings, "nightly", "results.jsonl", errors="errors.jsonl")

Both can be interrupted at any point and run again: submit publishes only requests with no
job yet, collect writes only results not written yet, and no custom_id is answered twice.

| module     | holds                                                       |
|------------|-------------------------------------------------------------|
| lines      | reading a batch file as numbered JSON entries, streaming    |
| formats    | the two formats by name; ``openai`` and ``anthropic`` each  |
|            | parse a request and write an output line                    |
| jobs       | entries to chat jobs, with deterministic job ids            |
| state      | the batch in Redis: lines, published, written, counts       |
| submit     | validate, then publish through a window of confirms         |
| collect    | results to files, fsynced before they are acknowledged      |
| control    | status and cancel                                           |
"""

from producer.batch.collect import CollectReport, collect
from producer.batch.control import BatchStatus, batch_status, cancel_batch
from producer.batch.submit import SubmitReport, submit_batch

__all__ = [
    "BatchStatus",
    "CollectReport",
    "SubmitReport",
    "batch_status",
    "cancel_batch",
    "collect",
    "submit_batch",
]
