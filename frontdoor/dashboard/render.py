"""The dashboard's HTML: Jinja2 templates (package data), escaped by default."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from fastapi.responses import HTMLResponse
from jinja2 import Environment, PackageLoader, select_autoescape

from queuegate.numbers import usd_places, usd_text

_ENV = Environment(
    loader=PackageLoader("frontdoor.dashboard", "templates"),
    autoescape=select_autoescape(default=True),
    trim_blocks=True,
    lstrip_blocks=True,
)


def money(value: Decimal | float | None, places: int | None = None) -> str:
    """Dollars exact, as every table shows them (``queuegate.numbers.usd_text``): every
    significant decimal, six at least, so that a spend is never rounded to its budget or to
    nothing; ``places``, a column's (``usd_places`` over its cells), lines its points up.
    Charts round (``charts.amount``): a picture is read by its shape."""
    if value is None:
        return "n/a"
    text = usd_text(value, places)
    # -$0.004300, not $-0.004300
    return f"-${text[1:]}" if text.startswith("-") else f"${text}"


def budget(value: Decimal | float) -> str:
    """A budget as it was set: ``$50,000``, ``$0.0000001``."""
    return money(value, usd_places([value], least=0))


_ENV.globals.update(money=money, budget=budget, usd_places=usd_places)


def page(name: str, status: int = 200, **context: Any) -> HTMLResponse:
    return HTMLResponse(_ENV.get_template(name).render(**context), status_code=status)
