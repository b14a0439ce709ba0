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
            r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----[\s\S]*?-----END (?:[A-Z]+ )?PRIVATE KEY-----",
        )
    )
)


_MARKERS = ("sk-", "_live_", "_test_", "AKIA", "ASIA", "gh", "xox", "AIza", "eyJ", "PRIVATE KEY")
"""Each pattern contains one of these: a text without any cannot match."""


def find(text: str) -> Iterator[tuple[int, int]]:
    if not any(marker in text for marker in _MARKERS):
        return
    for match in _PATTERNS.finditer(text):
        yield match.span()
