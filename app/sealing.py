"""What kimi-pool hands a client to bring back later, made so that it comes back unchanged.

Two protocols carry the model's thinking through the client: Anthropic's ``thinking`` blocks come back
with the ``signature`` kimi-pool issued (``sign``/``verify``: an HMAC over the text), and the Responses
API's ``reasoning.encrypted_content`` comes back as the opaque blob kimi-pool issued (``seal``/``unseal``:
AES-GCM, so the client can neither read nor alter it). Each use has its own *purpose*, bound into the MAC
and the associated data, so a token made for one is worthless for the other.

The 32-byte key is made once and kept in the database (``server_secrets``), so every process and every
instance sharing the database accept what any of them issued, and a restart invalidates nothing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_NAME = "sealing"
KEY_BYTES = 32
_NONCE = 12


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes | None:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None


class Sealer:
    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"the sealing key must be {KEY_BYTES} bytes")
        self._mac_key = hashlib.sha256(b"kimi-pool sign\0" + key).digest()
        self._aead = AESGCM(hashlib.sha256(b"kimi-pool seal\0" + key).digest())

    @staticmethod
    def new_key() -> bytes:
        return os.urandom(KEY_BYTES)

    def sign(self, purpose: str, data: bytes) -> str:
        return _b64(hmac.new(self._mac_key, purpose.encode() + b"\0" + data, hashlib.sha256).digest())

    def verify(self, purpose: str, data: bytes, signature: str) -> bool:
        return hmac.compare_digest(self.sign(purpose, data), signature)

    def seal(self, purpose: str, data: bytes) -> str:
        nonce = os.urandom(_NONCE)
        return _b64(nonce + self._aead.encrypt(nonce, data, purpose.encode()))

    def unseal(self, purpose: str, token: str) -> bytes | None:
        """The sealed bytes, or None if the token was not made by this key for this purpose (or was altered)."""
        raw = _unb64(token) if isinstance(token, str) else None
        if raw is None or len(raw) <= _NONCE:
            return None
        try:
            return self._aead.decrypt(raw[:_NONCE], raw[_NONCE:], purpose.encode())
        except InvalidTag:
            return None
