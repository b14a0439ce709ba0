"""What every part of queuegate shares: wire messages, settings, topology, errors, registry.

The shared ground: it imports none of the packages above it (tests/test_layout.py).
"""

from queuegate.errors import GatewayError
from queuegate.messages import ChatJob, ChatResult, StreamChunk, UsageEvent
from queuegate.settings import Settings

__all__ = ["ChatJob", "ChatResult", "GatewayError", "Settings", "StreamChunk", "UsageEvent"]
