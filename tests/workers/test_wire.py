"""The lease channel's framing over a real Unix socket, and classified errors crossing it intact."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from app import errors
from app.workers.wire import Frame, FrameProtocol, decode_error, encode_error


async def test_frames_arrive_whole_and_in_order_however_the_socket_splits_them(tmp_path: Path) -> None:
    received: list[Frame] = []
    all_in = asyncio.Event()
    count = 2000

    def on_frame(frame: Frame) -> None:
        received.append(frame)
        if len(received) == count + 1:
            all_in.set()

    server = await asyncio.get_running_loop().create_unix_server(
        lambda: FrameProtocol(on_frame, lambda: None), str(tmp_path / "s.sock"))
    sender = FrameProtocol(lambda frame: None, lambda: None)
    await asyncio.get_running_loop().create_unix_connection(lambda: sender, str(tmp_path / "s.sock"))
    big = "x" * 300_000  # larger than any single read
    for i in range(count):
        sender.send(["take", i, "kimi-k2", i * 7, None, 30.0, f"session-{i}", [], False])
    sender.send(["done", {"text": big, "unicode": "Kimi 月之暗面"}])
    await asyncio.wait_for(all_in.wait(), 10)
    assert [frame[1] for frame in received[:count]] == list(range(count))
    assert received[count][1] == {"text": big, "unicode": "Kimi 月之暗面"}
    sender.close()
    server.close()
    await server.wait_closed()


def test_every_classified_upstream_error_crosses_with_what_the_pool_reads_of_it() -> None:
    cases: list[tuple[errors.UpstreamError, dict[str, Any]]] = [
        (errors.RateLimited("slow down", retry_after=12.5, bucket="rpm", limit=60),
         {"retry_after": 12.5, "bucket": "rpm", "limit": 60, "status": 429}),
        (errors.QuotaExhausted("out of credit", until=1_800_000_000.0), {"until": 1_800_000_000.0}),
        (errors.AuthDead("key revoked"), {"code": "upstream_auth_failed"}),
        (errors.UpstreamOverloaded("busy", retry_after=3.0), {"retry_after": 3.0, "status": 503}),
        (errors.UpstreamBadRequest("bad temperature", status=422, code="bad_param", param="temperature"),
         {"status": 422, "code": "bad_param", "param": "temperature", "retryable": False}),
        (errors.Unsuitable("too long"), {"code": "context_length_exceeded", "retryable": True}),
        (errors.Transient("reset"), {"code": "upstream_unavailable"}),
    ]
    for error, expected in cases:
        back = decode_error(encode_error(error))
        assert type(back) is type(error) and back.message == error.message
        for name, value in expected.items():
            assert getattr(back, name) == value, (type(error).__name__, name)
