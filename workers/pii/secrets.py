"""Secret-looking tokens: provider and cloud API keys, JWTs and PEM private keys."""

from __future__ import annotations

import re
from collections.abc import Iterator

KIND = "secret"

_PATTERNS = re.compile(
    "|".join(
        (
            r"\bsk-(?:proj-|ant-(?:api\d\d-)?)?[A-Za-z0-9_-]{20,}",  # OpenAI, Anthropic
            r"\b(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{16,}",  # Stripe
            r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",  # AWS access key ids
            r"\bgh[pousr]_[A-Za-z0-9]{36,}",  # GitHub tokens
            r"\bgithub_pat_[A-Za-z0-9_]{40,}",
            r"\bxox[abprs]-[A-Za-z0-9-]{10,}",  # Slack
            r"\bAIza[0-9A-Za-z_-]{35}",  # Google API keys
            r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",  # JWT
            # Any body but NUL, which separates a job's strings when they are scanned at once.
            r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----[^\x00]*?"
            r"-----END (?:[A-Z]+ )?PRIVATE KEY-----",
        )
    )
)


_STARTS = (
    *("sk-", "sk_", "rk_", "pk_", "AKIA", "ASIA", "ghp_", "gho_", "ghu_", "ghs_", "ghr_"),
    *("github_pat_", "xox", "AIza", "eyJ", "-----BEGIN "),
)
"""Every match of a pattern starts with one of these."""


def find(text: str) -> Iterator[tuple[int, int]]:
    # The patterns are tried only where a match can start, found by str.find: tried at every
    # position, the alternation of nine patterns costs far more. Same findings as finditer.
    starts = sorted({at for start in _STARTS if start in text for at in _occurrences(text, start)})
    end = 0
    for at in starts:
        if at < end:
            continue
        match = _PATTERNS.match(text, at)
        if match is not None:
            yield match.span()
            end = match.end()


def _occurrences(text: str, needle: str) -> Iterator[int]:
    at = text.find(needle)
    while at != -1:
        yield at
        at = text.find(needle, at + 1)
