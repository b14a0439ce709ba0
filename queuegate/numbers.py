"""Numbers as people and spreadsheets write them, the same in tables, exports and logs."""

from __future__ import annotations

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


def usd_text(value: Decimal | float) -> str:
    """A USD amount as tables and the CLI show it: thousands grouped, at least ``USD_PLACES``
    decimals, and every significant one past them: ``1,234.500000``, ``0.00000039`` (never
    ``0.000000``, which reads as free, nor ``3.9e-07``)."""
    amount = value if isinstance(value, Decimal) else Decimal(str(value))
    exponent = amount.normalize().as_tuple().exponent
    places = max(USD_PLACES, -exponent) if isinstance(exponent, int) else USD_PLACES
    return f"{amount:,.{places}f}"


Money = Annotated[Decimal, PlainSerializer(plain_decimal, return_type=str, when_used="json")]
"""USD, stored and shown positionally: ``--budget 1E+3`` is kept as ``"1000"`` and
``0.0000000001`` never as ``"1E-10"``, which readers (and the reports' SQL) take for text;
a job's cost in its result and usage event so too, whoever reads their JSON."""
