"""Blank out anything shaped like a credential in text that leaves the process or enters the database.

Upstreams sometimes quote what they were sent in their error messages (a key, an ``Authorization``
header, a token). Those messages become client-facing errors, account ``reason``s, log lines and
batch error lines, so every ``UpstreamError`` is redacted when it is made, and the boundaries
(error bodies, stored and shown reasons) redact again whatever they did not make themselves.

The shapes: API keys ``sk-…`` (Moonshot) and ``kp-…`` (kimi-pool's client keys), JWTs
(``eyJ….….…``, kimi.com's login tokens; also a cut one) and ``Bearer …`` header values. Redacting
twice changes nothing. Redact before cutting a message short: a credential cut in two may not look
like one any more.
"""

from __future__ import annotations

import re

REDACTED = "[REDACTED]"
_CREDENTIAL = re.compile(
    r"\b(sk|kp)-[A-Za-z0-9_-]{8,}"  # an API key: its prefix stays, to tell which kind it was
    r"|\beyJ[A-Za-z0-9_-]{8,}(?:\.[A-Za-z0-9_-]*)*"  # a JWT (header.payload.signature), or what is left of one
    r"|\b(bearer)\s+[^\s\"',;]+",  # an Authorization header's value
    re.IGNORECASE,
)


def _replace(match: re.Match[str]) -> str:
    prefix, bearer = match.group(1), match.group(2)
    if prefix is not None:
        return f"{prefix}-{REDACTED}"
    if bearer is not None:
        return f"{bearer} {REDACTED}"
    return REDACTED


def redact(text: str) -> str:
    """``text`` with every credential-shaped part replaced by ``[REDACTED]``."""
    return _CREDENTIAL.sub(_replace, text)


def redact_optional(text: str | None) -> str | None:
    return None if text is None else redact(text)
