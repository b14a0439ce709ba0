"""The HTTP front door: OpenAI's API (and more) over the gateway's team queues.

Each request becomes a ``ChatJob`` on the caller's team queue, signed with the caller's API
key, and is answered from its result. ``create_app(settings)`` is the ASGI app;
``queuegate api`` serves it with uvicorn (``frontdoor.serve``).
"""

from frontdoor.app import create_app

__all__ = ["create_app"]
