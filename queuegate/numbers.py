"""Numbers as people and spreadsheets write them, the same in tables, exports and logs."""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal
from typing import Annotated

from pydantic import PlainSerializer


def plain_decimal(value: Decimal) -> str:
    """Positional notation without trailing zeros: ``0E-10`` → ``0``, ``12.5000`` → ``12.5``.

    ``str(Decimal)`` switches to exponents for small values and zero sums from PostgreSQL's
    ``numeric`` (``0E-10``), which spreadsheets and readers of logs take for something else.
    """
    return format(value.normalize(), "f")


USD_PLACES = 6
"""Decimals a table shows of a USD amount at least, so a column's points line up."""


def usd_text(value: Decimal | float, places: int | None = None) -> str:
    """A USD amount as tables and the CLI show it: thousands grouped, at least ``USD_PLACES``
    decimals, and every significant one past them: ``1,234.500000``, ``0.00000039`` (never
    ``0.000000``, which reads as free, nor ``3.9e-07``). ``places``: a column's, from
    ``usd_places`` over its cells, so that one column has one format."""
    amount = _decimal(value)
    return f"{amount:,.{usd_places([amount]) if places is None else places}f}"


def usd_places(values: Iterable[Decimal | float | None], least: int = USD_PLACES) -> int:
    """Decimals that show each of ``values`` whole (None: an empty cell), ``least`` at least:
    a column of amounts in one format, its points in line. A column of budgets, which people
    set in round amounts, takes ``least=0``: ``50,000``, not ``50,000.000000``."""
    places = least
    for value in values:
        if value is not None:
            exponent = _decimal(value).normalize().as_tuple().exponent
            places = max(places, -exponent) if isinstance(exponent, int) else places
    return places


def _decimal(value: Decimal | float) -> Decimal:
    return value if isinstance(value, Decimal) else Decimal(str(value))


Money = Annotated[Decimal, PlainSerializer(plain_decimal, return_type=str, when_used="json")]
"""USD, stored and shown positionally: ``--budget 1E+3`` is kept as ``"1000"`` and
``0.0000000001`` never as ``"1E-10"``, which readers (and the reports' SQL) take for text;
a job's cost in its result and usage event so too, whoever reads their JSON."""
