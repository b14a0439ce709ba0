"""The README documents every setting: each field of ``Settings`` has its row in the settings
table, so a setting cannot be added and left for operators to find in the source."""

from __future__ import annotations

import re
from pathlib import Path

from queuegate.settings import Settings

README = Path(__file__).resolve().parent.parent / "README.md"


def _table_rows() -> set[str]:
    """The variables that open a row of a README table (``| `QUEUEGATE_X` | ...``)."""
    text = README.read_text(encoding="utf-8")
    return set(re.findall(r"^\| `(QUEUEGATE_[A-Z0-9_]+)` \|", text, flags=re.MULTILINE))


def test_every_setting_has_its_row_in_the_readme_settings_table() -> None:
    documented = _table_rows()
    assert len(documented) > 40  # the check reads the real table, not an empty one
    variables = {f"QUEUEGATE_{name.upper()}" for name in Settings.model_fields}
    assert sorted(variables - documented) == []


def test_the_settings_table_names_no_setting_that_does_not_exist() -> None:
    variables = {f"QUEUEGATE_{name.upper()}" for name in Settings.model_fields}
    assert sorted(_table_rows() - variables) == []
