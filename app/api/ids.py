"""Identifiers for requests and completions: unique enough to trace, cheap to make.

``secrets`` reads the OS's random source on every call, a measurable cost on the hot path; these
ids need no secrecy, so a PRNG seeded once from the OS does.
"""

from __future__ import annotations

import os
import random
import re

_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class Ids:
    def __init__(self) -> None:
        self._random = random.Random(os.urandom(16))

    def _hex(self) -> str:
        return f"{self._random.getrandbits(96):024x}"

    def request_id(self, sent: bytes | None = None) -> str:
        """The client's own ``X-Request-Id`` if it is sane, else a new ``req_…``."""
        if sent:
            candidate = sent.decode("latin-1")
            if _CLIENT_ID.match(candidate):
                return candidate
        return "req_" + self._hex()

    def completion_id(self) -> str:
        return "chatcmpl-" + self._hex()

    def new(self, prefix: str) -> str:
        """``prefix`` and 24 hex digits: an object id of another protocol (``msg_…``)."""
        return prefix + self._hex()
