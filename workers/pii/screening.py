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
from workers.pii.texts import Text, gather, rebuild

SEPARATOR = "\x00"
"""Between two strings in the joined text: no detector matches across it (it is neither a
word character, a digit nor a separator any format allows)."""


@dataclass(frozen=True)
class Screening:
    tree: Any
    texts: list[Text]
    findings: list[list[Finding]]
    """Per text, its findings, in its own offsets."""

    @property
    def kinds(self) -> list[str]:
        return sorted({f.kind for found in self.findings for f in found})

    def redacted(self, *, keep_structure: bool) -> Any:
        """The tree with every finding replaced by ``[KIND]``.

        ``keep_structure``: raise InvalidRequest when a finding sits in structure (a key, an
        id, a function name), which cannot be rewritten without breaking the request.
        """
        if not any(self.findings):
            return self.tree
        values = []
        for text, found in zip(self.texts, self.findings, strict=True):
            if found and keep_structure and text.where is not None:
                kinds = ", ".join(sorted({f.kind for f in found}))
                raise InvalidRequest(
                    f"personal data ({kinds}) in {text.where} cannot be redacted without "
                    "breaking the request: remove it"
                )
            values.append(replaced(text.value, found) if found else text.value)
        return rebuild(self.tree, values)


async def screen(tree: Any) -> Screening:
    """The findings in every string of ``tree`` (a job's ``outgoing`` fields, or any JSON)."""
    texts = gather(tree)
    joined = SEPARATOR.join(text.value for text in texts)
    return Screening(tree, texts, _split(texts, await find(joined)))


def _split(texts: list[Text], findings: list[Finding]) -> list[list[Finding]]:
    """Findings in the joined text, as findings in each text (one across a separator, such
    as a private key split over two fields, counts in each text it covers)."""
    per_text: list[list[Finding]] = [[] for _ in texts]
    start, index = 0, 0
    for finding in findings:  # in text order, as are the texts
        while start + len(texts[index].value) < finding.start:
            start += len(texts[index].value) + len(SEPARATOR)
            index += 1
        at, i = start, index
        while i < len(texts) and at < finding.end:
            end = at + len(texts[i].value)
            if finding.start < end:
                clipped = Finding(
                    max(finding.start, at) - at, min(finding.end, end) - at, finding.kind
                )
                per_text[i].append(clipped)
            at, i = end + len(SEPARATOR), i + 1
    return per_text
