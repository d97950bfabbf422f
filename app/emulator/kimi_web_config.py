"""The kimi.com web emulator's configuration, scriptable outcomes and tokens.

Tokens are HS512 JWTs with the claim set of PROTOCOLS.md 3.1, signed with ``EMULATOR_JWT_SECRET``;
``mint_jwt`` makes them. ``KimiWebEmulatorConfig`` holds the emulated users and the behaviour knobs.
"""

from __future__ import annotations

import base64
import hashlib
import math
import secrets
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeGuard

import jwt

from app.emulator import kimi_web_wire as wire
from app.emulator.control import OutcomeKinds, Param

EMULATOR_JWT_SECRET = "kimi-pool emulator signing key for kimi-auth access tokens; never a real one."
"""The HS512 key the emulator signs and checks tokens with (long enough for SHA-512)."""

TOKEN_TTL = 30 * 86_400.0
"""A kimi-auth token lives 30 days (exp - iat = 2,592,000 s)."""

AUTH_MODES = ("stream", "http")
QUOTA_MODES = ("stream", "http", "status")

OUTCOME_KINDS: OutcomeKinds = {
    "ok": {},
    "unauthenticated": {"mode": Param("config", choices=("config", *AUTH_MODES))},
    "resource_exhausted": {"mode": Param("config", choices=("config", *QUOTA_MODES))},
    "error_frame_after": {"chunks": Param(0), "code": Param("internal", choices=tuple(wire.CODE_STATUS)),
                          "message": Param(wire.INTERNAL)},
    "drop_after": {"chunks": Param(0)},
    "drop_before_end": {},
    "no_done": {},
    "delay_first_token": {"seconds": Param(0.0)},
    "hold_after": {"chunks": Param(0)},
    "http_error": {"status": Param(503, minimum=400, maximum=599),
                   "code": Param("unavailable", choices=tuple(wire.CODE_STATUS)), "message": Param(wire.UNAVAILABLE)},
}
"""Scriptable outcomes of a Chat request and their parameters (with defaults). ``mode`` "config"
follows the emulator's ``auth_error_mode`` / ``quota_mode``; ``chunks`` counts text frames."""


# --- tokens --------------------------------------------------------------------------------------


def _ident(seed: str) -> str:
    """A stable 20-character id (lowercase base32hex), like Kimi's user and space ids."""
    return base64.b32hexencode(hashlib.sha256(seed.encode()).digest()[:15]).decode("ascii")[:20].lower()


def _digits(seed: str) -> str:
    """A stable 19-digit decimal id, like Kimi's device ids."""
    number = int.from_bytes(hashlib.sha256(seed.encode()).digest()[:8], "big")
    return str(10**18 + number % (9 * 10**18))


def mint_jwt(user_id: str, *, now: float, ttl: float = TOKEN_TTL, secret: str = EMULATOR_JWT_SECRET,
             **claims: Any) -> str:
    """An HS512 kimi-auth access token for ``user_id``, issued at ``now``; ``claims`` override any claim.

    ``space_id``, ``abstract_user_id`` and ``device_id`` derive from the user id; ``ssid`` (the login
    session) is fresh on every call, so two tokens minted at the same moment still differ.
    """
    payload: dict[str, Any] = {
        "iss": "user-center",
        "typ": "access",
        "app_id": "kimi",
        "sub": user_id,
        "space_id": _ident("space:" + user_id),
        "abstract_user_id": _ident("abstract:" + user_id),
        "ssid": str(10**18 + secrets.randbelow(9 * 10**18)),
        "device_id": _digits("device:" + user_id),
        "region": "cn",
        "membership": {"level": 10},
        "iat": int(now),
        "exp": int(now + ttl),
    }
    payload.update(claims)
    return jwt.encode(payload, secret, algorithm="HS512")


class Claims(NamedTuple):
    user: str
    iat: float
    exp: float


# --- configuration -------------------------------------------------------------------------------

RUNTIME_KNOBS = (
    "token_ttl", "auth_error_mode", "quota_turns", "quota_window", "quota_mode", "one_stream_per_user",
    "first_token_delay", "chunk_interval", "reply_words", "think_words", "heartbeat_every", "split_writes",
)
"""Fields ``configure`` (and ``POST /__fake/config``) may change while the emulator runs."""


def is_number(value: Any) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class KimiWebEmulatorConfig:
    """The emulated users (one kimi.com login each) and the behaviour knobs."""

    users: tuple[str, ...]
    """User ids: the ``sub`` of their tokens (20 characters on the real site)."""
    token_ttl: float = TOKEN_TTL
    """Lifetime of the tokens ``KimiWebEmulator.token`` mints."""
    auth_error_mode: str = "stream"
    """A bad token gets ``stream``: HTTP 200 and an ``unauthenticated`` end-of-stream error; ``http``: HTTP 401."""
    quota_turns: int | None = None
    """Turns a user may start per ``quota_window`` seconds; None: unlimited."""
    quota_window: float = 3 * 3600.0
    quota_mode: str = "stream"
    """How the quota refuses: ``stream`` (a ``resource_exhausted`` end-of-stream error with HTTP 200),
    ``http`` (HTTP 429) or ``status`` (the reply ends with a failed status and a canned text)."""
    one_stream_per_user: bool = True
    """A user's second concurrent Chat is refused with ``aborted``."""
    first_token_delay: float = 0.0
    """Seconds (on the clock) before the first thinking or text frame."""
    chunk_interval: float = 0.0
    """Seconds (on the clock) between thinking and text frames; 0 writes them all at once."""
    reply_words: int = 12
    """Words after the ``Turn N of chat:`` heading of each reply (one text frame each)."""
    think_words: int = 6
    """Words of thinking when the request asks for it (one frame each)."""
    heartbeat_every: int = 4
    """A heartbeat frame after every N text appends; 0: none."""
    split_writes: bool = False
    """Write every envelope in two pieces, split inside its 5-byte header."""

    def __post_init__(self) -> None:
        users = self.users
        if isinstance(users, str) or not all(isinstance(u, str) and u for u in users):
            raise ValueError("users must be a sequence of non-empty user id strings")
        if len(set(users)) != len(users):
            raise ValueError("user ids must be unique")
        object.__setattr__(self, "users", tuple(users))
        if not is_number(self.token_ttl) or self.token_ttl <= 0:
            raise ValueError(f"token_ttl must be a positive number of seconds, got {self.token_ttl!r}")
        if self.auth_error_mode not in AUTH_MODES:
            raise ValueError(f"auth_error_mode must be one of {', '.join(AUTH_MODES)}, got {self.auth_error_mode!r}")
        if self.quota_turns is not None and not is_count(self.quota_turns):
            raise ValueError(f"quota_turns must be a non-negative integer or None, got {self.quota_turns!r}")
        if not is_number(self.quota_window) or self.quota_window <= 0:
            raise ValueError(f"quota_window must be a positive number of seconds, got {self.quota_window!r}")
        if self.quota_mode not in QUOTA_MODES:
            raise ValueError(f"quota_mode must be one of {', '.join(QUOTA_MODES)}, got {self.quota_mode!r}")
        for name in ("one_stream_per_user", "split_writes"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("first_token_delay", "chunk_interval"):
            value = getattr(self, name)
            if not is_number(value) or value < 0:
                raise ValueError(f"{name} must be a non-negative number of seconds, got {value!r}")
        for name in ("reply_words", "think_words", "heartbeat_every"):
            if not is_count(getattr(self, name)):
                raise ValueError(f"{name} must be a non-negative integer, got {getattr(self, name)!r}")

    @classmethod
    def simple(cls, users: int = 2, **kw: Any) -> KimiWebEmulatorConfig:
        """Users ``user-000000000000001``… (20 characters each)."""
        return cls(users=tuple(f"user-{number:015d}" for number in range(1, users + 1)), **kw)
