"""A fake OpenAI and Anthropic over real HTTP, for tests, the demo and benchmarks.

async with MockProvider(MockConfig(default=Behavior(latency_ms=20))) as mock:
    ...  # deployments use mock.url as their api_base
"""

from mockprovider.config import Behavior, MockConfig
from mockprovider.server import MockProvider, serve

__all__ = ["Behavior", "MockConfig", "MockProvider", "serve"]
