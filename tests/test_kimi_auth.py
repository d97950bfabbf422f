"""Reading kimi.com login tokens: what is accepted, what is refused, and how expiry is shown."""

from __future__ import annotations

from typing import Any

import jwt
import pytest

from app.errors import ConfigError
from app.kimi_auth import check_fresh, read_token

NOW = 1_790_000_000.0
SIGNING_KEY = "a-signing-key-kimi-pool-does-not-have-" * 2
"""kimi.com's key is secret: kimi-pool reads tokens without it."""


def token(**claims: Any) -> str:
    base = {"iss": "user-center", "typ": "access", "app_id": "kimi", "sub": "u" * 20, "device_id": "dev-1",
            "ssid": "ss-1", "iat": int(NOW), "exp": int(NOW) + 30 * 86400}
    base.update(claims)
    return jwt.encode({k: v for k, v in base.items() if v is not None}, SIGNING_KEY, algorithm="HS512")


def test_a_kimi_access_token_is_read_without_its_key() -> None:
    info = read_token(token())
    assert (info.user, info.device_id, info.session_id) == ("u" * 20, "dev-1", "ss-1")
    assert info.expires_at == NOW + 30 * 86400
    assert info.describe(NOW).endswith("(in 30d)")
    assert info.describe(NOW + 30 * 86400 - 7200).endswith("(in 2h)")
    assert not info.lapses_soon(NOW) and info.lapses_soon(NOW + 28 * 86400)


@pytest.mark.parametrize(("value", "message"), [
    ("eyJ.a.b", "not a JWT"),
    ("plain-text", "not a JWT"),
    (token(app_id="other"), "not a kimi.com access token"),
    (token(typ="refresh"), "legacy refresh tokens are not supported"),
    (token(exp=None), "no expiry"),
])
def test_what_is_not_a_kimi_access_token_is_refused_in_one_line(value: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        read_token(value)
    assert message in caught.value.message and value not in caught.value.message


def test_an_expired_token_is_refused_with_its_date() -> None:
    expired = token(exp=int(NOW) - 86400)
    with pytest.raises(ConfigError) as caught:
        check_fresh(expired, NOW, "web-1")
    assert "account web-1" in caught.value.message and "expired on" in caught.value.message
    assert check_fresh(token(), NOW, "web-1").user == "u" * 20
