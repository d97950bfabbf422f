"""Reading a batch's input file: each line accepted or refused on its own, with a clear reason."""

from __future__ import annotations

import orjson
import pytest

from app.batch.input import parse_input
from app.errors import InvalidRequest

MODELS = frozenset({"kimi-k2"})
ENDPOINT = "/v1/chat/completions"


def line(custom_id: object = "a", **changes: object) -> bytes:
    request = {"custom_id": custom_id, "method": "POST", "url": ENDPOINT,
               "body": {"model": "kimi-k2", "messages": [{"role": "user", "content": "hi"}]}, **changes}
    return orjson.dumps(request)


def parse(*lines: bytes) -> list[tuple[int, str | None, str | None]]:
    return [(x.line, x.custom_id, x.code) for x in parse_input(b"\n".join(lines), endpoint=ENDPOINT, models=MODELS)]


def test_good_lines_keep_their_body_and_blank_lines_are_skipped_but_counted() -> None:
    [first, second] = parse_input(line("a") + b"\r\n\n  \n" + line("b"), endpoint=ENDPOINT, models=MODELS)
    assert (first.line, first.custom_id, first.ok) == (1, "a", True)
    assert first.body is not None and first.body["model"] == "kimi-k2"
    assert (second.line, second.custom_id) == (4, "b")


def test_each_kind_of_bad_line_is_refused_with_its_code_and_the_line_number() -> None:
    assert parse(
        b"{not json", b"[1, 2]", line(None), line(""), line("a"), line("a"), line("m", method="GET"),
        line("u", url="/v1/embeddings"), line("b", body={"model": "kimi-k2", "messages": "hi"}),
        line("c", body={"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}),
        line("d", body=None),
    ) == [
        (1, None, "invalid_json_line"), (2, None, "invalid_json_line"), (3, None, "missing_custom_id"),
        (4, None, "missing_custom_id"), (5, "a", None), (6, "a", "duplicate_custom_id"), (7, "m", "invalid_method"),
        (8, "u", "invalid_url"), (9, "b", "invalid_request"), (10, "c", "model_not_found"),
        (11, "d", "invalid_request"),
    ]


def test_messages_name_the_line_and_what_is_wrong() -> None:
    [refused] = parse_input(line("b", body={"model": "kimi-k2", "messages": [], "temperature": 9}),
                            endpoint=ENDPOINT, models=MODELS)
    assert refused.message == "Line 1: 'messages' is required and must be a non-empty array."
    assert refused.error() == {"code": "invalid_request", "message": refused.message, "param": "body.messages",
                               "line": 1}


def test_a_byte_order_mark_is_skipped_and_a_file_that_is_not_utf8_is_refused_whole() -> None:
    assert parse(b"\xef\xbb\xbf" + line("a")) == [(1, "a", None)]
    with pytest.raises(InvalidRequest) as refused:
        parse_input(b"caf\xe9", endpoint=ENDPOINT, models=MODELS)
    assert refused.value.code == "invalid_file_encoding"
    assert parse_input(b"\n\n", endpoint=ENDPOINT, models=MODELS) == []
