"""Model catalog, provider adapters and the fallback chain.

catalog = load_catalog(settings.catalog, os.environ)
async with open_router(catalog, os.environ, settings) as router:  # Redis from the settings
    routed = await router.complete(job, deadline=time.monotonic() + 30)
"""

from router.catalog import Catalog, Deployment, ModelEntry, load_catalog
from router.router import AttemptGate, DeltaSink, Routed, Router, billed_answer, open_router

__all__ = [
    "AttemptGate",
    "Catalog",
    "DeltaSink",
    "Deployment",
    "ModelEntry",
    "Routed",
    "Router",
    "billed_answer",
    "load_catalog",
    "open_router",
]
