"""Connect envelopes, cut from a byte stream however the reads fall."""

from __future__ import annotations

import pytest

from app.upstreams.connect import END_STREAM, EnvelopeReader, FramingError, envelope


def test_envelopes_survive_any_split_of_the_stream() -> None:
    stream = envelope(b'{"a":1}') + envelope(b'{"b":2}') + envelope(b"{}", END_STREAM)
    for size in (1, 2, 3, 5, 7, len(stream)):
        reader = EnvelopeReader()
        got = []
        for start in range(0, len(stream), size):
            got += reader.feed(stream[start:start + size])
        assert [(e.flags, e.data) for e in got] == [(0, b'{"a":1}'), (0, b'{"b":2}'), (END_STREAM, b"{}")]
        assert got[-1].end_of_stream and not got[0].end_of_stream and reader.pending == 0


def test_an_unfinished_envelope_is_held_back() -> None:
    reader = EnvelopeReader()
    assert reader.feed(envelope(b'{"a":1}')[:-1]) == []
    assert reader.pending == 11


@pytest.mark.parametrize("bad", [b"\x08\x00\x00\x00\x02{}", b"\x01\x00\x00\x00\x02{}", b"\x00\xff\xff\xff\xff"])
def test_bad_flags_compression_and_absurd_lengths_are_framing_errors(bad: bytes) -> None:
    with pytest.raises(FramingError):
        EnvelopeReader().feed(bad)
