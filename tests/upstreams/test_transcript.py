"""Flattening a conversation into the web upstreams' single text field."""

from __future__ import annotations

import pytest

from app.errors import Unsuitable
from app.upstreams.transcript import flatten


def test_a_lone_user_message_is_sent_as_it_is() -> None:
    assert flatten([{"role": "user", "content": "Hello there"}]) == "Hello there"
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}},
                                          {"type": "text", "text": "b"}]}]
    assert flatten(parts) == "a\nb"


def test_a_conversation_becomes_a_labelled_transcript() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Weather?"}]
    assert flatten(messages) == "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello!\n\nUser: Weather?"


def test_the_oldest_turns_are_dropped_first_and_the_system_prompt_kept() -> None:
    messages = [{"role": "system", "content": "S"}]
    for i in range(10):
        messages += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    messages.append({"role": "user", "content": "last"})
    text = flatten(messages, limit=60)
    assert len(text) <= 60
    assert text.startswith("System: S") and text.endswith("User: last")
    assert "answer 9" in text and "question 0" not in text
    assert flatten(messages, limit=len(flatten(messages))) == flatten(messages), "fits exactly: nothing dropped"


def test_a_last_message_longer_than_the_limit_is_unsuitable_for_this_account() -> None:
    with pytest.raises(Unsuitable) as caught:
        flatten([{"role": "user", "content": "x" * 1001}], limit=1000)
    assert caught.value.status == 400 and "1001" in caught.value.message
    with pytest.raises(Unsuitable):
        flatten([{"role": "system", "content": "s" * 50}, {"role": "user", "content": "u" * 50}], limit=60)
