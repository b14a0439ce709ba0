"""The dashboard at ``/dashboard``: server-rendered pages over the admin functions, signed in
with a key pasted once (``session``), charts drawn as inline SVG (``charts``), templates and
static files shipped as package data.

``install(app)`` mounts it on the front door's app.
"""

from __future__ import annotations

from fastapi import Depends, FastAPI
from fastapi.staticfiles import StaticFiles

from frontdoor.dashboard.batches import router as batches_router
from frontdoor.dashboard.routes import install_handlers, once_each, router, storable_url
from frontdoor.dashboard.security import DashboardHeaders


def install(app: FastAPI) -> None:
    checked = [Depends(storable_url), Depends(once_each)]
    app.include_router(router, dependencies=checked)
    app.include_router(batches_router, dependencies=checked)
    app.mount(
        "/dashboard/static",
        StaticFiles(packages=[("frontdoor.dashboard", "static")]),
        name="dashboard-static",
    )
    install_handlers(app)
    app.add_middleware(DashboardHeaders)


__all__ = ["install"]
