"""PII detectors, one module per family, and what a team's policy does with their findings.

    findings = scan("mail bob@example.com")     # [Finding(5, 20, "email")]
    redact("mail bob@example.com")              # ("mail [EMAIL]", ["email"])

Where two findings overlap, the family listed first in ``DETECTORS`` keeps the span (a key
that contains digits is a secret, not a phone number).
"""

from __future__ import annotations

import bisect

from workers.pii import card, email, iban, ip, phone, secrets, ssn
from workers.pii.base import Find, Finding

DETECTORS: tuple[tuple[str, Find], ...] = tuple(
    (module.KIND, module.find) for module in (secrets, email, iban, card, ssn, ip, phone)
)

KINDS = tuple(kind for kind, _ in DETECTORS)


def scan(text: str, kinds: tuple[str, ...] = KINDS) -> list[Finding]:
    """Non-overlapping findings in text order."""
    taken: list[Finding] = []  # kept sorted, so an overlap check looks at two neighbours
    for kind, find in DETECTORS:
        if kind not in kinds:
            continue
        for start, end in find(text):
            at = bisect.bisect_left(taken, (start, end), key=lambda f: (f.start, f.end))
            before = taken[at - 1] if at else None
            after = taken[at] if at < len(taken) else None
            if (before is None or before.end <= start) and (after is None or end <= after.start):
                taken.insert(at, Finding(start, end, kind))
    return taken


def redact(text: str) -> tuple[str, list[str]]:
    """The text with each finding replaced by ``[KIND]``, and the families found."""
    findings = scan(text)
    return replaced(text, findings), sorted({f.kind for f in findings})


def replaced(text: str, findings: list[Finding]) -> str:
    """The text with each of its findings (in text order, not overlapping) named ``[KIND]``."""
    parts: list[str] = []
    last = 0
    for finding in findings:
        parts += [text[last : finding.start], f"[{finding.kind.upper()}]"]
        last = finding.end
    parts.append(text[last:])
    return "".join(parts)


__all__ = ["DETECTORS", "KINDS", "Finding", "redact", "replaced", "scan"]
