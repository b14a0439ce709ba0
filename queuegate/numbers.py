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


Money = Annotated[Decimal, PlainSerializer(plain_decimal, return_type=str, when_used="json")]
"""USD, stored and shown positionally: ``--budget 1E+3`` is kept as ``"1000"`` and
``0.0000000001`` never as ``"1E-10"``, which readers (and the reports' SQL) take for text;
a job's cost in its result and usage event so too, whoever reads their JSON."""
