"""The dashboard's HTML: Jinja2 templates (package data), escaped by default."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from fastapi.responses import HTMLResponse
from jinja2 import Environment, PackageLoader, select_autoescape

from frontdoor.dashboard.charts import amount

_ENV = Environment(
    loader=PackageLoader("frontdoor.dashboard", "templates"),
    autoescape=select_autoescape(default=True),
    trim_blocks=True,
    lstrip_blocks=True,
)


def money(value: Decimal | float | None) -> str:
    """Dollars as a person reads them (``charts.amount``)."""
    if value is None:
        return "n/a"
    return "$" + amount(float(value))


_ENV.globals["money"] = money


def page(name: str, status: int = 200, **context: Any) -> HTMLResponse:
    return HTMLResponse(_ENV.get_template(name).render(**context), status_code=status)
