"""Accounting: usage events from the broker to PostgreSQL, the schema's migrations, reports."""

from accounting.consumer import Accountant
from accounting.migrate import migrate
from accounting.reports import TeamSpend, monthly_spend

__all__ = ["Accountant", "TeamSpend", "migrate", "monthly_spend"]
