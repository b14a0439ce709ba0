"""Model catalog, provider adapters and the fallback chain.

catalog = load_catalog(settings.catalog, os.environ)
async with Router(catalog, os.environ) as router:
    routed = await router.complete(job, deadline=time.monotonic() + 30)
"""

from router.catalog import Catalog, Deployment, ModelEntry, load_catalog
from router.router import AttemptGate, Routed, Router

__all__ = ["AttemptGate", "Catalog", "Deployment", "ModelEntry", "Routed", "Router", "load_catalog"]
