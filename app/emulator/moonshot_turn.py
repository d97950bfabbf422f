"""One answer of the Moonshot emulator as tokens: reasoning, content and tool calls.

A ``Turn`` holds the per-token delta objects a stream sends (one chunk each) and renders the
whole assistant message of its first N tokens for a JSON answer, so ``max_tokens`` cuts both the
same way. A tool call costs one token for its header chunk (index, id, type, name, empty
arguments, as OpenAI streams them) and one per argument fragment. ``Reply`` is the deterministic
default answer, built once per configuration: a plain chat request allocates nothing here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

_ANSWER = ("Hello", "from", "the", "Moonshot", "emulator,", "a", "deterministic", "reply", "for", "testing",
           "the", "gateway.")
_THOUGHT = ("Let", "me", "think", "about", "this", "request", "step", "by", "step", "before", "answering.")
_WORD = re.compile(r"\s*\S+|\s+")
FRAGMENT = 4
"""Characters of JSON (arguments, JSON answers) per token and per chunk."""


def pieces(words: tuple[str, ...], count: int) -> list[str]:
    return [("" if i == 0 else " ") + words[i % len(words)] for i in range(count)]


def words(text: str) -> list[str]:
    """``text`` as one piece per word (leading spaces kept), so the pieces join back to it."""
    return _WORD.findall(text)


def fragments(text: str) -> list[str]:
    return [text[i:i + FRAGMENT] for i in range(0, len(text), FRAGMENT)]


@dataclass(frozen=True, slots=True)
class Call:
    """A tool call the answer makes: ``type`` is ``function``, or ``builtin_function`` for ``$web_search``."""

    index: int
    id: str
    type: str
    name: str
    arguments: str


class Turn:
    """An answer as tokens: ``deltas`` (one chunk each), ``message(tokens)``, ``finish_for(tokens)``."""

    __slots__ = ("_content", "_reasoning", "_whole", "calls", "deltas", "finish")

    def __init__(self, reasoning: list[str], content: list[str], calls: list[Call] | tuple[Call, ...] = ()) -> None:
        self._reasoning = reasoning
        self._content = content
        self.calls = tuple(calls)
        self.finish = "tool_calls" if self.calls else "stop"
        """The finish reason when every token was sent."""
        deltas = [orjson.dumps({"reasoning_content": piece}) for piece in reasoning]
        deltas += [orjson.dumps({"content": piece}) for piece in content]
        for call in self.calls:
            deltas.append(orjson.dumps({"tool_calls": [{"index": call.index, "id": call.id, "type": call.type,
                                                        "function": {"name": call.name, "arguments": ""}}]}))
            deltas += [orjson.dumps({"tool_calls": [{"index": call.index, "function": {"arguments": piece}}]})
                       for piece in fragments(call.arguments)]
        self.deltas = deltas
        self._whole = self._message(len(deltas))

    def finish_for(self, tokens: int) -> str:
        return "length" if tokens < len(self.deltas) else self.finish

    def message(self, tokens: int) -> dict[str, Any]:
        """The assistant message of the first ``tokens`` tokens (the whole one is built once: do not change it)."""
        return self._whole if tokens >= len(self.deltas) else self._message(tokens)

    def _message(self, tokens: int) -> dict[str, Any]:
        reasoning = self._reasoning[:tokens]
        left = tokens - len(reasoning)
        content = self._content[:left]
        left -= len(content)
        message: dict[str, Any] = {"role": "assistant", "content": "".join(content)}
        if reasoning:
            message["reasoning_content"] = "".join(reasoning)
        calls = []
        for call in self.calls:
            if left <= 0:
                break
            parts = fragments(call.arguments)[: left - 1]
            left -= 1 + len(parts)
            calls.append({"index": call.index, "id": call.id, "type": call.type,
                          "function": {"name": call.name, "arguments": "".join(parts)}})
        if calls:
            message["tool_calls"] = calls
        return message


class Reply:
    """The deterministic answer: ``reply_words`` words, after ``reasoning_words`` of thinking if on."""

    def __init__(self, reply_words: int, reasoning_words: int) -> None:
        self.content = pieces(_ANSWER, reply_words)
        self.reasoning_words = reasoning_words
        self.text = "".join(self.content)
        self.turns = {False: Turn([], self.content), True: Turn(self.reasoning(None), self.content)}
        """The plain answer, by ``thinking``."""

    def reasoning(self, effort: str | None) -> list[str]:
        """Thinking pieces: ``low`` effort thinks half as long, ``high`` as long, ``max`` (the default of the
        models that take levels) twice as long."""
        count = self.reasoning_words
        if effort == "low":
            count = max(1, count // 2)
        elif effort == "max":
            count *= 2
        return pieces(_THOUGHT, count)
