"""One scan over every string a job sends out, and that job or any JSON value with its PII named.

    screening = await screen(outgoing(job))
    screening.kinds                          # ["card", "email"]
    screening.redacted(keep_structure=True)  # the tree for the provider; InvalidRequest when
                                             # PII sits where rewriting breaks the request
    screening.redacted(keep_structure=False) # for the audit store: everything rewritten

The strings are joined into one text and scanned once (off the event loop when large), so a
job costs one pass of the detectors whatever its shape, and redacting reuses that pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from queuegate.errors import InvalidRequest
from workers.pii import Finding, replaced
from workers.pii.offload import find
from workers.pii.texts import Texts, gather, rebuild

SEPARATOR = "\x00"
"""Between two strings in the joined text: no detector matches across it (it is neither a
word character, a digit nor a separator any format allows, and private keys stop at it)."""


@dataclass(frozen=True)
class Screening:
    tree: Any
    texts: Texts
    findings: dict[int, list[Finding]]
    """By index in ``texts``, the findings of each text that has any, in its own offsets."""

    @property
    def kinds(self) -> list[str]:
        return sorted({f.kind for found in self.findings.values() for f in found})

    def redacted(self, *, keep_structure: bool) -> Any:
        """The tree with every finding replaced by ``[KIND]``.

        ``keep_structure``: raise InvalidRequest when a finding sits in structure (a key, an
        id, a function name), which cannot be rewritten without breaking the request.
        """
        if not self.findings:
            return self.tree
        values = list(self.texts.values)
        for index, found in self.findings.items():
            where = self.texts.wheres[index]
            if keep_structure and where is not None:
                kinds = ", ".join(sorted({f.kind for f in found}))
                raise InvalidRequest(
                    f"personal data ({kinds}) in {where} cannot be redacted without "
                    "breaking the request: remove it"
                )
            values[index] = replaced(values[index], found)
        return rebuild(self.tree, values)


async def screen(tree: Any) -> Screening:
    """The findings in every string of ``tree`` (a job's ``outgoing`` fields, or any JSON)."""
    texts = gather(tree)
    findings = await find(SEPARATOR.join(texts.values))
    return Screening(tree, texts, _split(texts.values, findings))


async def redacted(value: Any) -> Any:
    """``value`` (any JSON) with every finding replaced, keys and ids included: for storage."""
    return (await screen(value)).redacted(keep_structure=False)


def _split(texts: list[str], findings: list[Finding]) -> dict[int, list[Finding]]:
    """Findings in the joined text, as findings in the texts they fall in."""
    per_text: dict[int, list[Finding]] = {}
    start, index = 0, 0
    for finding in findings:  # in text order, as are the texts
        while start + len(texts[index]) < finding.start:
            start += len(texts[index]) + len(SEPARATOR)
            index += 1
        found = Finding(finding.start - start, finding.end - start, finding.kind)
        per_text.setdefault(index, []).append(found)
    return per_text
