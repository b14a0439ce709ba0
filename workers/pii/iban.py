"""IBANs: a country code, its registered length, and the ISO 13616 mod-97 check."""

from __future__ import annotations

import re
from collections.abc import Iterator

from workers.pii.base import has_digit

KIND = "iban"

LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BR": 29, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20,
    "EG": 29, "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18,
    "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IS": 26, "IT": 27, "JO": 30,
    "KW": 30, "KZ": 20, "LB": 28, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MD": 24,
    "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15, "PK": 24, "PL": 28,
    "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24, "SE": 24, "SI": 19, "SK": 24,
    "SM": 27, "TN": 24, "TR": 26, "UA": 29, "VG": 24, "XK": 20,
}  # fmt: skip
"""Each country's IBAN length (the SWIFT registry)."""

_CANDIDATE = re.compile(r"([A-Z](?<![A-Za-z0-9][A-Z])[A-Z])(\d{2})((?: ?[A-Z0-9]{1,4}){3,8})")


def mod97_ok(iban: str) -> bool:
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


def find(text: str) -> Iterator[tuple[int, int]]:
    if not has_digit(text):
        return
    for match in _CANDIDATE.finditer(text):
        length = LENGTHS.get(match.group(1))
        if length is None:
            continue
        # A greedy match may run into the next word: cut it at the country's length.
        seen = 0
        for end in range(match.start(), match.end()):
            if text[end] != " ":
                seen += 1
            if seen == length:
                break
        else:
            continue
        end += 1
        if text[end : end + 1].isalnum() and text[end - 1] != " " and text[end] != " ":
            continue  # longer than the country's IBAN: not one
        compact = text[match.start() : end].replace(" ", "")
        if mod97_ok(compact):
            yield match.start(), end
