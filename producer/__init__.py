"""The client library apps use: publish chat jobs, await their results."""

from producer.client import GatewayClient, JobHandle
from producer.streams import ChatStream

__all__ = ["ChatStream", "GatewayClient", "JobHandle"]
