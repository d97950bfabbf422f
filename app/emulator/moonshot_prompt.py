"""The prompt of a chat request as the Moonshot emulator sees it: its token estimate, whether it
carries images, and the hashes of its message prefixes for the organization's prompt cache.

The estimate is deterministic: ceil(characters / 4) over the messages' texts, the reasoning and
tool-call arguments carried back in history, and the tool definitions. The tokenizer route uses
the same count, so it agrees with what a chat request is charged.

``PromptCache`` stands in for Kimi's automatic context cache: an LRU of prefix hashes per
organization. A request whose messages start with a prefix seen before (same model, same tools)
reports that prefix's tokens as ``cached_tokens``. Prefix hashes are Python ``hash`` of tuples (the
cache lives in one process), so a plain text message costs no JSON encoding.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(slots=True)
class Prompt:
    tokens: int
    images: bool
    """Some message carries an ``image_url`` part."""
    prefixes: list[tuple[int, int]]
    """(hash, tokens) of each message prefix, shortest first; empty when not hashed."""


def _parts_chars(parts: list[Any]) -> tuple[int, bool]:
    chars, images = 0, False
    for part in parts:
        if isinstance(part, Mapping):
            if isinstance(part.get("text"), str):
                chars += len(part["text"])
            elif part.get("type") == "image_url":
                images = True
    return chars, images


def _history_chars(message: Mapping[str, Any]) -> int:
    """Characters of what an assistant turn carries besides its content: reasoning and tool calls."""
    chars = 0
    reasoning = message.get("reasoning_content")
    if isinstance(reasoning, str):
        chars += len(reasoning)
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        for call in calls:
            function = call.get("function") if isinstance(call, Mapping) else None
            if isinstance(function, Mapping):
                for field in ("name", "arguments"):
                    if isinstance(function.get(field), str):
                        chars += len(function[field])
    return chars


def scan(messages: Iterable[Any], tools: bytes | None = None, seed: int | None = None) -> Prompt:
    """Estimate ``messages`` (and the ``tools`` JSON); hash their prefixes when a ``seed`` is given."""
    chars = len(tools) if tools is not None else 0
    images = False
    prefixes: list[tuple[int, int]] = []
    running = seed
    for message in messages:
        if type(message) is not dict and not isinstance(message, Mapping):  # (the ABC check is slow)
            continue
        content = message.get("content")
        key: Any = content
        if type(content) is str and len(message) == 2:  # the common case: role and text
            chars += len(content)
        else:
            if isinstance(content, str):
                chars += len(content)
            elif isinstance(content, list):
                more, has_images = _parts_chars(content)
                chars += more
                images = images or has_images
            chars += _history_chars(message)
            if running is not None:
                key = orjson.dumps(message, option=orjson.OPT_SORT_KEYS)
        if running is not None:
            running = hash((running, message.get("role"), key))
            prefixes.append((running, (chars + 3) // 4))
    return Prompt((chars + 3) // 4, images, prefixes)


class PromptCache:
    """Recently seen message prefixes of one organization, LRU, at most ``entries``."""

    __slots__ = ("_seen", "entries")

    def __init__(self, entries: int) -> None:
        self.entries = entries
        self._seen: OrderedDict[int, int] = OrderedDict()

    def see(self, prefixes: list[tuple[int, int]]) -> int:
        """Remember ``prefixes``; return the tokens of the longest one seen before (0 if none)."""
        seen = self._seen
        if len(prefixes) == 1:  # one message: no loops (a benchmark's request)
            digest, tokens = prefixes[0]
            if digest in seen:
                seen.move_to_end(digest)
                return tokens
            seen[digest] = tokens
            if len(seen) > self.entries:
                seen.popitem(last=False)
            return 0
        cached = 0
        if seen:
            for digest, tokens in reversed(prefixes):
                if digest in seen:
                    cached = tokens
                    break
        for digest, tokens in prefixes:
            if digest in seen:
                seen.move_to_end(digest)
            else:
                seen[digest] = tokens
        while len(seen) > self.entries:
            seen.popitem(last=False)
        return cached

    def clear(self) -> None:
        self._seen.clear()
