"""The client library apps use: publish chat jobs, await their results, run batch files."""

from producer.batch import (
    BatchStatus,
    CollectReport,
    SubmitReport,
    batch_list,
    batch_status,
    cancel_batch,
    collect,
    delete_batch,
    submit_batch,
)
from producer.client import GatewayClient, JobHandle
from producer.reply_queues import delete_reply_queue
from producer.streams import ChatStream

__all__ = [
    "BatchStatus",
    "ChatStream",
    "CollectReport",
    "GatewayClient",
    "JobHandle",
    "SubmitReport",
    "batch_list",
    "batch_status",
    "cancel_batch",
    "collect",
    "delete_batch",
    "delete_reply_queue",
    "submit_batch",
]
