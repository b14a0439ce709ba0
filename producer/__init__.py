"""The client library apps use: publish chat jobs, await their results."""

from producer.client import GatewayClient, JobHandle

__all__ = ["GatewayClient", "JobHandle"]
