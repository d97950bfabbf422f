"""What kimi-pool hands clients to bring back comes back unchanged, or is refused."""

from __future__ import annotations

from pathlib import Path

from app.sealing import KEY_NAME, Sealer
from app.store.db import Database
from app.store.secrets import server_secret


def test_signatures_hold_only_for_the_same_text_and_purpose() -> None:
    sealer = Sealer(Sealer.new_key())
    signature = sealer.sign("thinking", b"let me think")
    assert sealer.verify("thinking", b"let me think", signature)
    assert not sealer.verify("thinking", b"let me think!", signature)
    assert not sealer.verify("other", b"let me think", signature)
    assert not Sealer(Sealer.new_key()).verify("thinking", b"let me think", signature)


def test_sealed_content_opens_only_unaltered_with_its_key_and_purpose() -> None:
    sealer = Sealer(Sealer.new_key())
    token = sealer.seal("reasoning", b"step one, step two")
    assert b"step" not in token.encode(), "the client cannot read it"
    assert sealer.unseal("reasoning", token) == b"step one, step two"
    assert sealer.unseal("thinking", token) is None
    assert sealer.unseal("reasoning", token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]) is None
    assert sealer.unseal("reasoning", "not base64 at all!") is None
    assert sealer.unseal("reasoning", "") is None
    assert Sealer(Sealer.new_key()).unseal("reasoning", token) is None


async def test_the_key_is_made_once_and_shared_by_every_process(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/kp.db"
    first, second = Database(url), Database(url)
    try:
        await first.upgrade()
        key = await server_secret(first, KEY_NAME, Sealer.new_key(), 1.0)
        assert await server_secret(second, KEY_NAME, Sealer.new_key(), 2.0) == key
        token = Sealer(key).seal("reasoning", b"x")
        assert Sealer(await server_secret(second, KEY_NAME, Sealer.new_key(), 3.0)).unseal("reasoning", token) == b"x"
    finally:
        await first.dispose()
        await second.dispose()
