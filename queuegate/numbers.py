"""Numbers as people and spreadsheets write them, the same in tables, exports and logs."""

from __future__ import annotations

from decimal import Decimal


def plain_decimal(value: Decimal) -> str:
    """Positional notation without trailing zeros: ``0E-10`` → ``0``, ``12.5000`` → ``12.5``.

    ``str(Decimal)`` switches to exponents for small values and zero sums from PostgreSQL's
    ``numeric`` (``0E-10``), which spreadsheets and readers of logs take for something else.
    """
    return format(value.normalize(), "f")
