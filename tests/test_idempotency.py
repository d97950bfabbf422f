"""The pure parts of ``app.idempotency``: keys, request hashes, a stream's answer kept and played back.
(The endpoint's behaviour is tested end to end in tests/api/test_idempotency.py.)"""

from __future__ import annotations

import pytest

from app.errors import InvalidRequest
from app.idempotency import STORED_KEY_LENGTH, Transcript, replay_events, request_hash, scoped_key
from app.upstreams.base import Delta, Finish, Usage


def test_keys_are_scoped_by_client_and_fit_the_column() -> None:
    assert scoped_key(b"abc-123", "team-a") == "team-a:abc-123"
    assert scoped_key(b"abc-123", None) == ":abc-123"
    longest_name = "n" * 64
    one, other = scoped_key(b"k" * 255, longest_name), scoped_key(b"k" * 254 + b"j", longest_name)
    assert len(one) <= STORED_KEY_LENGTH and len(other) <= STORED_KEY_LENGTH
    assert one != other and one.startswith(longest_name + ":sha256:")
    for bad in (b"", b"k" * 256, b"caf\xc3\xa9", b"new\nline"):
        with pytest.raises(InvalidRequest):
            scoped_key(bad, "team-a")


def test_the_hash_ignores_key_order_and_how_the_answer_is_delivered() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.5}
    same = {"temperature": 0.5, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"content": "hi", "role": "user"}], "model": "m"}
    assert request_hash(body) == request_hash(same)
    assert request_hash(body) != request_hash({**body, "temperature": 0.6})


def test_a_stream_with_tool_calls_is_kept_whole_and_played_back() -> None:
    transcript = Transcript()
    transcript.add([Delta(reasoning="Let me "), Delta(reasoning="look.")])
    transcript.add([Delta(tool_calls=[{"index": 0, "id": "call_1", "type": "function",
                                       "function": {"name": "get_weather", "arguments": ""}}])])
    transcript.add([Delta(tool_calls=[{"index": 0, "function": {"arguments": '{"city": '}}]),
                    Delta(tool_calls=[{"index": 0, "function": {"arguments": '"Paris"}'}}])])
    transcript.add([Finish("tool_calls"), Usage(10, 7, cached_tokens=4)])
    completion = transcript.completion()
    assert completion.content is None and completion.reasoning == "Let me look."
    assert completion.tool_calls == [{"id": "call_1", "type": "function",
                                      "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]
    body = {  # as the chat endpoint stores it
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "kimi-k2",
        "choices": [{"index": 0, "finish_reason": completion.finish_reason, "logprobs": None,
                     "message": {"role": "assistant", "content": completion.content,
                                 "reasoning_content": completion.reasoning, "tool_calls": completion.tool_calls}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 7, "total_tokens": 17,
                  "prompt_tokens_details": {"cached_tokens": 4}},
    }
    events = replay_events(body)
    assert events == [
        Delta(reasoning="Let me look."),
        Delta(tool_calls=[{"index": 0, **completion.tool_calls[0]}]),
        Finish("tool_calls"),
        Usage(10, 7, cached_tokens=4),
    ]
